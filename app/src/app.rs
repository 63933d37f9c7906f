//! The desktop app shell: the top bar (project menu, the views, the one device selector) and the
//! views. Every view's long work runs through the one job mechanism (`jobs`) on the device the top
//! bar names, with the one model store the app keeps for the session; views hand work to each
//! other through the command queue (`commands`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use crossdiff::Backend;
use crossdiff::workflow::models::ModelStore;
use crossdiff::workflow::project::Project;
use eframe::egui;

use crate::commands::{AppCommand, Commands, Tab};
use crate::jobs::JobEnv;

pub use crate::models_view::ModelSummary;

/// The device selector's text: the choice and, for `auto`, what it settled on (`auto: cpu (burn flex)`).
fn device_label(b: &Backend) -> String {
    if *b == Backend::Auto { format!("auto: {}", b.describe()) } else { b.to_string() }
}

/// Opens the desktop app with `backend` selected in the top bar. Without a display, or when the
/// window system refuses a window, one plain line says so.
pub fn run(backend: Backend) -> Result<()> {
    check_display()?;
    // `auto` asks wgpu for the adapters once, here on the main thread, before any job thread opens
    // a device (Vulkan loaders dislike instances made on several threads at once).
    let _ = Backend::Auto.resolve();
    // A first size until the monitor is known; the first frame then fits the window to the screen
    // (`window_size`).
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1100.0, 720.0])
            .with_min_inner_size(MIN_WINDOW)
            .with_title("crossdiff"),
        ..Default::default()
    };
    eframe::run_native(
        "crossdiff",
        options,
        Box::new(move |cc| {
            let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
            app.backend = backend;
            // Recent projects and a dismissed tour survive restarts (eframe persistence).
            if let Some(storage) = cc.storage {
                app.restore_settings(storage);
            }
            app.compute.adopt(&app.backend);
            // CROSSDIFF_PROJECT opens a project with its first run loaded (demos, screenshots); it
            // does not join the recent list.
            if let Ok(dir) = std::env::var("CROSSDIFF_PROJECT") {
                let recent = app.recent.clone();
                app.open_project(Path::new(&dir));
                app.recent = recent;
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(window_error)
}

const NO_WINDOW_HINT: &str = "the CLI commands work without one, see `crossdiff --help`";

/// On X11/Wayland systems: a display to open the window on.
fn check_display() -> Result<()> {
    #[cfg(all(unix, not(target_os = "macos")))]
    {
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
        if !["DISPLAY", "WAYLAND_DISPLAY", "WAYLAND_SOCKET"].into_iter().any(set) {
            anyhow::bail!(
                "the desktop app needs a display (none found: DISPLAY and WAYLAND_DISPLAY are unset); {NO_WINDOW_HINT}"
            );
        }
    }
    Ok(())
}

/// eframe's error as one line, without the window system's name and the source file it was raised
/// in ("winit EventLoopError: os error at …/x11/mod.rs:42: …" keeps only what follows).
pub fn window_error(e: eframe::Error) -> anyhow::Error {
    let text = match &e {
        eframe::Error::Winit(err) => err.to_string(),
        eframe::Error::WinitEventLoop(err) => err.to_string(),
        other => other.to_string(),
    };
    anyhow::anyhow!("the desktop app could not open a window ({}); {NO_WINDOW_HINT}", window_reason(&text))
}

/// The reason in a window-system error: its first line, after any "os error at FILE.rs:LINE: ".
pub fn window_reason(text: &str) -> String {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no reason given");
    let reason = match line.rfind(".rs:") {
        Some(i) => line[i + 4..].trim_start_matches(|c: char| c.is_ascii_digit() || c == ':').trim(),
        None => line,
    };
    let reason = if reason.is_empty() { "no reason given" } else { reason };
    reason.replace("winit", "window system")
}

const RECENT_KEY: &str = "recent_projects";
/// Whether the user closed the guided tour.
const TOUR_DISMISSED_KEY: &str = "tour_dismissed";

/// The smallest window the views are laid out for.
pub const MIN_WINDOW: [f32; 2] = [900.0, 600.0];

/// The window's size on a monitor of `monitor` points: 85% of it each way, at least [`MIN_WINDOW`],
/// never more than the monitor.
pub fn window_size(monitor: egui::Vec2) -> egui::Vec2 {
    (monitor * 0.85).max(egui::Vec2::from(MIN_WINDOW)).min(monitor)
}

/// The local devices the selector offers (as `crossdiff::Backend` has them), before the Compute
/// window's remote servers.
const BACKENDS: [Backend; 4] = [Backend::Auto, Backend::Cpu, Backend::Wgpu, Backend::Cuda];

pub struct CrossdiffApp {
    pub tab: Tab,
    /// The open project, if any.
    pub project: Option<Project>,
    /// Recently opened project folders, most recent first.
    pub recent: Vec<PathBuf>,
    /// The one device every job runs on (the top bar's selector).
    pub backend: Backend,
    /// The Compute window: remote servers the device selector offers too.
    pub compute: crate::compute_view::ComputeView,
    /// The chat model's LoRA adapter folder as typed (empty: none): one field for every view that
    /// names a chat model, given to every job through [`JobEnv`].
    pub chat_adapter: String,
    /// Loaded models, shared by every view: a model is reloaded only when its path or the device
    /// changes.
    pub store: Arc<ModelStore>,
    /// Requests between views, drained once per frame.
    pub commands: Commands,
    ctx: egui::Context,
    pub models: crate::models_view::ModelsView,
    pub latents: crate::latents_view::LatentsView,
    pub train: crate::train_view::TrainView,
    pub analyze: crate::analyze_view::AnalyzeView,
    pub cache: crate::cache_view::CacheView,
    pub plots: crate::plots_view::PlotsView,
    pub compare: crate::compare_view::CompareView,
    pub steering: crate::steering_view::SteeringView,
    pub prompt_lab: crate::prompt_lab_view::PromptLabView,
    pub adl: crate::adl_view::AdlView,
    pub methods: crate::methods_view::MethodsView,
    /// The guided tour's panel (shown on opening a project with runs until dismissed).
    pub tour: crate::tour::TourView,
    error: Option<String>,
    /// Whether the window was fitted to the monitor yet (the first frame that knows its size).
    sized: bool,
}

impl CrossdiffApp {
    pub fn new(ctx: egui::Context) -> Self {
        let bundled = |name: &str| {
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/tiny-gemma2").join(name);
            if p.exists() { p.canonicalize().unwrap_or(p).display().to_string() } else { String::new() }
        };
        // CROSSDIFF_VIEW opens a given view (screenshots, demos), and the tour does not take over.
        let view = std::env::var("CROSSDIFF_VIEW").ok().and_then(|v| Tab::from_env_name(&v));
        let tab = view.unwrap_or(Tab::Models);
        Self {
            tab,
            project: None,
            recent: Vec::new(),
            backend: Backend::Auto,
            compute: Default::default(),
            chat_adapter: String::new(),
            store: Arc::new(ModelStore::new()),
            commands: Commands::new(),
            ctx,
            models: crate::models_view::ModelsView::new([bundled("base"), bundled("chat")]),
            latents: crate::latents_view::LatentsView::new(String::new(), bundled("chat")),
            train: crate::train_view::TrainView::default(),
            analyze: crate::analyze_view::AnalyzeView::new(bundled("base"), bundled("chat")),
            cache: crate::cache_view::CacheView::new(bundled("base"), bundled("chat")),
            plots: crate::plots_view::PlotsView::new(String::new()),
            compare: crate::compare_view::CompareView::default(),
            steering: crate::steering_view::SteeringView::new(bundled("chat")),
            prompt_lab: crate::prompt_lab_view::PromptLabView::new(bundled("base"), bundled("chat")),
            adl: crate::adl_view::AdlView::new(bundled("base"), bundled("chat")),
            methods: crate::methods_view::MethodsView::default(),
            tour: crate::tour::TourView::new(view.is_none()),
            error: None,
            sized: false,
        }
    }

    /// Restores what the app remembers across starts: recent projects, whether the tour was
    /// dismissed (before a project is opened, so a dismissed tour stays closed) and the remote
    /// servers' addresses (never their tokens).
    pub fn restore_settings(&mut self, storage: &dyn eframe::Storage) {
        if let Some(recent) = eframe::get_value::<Vec<PathBuf>>(storage, RECENT_KEY) {
            self.recent = recent;
        }
        self.tour.dismissed = eframe::get_value(storage, TOUR_DISMISSED_KEY).unwrap_or(false);
        self.compute.restore(eframe::get_value(storage, crate::compute_view::SERVERS_KEY).unwrap_or_default());
    }

    /// What every job gets: the app's device, model store and chat adapter.
    pub fn job_env(&self) -> JobEnv {
        JobEnv {
            ctx: self.ctx.clone(),
            backend: self.backend.clone(),
            store: self.store.clone(),
            chat_adapter: self.chat_adapter.clone(),
        }
    }

    /// Opens a project folder: every view's paths come from it, and it joins the recent list.
    pub fn open_project(&mut self, dir: &Path) {
        match Project::open(dir) {
            Ok(p) => {
                let s = |path: &Path| p.resolve(path).display().to_string();
                let (base, chat) = (s(&p.base), s(&p.chat));
                self.models.dirs = [base.clone(), chat.clone()];
                self.chat_adapter = p.chat_adapter.as_deref().map(s).unwrap_or_default();
                self.cache.base_dir = base.clone();
                self.cache.chat_dir = chat.clone();
                self.cache.data = p.data.iter().map(|d| s(d)).collect::<Vec<_>>().join("\n");
                self.cache.show_cache(&p.resolve(&p.cache));
                self.train.cache_dir = s(&p.cache);
                self.prompt_lab.base_dir = base.clone();
                self.prompt_lab.chat_dir = chat.clone();
                self.steering.model_dir = chat.clone();
                self.latents.model_dir = chat.clone();
                let runs = p.run_dirs();
                let first_run = runs
                    .first()
                    .map(|r| r.display().to_string())
                    .unwrap_or_else(|| p.dir.join("runs/batchtopk").display().to_string());
                self.train.run_dir = first_run.clone();
                self.analyze.set_run(&first_run);
                self.analyze.base_dir = base.clone();
                self.analyze.chat_dir = chat.clone();
                self.analyze.cache_dir = s(&p.cache);
                // The KL check's conversations: the project's first chat data file.
                let is_chat = |d: &&PathBuf| d.extension().is_some_and(|e| e == "jsonl" || e == "parquet");
                self.analyze.kl_data = p.data.iter().find(is_chat).map(|d| s(d)).unwrap_or_default();
                // The ADL reads plain text (the authors' setting): the project's first .txt file.
                let text = p.data.iter().find(|d| d.extension().is_some_and(|e| e == "txt")).map(|d| s(d));
                self.adl.prefill(&base, &chat, text, &p.dir.join("adl"));
                self.methods.prefill(&runs, &p.dir.join("adl"));
                self.compare.runs = [
                    runs.first().map(|r| r.display().to_string()).unwrap_or_default(),
                    runs.get(1).map(|r| r.display().to_string()).unwrap_or_default(),
                ];
                if runs.is_empty() {
                    self.latents.run_dir = first_run.clone();
                    self.plots.run_dir = first_run.clone();
                    self.steering.run_dir = first_run.clone();
                    self.prompt_lab.run_dir = first_run;
                } else {
                    // The project's first run in every view that shows one; Prompt lab and
                    // Steering start from its most chat-specific latent and run once when shown.
                    self.latents.show_run(&first_run);
                    self.plots.show_run(&first_run);
                    self.compare.load();
                    let suggestion = crate::suggest::Suggestion::of_run(Path::new(&first_run), Path::new(&chat));
                    self.prompt_lab.prefill(&first_run, &base, &chat, &suggestion);
                    self.steering.prefill(&first_run, &chat, &suggestion);
                }
                // The guided tour over the project's runs (from its first step unless dismissed).
                self.tour.set_plan(crate::tour::TourPlan::of_runs(&runs), &mut self.commands);
                crossdiff::workflow::project::remember(&mut self.recent, dir, 10);
                self.project = Some(p);
                self.error = None;
            }
            Err(e) => self.error = Some(crate::errors::phrase(&e, &[])),
        }
    }

    /// Creates a project in `dir` from the model directories in the Models view and the chat adapter.
    pub fn create_project(&mut self, dir: &Path) {
        let [base, chat] = self.models.dirs.clone().map(PathBuf::from);
        match Project::create_adapted(dir, base, chat, self.job_env().chat_adapter(), Vec::new()) {
            Ok(_) => self.open_project(dir),
            Err(e) => self.error = Some(crate::errors::phrase(&e, &[])),
        }
    }

    /// Sets the base and chat snapshot directories (what the Models view's two text fields hold).
    pub fn set_model_dirs(&mut self, dirs: [String; 2]) {
        self.models.dirs = dirs;
    }

    /// Queues a command (what views do; tests too).
    pub fn push(&mut self, command: AppCommand) {
        self.commands.push(command);
    }

    /// Carries out the queued commands, through each target view's own methods.
    fn drain_commands(&mut self) {
        for command in std::mem::take(&mut self.commands) {
            match command {
                AppCommand::OpenLatent { run, latent } => {
                    self.latents.show_latent(&run, latent);
                    self.tab = Tab::Latents;
                }
                AppCommand::SteerLatent { run, latent } => {
                    self.steering.steer_latent(&run, latent);
                    self.tab = Tab::Steering;
                }
                AppCommand::AnalyzeRun { run, cache } => {
                    self.analyze.set_run(&run);
                    if let Some(cache) = cache.filter(|c| !c.trim().is_empty()) {
                        self.analyze.cache_dir = cache;
                    }
                    self.tab = Tab::Analyze;
                }
                AppCommand::Analysed { run } => {
                    self.latents.show_run(&run);
                    self.plots.show_run(&run);
                    if self.compare.runs.contains(&run) {
                        self.compare.load();
                    }
                    self.methods.reload_if_listed(&run);
                }
                AppCommand::KlMeasured { run } => {
                    self.plots.show_run(&run);
                    self.methods.reload_if_listed(&run);
                }
                AppCommand::SwitchTab(tab) => self.tab = tab,
                AppCommand::AskModels { prompt } => {
                    self.models.ask(&prompt);
                    self.tab = Tab::Models;
                }
                AppCommand::ShowLatents { run, class, latent } => {
                    self.latents.show_class(&run, class, latent);
                    self.tab = Tab::Latents;
                }
                AppCommand::CompareRuns { runs } => {
                    self.compare.compare(runs);
                    self.tab = Tab::Compare;
                }
                AppCommand::ShowKl { run } => {
                    self.plots.show_kl(&run);
                    self.tab = Tab::Plots;
                }
                AppCommand::GenerateSteered => self.steering.generate_when_shown(),
                AppCommand::SetChatAdapter { dir } => self.chat_adapter = dir,
            }
        }
    }

    /// Once the monitor's size is known (the first frame, mostly): the window at
    /// [`window_size`] of it, centred.
    fn fit_window(&mut self, ctx: &egui::Context) {
        if self.sized {
            return;
        }
        let Some(monitor) = ctx.input(|i| i.viewport().monitor_size).filter(|m| m.x > 0.0 && m.y > 0.0) else {
            return;
        };
        self.sized = true;
        let size = window_size(monitor);
        ctx.send_viewport_cmd(egui::ViewportCommand::InnerSize(size));
        ctx.send_viewport_cmd(egui::ViewportCommand::OuterPosition(((monitor - size) * 0.5).to_pos2()));
    }

    fn project_menu_ui(&mut self, ui: &mut egui::Ui) {
        ui.menu_button("Project", |ui| {
            if ui.button("Open project…").clicked() {
                if let Some(dir) = rfd::FileDialog::new().set_title("Open a crossdiff project folder").pick_folder() {
                    self.open_project(&dir);
                }
                ui.close();
            }
            if ui.button("New project…").clicked() {
                if let Some(dir) = rfd::FileDialog::new().set_title("Folder for the new project").pick_folder() {
                    self.create_project(&dir);
                }
                ui.close();
            }
            ui.separator();
            for dir in self.recent.clone() {
                if ui.button(dir.display().to_string()).clicked() {
                    self.open_project(&dir);
                    ui.close();
                }
            }
        });
    }

    fn help_menu_ui(&mut self, ui: &mut egui::Ui) {
        ui.menu_button("Help", |ui| {
            let tour = ui
                .add_enabled(self.tour.available(), egui::Button::new("Tour"))
                .on_disabled_hover_text("Open a project with runs first (`crossdiff demo` builds one)");
            if tour.clicked() {
                self.tour.start(&mut self.commands);
                ui.close();
            }
        });
    }

    fn top_bar_ui(&mut self, ui: &mut egui::Ui) {
        // Wrapped: on a narrow window the device selector goes to a second row, not out of sight.
        ui.horizontal_wrapped(|ui| {
            ui.strong("crossdiff");
            self.project_menu_ui(ui);
            self.help_menu_ui(ui);
            if let Some(p) = &self.project {
                ui.label(format!("project: {}", p.dir.display()));
            }
            for (tab, label) in Tab::ALL {
                ui.selectable_value(&mut self.tab, tab, label);
            }
            ui.separator();
            // One device for every job; loaded models move with it (the store keys on the device).
            egui::ComboBox::from_label("Device").selected_text(device_label(&self.backend)).show_ui(ui, |ui| {
                for b in BACKENDS.into_iter().chain(self.compute.backends()) {
                    let label = b.to_string();
                    ui.selectable_value(&mut self.backend, b, label);
                }
            });
            let compute = ui.selectable_label(self.compute.open, "Compute…");
            if compute.on_hover_text("Remote servers (`crossdiff serve`) the Device selector offers").clicked() {
                self.compute.open = !self.compute.open;
            }
            if let Some(e) = &self.error {
                ui.colored_label(egui::Color32::LIGHT_RED, format!("error: {e}"));
            }
        });
    }
}

impl eframe::App for CrossdiffApp {
    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, RECENT_KEY, &self.recent);
        eframe::set_value(storage, TOUR_DISMISSED_KEY, &self.tour.dismissed);
        eframe::set_value(storage, crate::compute_view::SERVERS_KEY, &self.compute.urls());
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.fit_window(ui.ctx());
        self.drain_commands();
        egui::Panel::top("status").show(ui, |ui| self.top_bar_ui(ui));
        if self.tour.open {
            egui::Panel::bottom("tour").show(ui, |ui| self.tour.ui(ui, &mut self.commands));
        }
        let env = self.job_env();
        match self.tab {
            Tab::Models => {
                egui::Panel::left("models")
                    .default_size(380.0)
                    .show(ui, |ui| self.models.models_ui(ui, &env, &mut self.commands));
                egui::CentralPanel::default().show(ui, |ui| self.models.prompt_ui(ui, &env));
            }
            Tab::Cache => {
                egui::CentralPanel::default().show(ui, |ui| self.cache.ui(ui, &env, &mut self.commands));
            }
            Tab::Train => {
                egui::CentralPanel::default().show(ui, |ui| self.train.ui(ui, &env, &mut self.commands));
            }
            Tab::Analyze => {
                egui::CentralPanel::default().show(ui, |ui| self.analyze.ui(ui, &env, &mut self.commands));
            }
            Tab::Latents => {
                egui::CentralPanel::default().show(ui, |ui| self.latents.ui(ui, &mut self.commands));
            }
            Tab::PromptLab => {
                egui::CentralPanel::default().show(ui, |ui| self.prompt_lab.ui(ui, &env, &mut self.commands));
            }
            Tab::Steering => {
                egui::CentralPanel::default().show(ui, |ui| self.steering.ui(ui, &env, &mut self.commands));
            }
            Tab::Compare => {
                egui::CentralPanel::default().show(ui, |ui| self.compare.ui(ui));
            }
            Tab::Plots => {
                egui::CentralPanel::default().show(ui, |ui| self.plots.ui(ui, &mut self.commands));
            }
            Tab::Adl => {
                egui::CentralPanel::default().show(ui, |ui| self.adl.ui(ui, &env, &mut self.commands));
            }
            Tab::Methods => {
                egui::CentralPanel::default().show(ui, |ui| self.methods.ui(ui));
            }
        }
        self.compute.window(ui.ctx(), &mut self.backend);
        if !self.commands.is_empty() {
            ui.ctx().request_repaint();
        }
    }
}

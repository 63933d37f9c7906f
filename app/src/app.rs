//! The desktop app shell: load a base/chat pair, list them, run one prompt through both.
//! All model work happens on a worker thread that owns the models; the UI only sends commands and
//! shows events, so it never freezes.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};

use anyhow::Result;
use crossdiff::model::generate::{Sampling, generate};
use crossdiff::{Backend, LoadOptions, Model};
use eframe::egui;

pub fn run() -> Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default().with_inner_size([1100.0, 720.0]).with_title("crossdiff"),
        ..Default::default()
    };
    eframe::run_native(
        "crossdiff",
        options,
        Box::new(|cc| {
            let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
            // CROSSDIFF_PROJECT opens a project with its first run loaded (demos, screenshots).
            if let Ok(dir) = std::env::var("CROSSDIFF_PROJECT") {
                app.open_project(std::path::Path::new(&dir));
                app.latents.load();
                app.plots.load();
                app.compare.load();
                if let Some(first) =
                    app.latents.first_latent_of_class("chat_only").or(app.latents.first_latent_of_class("shared"))
                {
                    app.latents.open_latent(first);
                }
            }
            // Recent projects survive restarts (eframe persistence).
            if let Some(recent) = cc.storage.and_then(|s| eframe::get_value::<Vec<PathBuf>>(s, RECENT_KEY)) {
                app.recent = recent;
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}

enum Job {
    Load { dirs: [PathBuf; 2], backend: Backend },
    Prompt { text: String, chat: bool, max_tokens: usize },
}

enum Event {
    Loaded { slot: usize, summary: ModelSummary },
    Text { slot: usize, text: String },
    Done,
    Error(String),
}

#[derive(Clone)]
pub struct ModelSummary {
    pub dir: String,
    pub layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub parameters: usize,
    pub config: crossdiff::Gemma2Config,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tab {
    Models,
    Cache,
    Train,
    Latents,
    Plots,
    PromptLab,
    Steering,
    Compare,
}

const RECENT_KEY: &str = "recent_projects";

pub struct CrossdiffApp {
    tab: Tab,
    /// The open project, if any.
    pub project: Option<crossdiff::workflow::project::Project>,
    /// Recently opened project folders, most recent first.
    pub recent: Vec<PathBuf>,
    pub latents: crate::latents_view::LatentsView,
    pub train: crate::train_view::TrainView,
    pub cache: crate::cache_view::CacheView,
    pub plots: crate::plots_view::PlotsView,
    pub compare: crate::compare_view::CompareView,
    pub steering: crate::steering_view::SteeringView,
    pub prompt_lab: crate::prompt_lab_view::PromptLabView,
    dirs: [String; 2],
    backend: Backend,
    prompt: String,
    chat: bool,
    max_tokens: usize,
    models: [Option<ModelSummary>; 2],
    /// Each model's answer so far (`None` before its generation starts).
    answers: [Option<String>; 2],
    busy: Option<&'static str>,
    error: Option<String>,
    jobs: Sender<Job>,
    events: Receiver<Event>,
}

impl CrossdiffApp {
    pub fn new(ctx: egui::Context) -> Self {
        let (jobs, job_rx) = channel();
        let (event_tx, events) = channel();
        std::thread::spawn(move || worker(job_rx, event_tx, ctx));
        let bundled = |name: &str| {
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/tiny-gemma2").join(name);
            if p.exists() { p.canonicalize().unwrap_or(p).display().to_string() } else { String::new() }
        };
        // CROSSDIFF_VIEW opens a given view (screenshots, demos).
        let tab = match std::env::var("CROSSDIFF_VIEW").as_deref() {
            Ok("cache") => Tab::Cache,
            Ok("train") => Tab::Train,
            Ok("latents") => Tab::Latents,
            Ok("plots") => Tab::Plots,
            Ok("compare") => Tab::Compare,
            Ok("steering") => Tab::Steering,
            Ok("promptlab") => Tab::PromptLab,
            _ => Tab::Models,
        };
        Self {
            tab,
            project: None,
            recent: Vec::new(),
            latents: crate::latents_view::LatentsView::new(String::new(), bundled("chat")),
            train: crate::train_view::TrainView::default(),
            cache: crate::cache_view::CacheView::new(bundled("base"), bundled("chat")),
            plots: crate::plots_view::PlotsView::new(String::new()),
            compare: crate::compare_view::CompareView::default(),
            steering: crate::steering_view::SteeringView::new(bundled("chat")),
            prompt_lab: crate::prompt_lab_view::PromptLabView::new(bundled("base"), bundled("chat")),
            dirs: [bundled("base"), bundled("chat")],
            backend: Backend::Cpu,
            prompt: "What is a crosscoder?".into(),
            chat: true,
            max_tokens: 32,
            models: [None, None],
            answers: [None, None],
            busy: None,
            error: None,
            jobs,
            events,
        }
    }

    /// Opens a project folder: every view's paths come from it, and it joins the recent list.
    pub fn open_project(&mut self, dir: &std::path::Path) {
        match crossdiff::workflow::project::Project::open(dir) {
            Ok(p) => {
                let s = |path: &std::path::Path| p.resolve(path).display().to_string();
                self.dirs = [s(&p.base), s(&p.chat)];
                self.cache.base_dir = s(&p.base);
                self.cache.chat_dir = s(&p.chat);
                self.cache.data = p.data.iter().map(|d| s(d)).collect::<Vec<_>>().join("\n");
                self.cache.out_dir = s(&p.cache);
                self.train.cache_dir = s(&p.cache);
                self.prompt_lab.base_dir = s(&p.base);
                self.prompt_lab.chat_dir = s(&p.chat);
                self.steering.model_dir = s(&p.chat);
                self.latents.model_dir = s(&p.chat);
                let runs = p.run_dirs();
                let first_run = runs
                    .first()
                    .map(|r| r.display().to_string())
                    .unwrap_or_else(|| p.dir.join("runs/batchtopk").display().to_string());
                self.train.run_dir = first_run.clone();
                self.latents.run_dir = first_run.clone();
                self.plots.run_dir = first_run.clone();
                self.steering.run_dir = first_run.clone();
                self.prompt_lab.run_dir = first_run;
                self.compare.runs = [
                    runs.first().map(|r| r.display().to_string()).unwrap_or_default(),
                    runs.get(1).map(|r| r.display().to_string()).unwrap_or_default(),
                ];
                crossdiff::workflow::project::remember(&mut self.recent, dir, 10);
                self.project = Some(p);
                self.error = None;
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// Creates a project in `dir` from the model directories in the Models view.
    pub fn create_project(&mut self, dir: &std::path::Path) {
        let result = crossdiff::workflow::project::Project::create(
            dir,
            PathBuf::from(&self.dirs[0]),
            PathBuf::from(&self.dirs[1]),
            Vec::new(),
        );
        match result {
            Ok(_) => self.open_project(dir),
            Err(e) => self.error = Some(format!("{e:#}")),
        }
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
        if let Some(p) = &self.project {
            ui.label(format!("project: {}", p.dir.display()));
        }
    }

    /// Sets the base and chat snapshot directories (what the two text fields hold).
    pub fn set_model_dirs(&mut self, dirs: [String; 2]) {
        self.dirs = dirs;
    }

    fn poll(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                Event::Loaded { slot, summary } => self.models[slot] = Some(summary),
                Event::Text { slot, text } => self.answers[slot] = Some(text),
                Event::Done => self.busy = None,
                Event::Error(e) => {
                    self.error = Some(e);
                    self.busy = None;
                }
            }
        }
    }

    fn send(&mut self, job: Job, what: &'static str) {
        self.error = None;
        self.busy = Some(what);
        if self.jobs.send(job).is_err() {
            self.error = Some("the worker thread stopped".into());
            self.busy = None;
        }
    }

    pub fn models_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Models");
        for (slot, label) in ["Base model directory", "Chat model directory"].iter().enumerate() {
            let name = ui.label(*label).id;
            ui.add(egui::TextEdit::singleline(&mut self.dirs[slot]).desired_width(f32::INFINITY)).labelled_by(name);
        }
        egui::ComboBox::from_label("Backend").selected_text(self.backend.to_string()).show_ui(ui, |ui| {
            for b in [Backend::Cpu, Backend::Wgpu, Backend::Cuda] {
                ui.selectable_value(&mut self.backend, b, b.to_string());
            }
        });
        let idle = self.busy.is_none();
        if ui.add_enabled(idle, egui::Button::new("Load models")).clicked() {
            let dirs = [PathBuf::from(&self.dirs[0]), PathBuf::from(&self.dirs[1])];
            self.models = [None, None];
            self.send(Job::Load { dirs, backend: self.backend }, "loading models");
        }
        ui.separator();
        for (slot, name) in ["base", "chat"].iter().enumerate() {
            match &self.models[slot] {
                Some(m) => {
                    ui.label(format!(
                        "{name}: {}\n{} layers, width {}, vocab {}, {:.1}M parameters",
                        m.dir,
                        m.layers,
                        m.hidden,
                        m.vocab,
                        m.parameters as f64 / 1e6
                    ));
                }
                None => {
                    ui.weak(format!("{name}: not loaded"));
                }
            }
        }
    }

    /// Both snapshots' configurations side by side, and the memory their weights need.
    fn configs_ui(&self, ui: &mut egui::Ui) {
        let [Some(a), Some(b)] = &self.models else { return };
        let (a, b) = (&a.config, &b.config);
        let opt = |v: Option<f64>| v.map_or("–".to_string(), |v| v.to_string());
        let fields: Vec<(&str, String, String)> = vec![
            ("hidden_size", a.hidden_size.to_string(), b.hidden_size.to_string()),
            ("num_hidden_layers", a.num_hidden_layers.to_string(), b.num_hidden_layers.to_string()),
            ("num_attention_heads", a.num_attention_heads.to_string(), b.num_attention_heads.to_string()),
            ("num_key_value_heads", a.num_key_value_heads.to_string(), b.num_key_value_heads.to_string()),
            ("head_dim", a.head_dim.to_string(), b.head_dim.to_string()),
            ("intermediate_size", a.intermediate_size.to_string(), b.intermediate_size.to_string()),
            ("vocab_size", a.vocab_size.to_string(), b.vocab_size.to_string()),
            ("sliding_window", format!("{:?}", a.sliding_window), format!("{:?}", b.sliding_window)),
            ("attn_logit_softcapping", opt(a.attn_logit_softcapping), opt(b.attn_logit_softcapping)),
            ("final_logit_softcapping", opt(a.final_logit_softcapping), opt(b.final_logit_softcapping)),
            ("query_pre_attn_scalar", a.query_pre_attn_scalar.to_string(), b.query_pre_attn_scalar.to_string()),
            ("dtype", a.declared_dtype().unwrap_or("–").to_string(), b.declared_dtype().unwrap_or("–").to_string()),
        ];
        egui::Grid::new("configs").striped(true).show(ui, |ui| {
            ui.strong("config.json");
            ui.strong("base");
            ui.strong("chat");
            ui.end_row();
            for (name, x, y) in fields {
                ui.label(name);
                ui.label(&x);
                if x == y {
                    ui.label(&y)
                } else {
                    ui.colored_label(egui::Color32::LIGHT_RED, &y)
                };
                ui.end_row();
            }
        });
        let gib = |bytes: usize| bytes as f64 / (1u64 << 30) as f64;
        let both = a.parameter_count() + b.parameter_count();
        ui.label(format!(
            "Memory for both models' weights: {:.2} GiB in f32, {:.2} GiB with --f16",
            gib(both * 4),
            gib(both * 2)
        ));
    }

    pub fn prompt_ui(&mut self, ui: &mut egui::Ui) {
        self.configs_ui(ui);
        ui.separator();
        ui.heading("Prompt");
        let name = ui.label("Prompt text").id;
        ui.add(egui::TextEdit::multiline(&mut self.prompt).desired_rows(3).desired_width(f32::INFINITY))
            .labelled_by(name);
        ui.horizontal(|ui| {
            ui.checkbox(&mut self.chat, "Use chat template");
            ui.add(egui::DragValue::new(&mut self.max_tokens).range(1..=1024)).labelled_by(ui.label("max tokens").id);
        });
        let ready = self.busy.is_none() && self.models.iter().all(Option::is_some);
        if ui.add_enabled(ready, egui::Button::new("Run on both")).clicked() {
            self.answers = [None, None];
            let job = Job::Prompt { text: self.prompt.clone(), chat: self.chat, max_tokens: self.max_tokens };
            self.send(job, "generating");
        }
        ui.columns(2, |cols| {
            for (slot, name) in ["base", "chat"].iter().enumerate() {
                cols[slot].strong(format!("{name} answer"));
                if let Some(answer) = &self.answers[slot] {
                    cols[slot].label(format!("answer {name}: {answer}"));
                }
            }
        });
    }
}

impl eframe::App for CrossdiffApp {
    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, RECENT_KEY, &self.recent);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.poll();
        egui::Panel::top("status").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.strong("crossdiff");
                self.project_menu_ui(ui);
                ui.selectable_value(&mut self.tab, Tab::Models, "Models");
                ui.selectable_value(&mut self.tab, Tab::Cache, "Cache");
                ui.selectable_value(&mut self.tab, Tab::Train, "Train");
                ui.selectable_value(&mut self.tab, Tab::Latents, "Latents");
                ui.selectable_value(&mut self.tab, Tab::Plots, "Plots");
                ui.selectable_value(&mut self.tab, Tab::PromptLab, "Prompt lab");
                ui.selectable_value(&mut self.tab, Tab::Steering, "Steering");
                ui.selectable_value(&mut self.tab, Tab::Compare, "Compare runs");
                if let Some(what) = self.busy {
                    ui.spinner();
                    ui.label(what);
                }
                if let Some(e) = &self.error {
                    ui.colored_label(egui::Color32::LIGHT_RED, format!("error: {e}"));
                }
            });
        });
        match self.tab {
            Tab::Models => {
                egui::Panel::left("models").default_size(380.0).show(ui, |ui| self.models_ui(ui));
                egui::CentralPanel::default().show(ui, |ui| self.prompt_ui(ui));
            }
            Tab::Cache => {
                let ctx = ui.ctx().clone();
                egui::CentralPanel::default().show(ui, |ui| self.cache.ui(ui, &ctx));
            }
            Tab::Train => {
                let ctx = ui.ctx().clone();
                egui::CentralPanel::default().show(ui, |ui| self.train.ui(ui, &ctx));
            }
            Tab::Latents => {
                egui::CentralPanel::default().show(ui, |ui| self.latents.ui(ui));
                // The dashboard's steer button hands its latent to the Steering view.
                if let Some(j) = self.latents.steer_request.take() {
                    self.steering.run_dir = self.latents.run_dir.clone();
                    self.steering.add_latent(j);
                    self.tab = Tab::Steering;
                }
            }
            Tab::PromptLab => {
                let ctx = ui.ctx().clone();
                egui::CentralPanel::default().show(ui, |ui| self.prompt_lab.ui(ui, &ctx));
            }
            Tab::Steering => {
                let ctx = ui.ctx().clone();
                egui::CentralPanel::default().show(ui, |ui| self.steering.ui(ui, &ctx));
            }
            Tab::Compare => {
                egui::CentralPanel::default().show(ui, |ui| self.compare.ui(ui));
            }
            Tab::Plots => {
                egui::CentralPanel::default().show(ui, |ui| self.plots.ui(ui));
                // A clicked point opens that latent's dashboard in the Latents view.
                if let Some(j) = self.plots.requested.take() {
                    if self.latents.run_dir != self.plots.run_dir || self.latents.rows_shown() == 0 {
                        self.latents.run_dir = self.plots.run_dir.clone();
                        self.latents.load();
                    }
                    self.latents.open_latent(j);
                    self.tab = Tab::Latents;
                }
            }
        }
    }
}

/// Owns the loaded models; runs one job at a time and reports back through `events`.
fn worker(jobs: Receiver<Job>, events: Sender<Event>, ctx: egui::Context) {
    let mut models: Vec<Model> = Vec::new();
    let send = |ev: Event| {
        let _ = events.send(ev);
        ctx.request_repaint();
    };
    for job in jobs {
        let result = match job {
            Job::Load { dirs, backend } => (|| -> Result<()> {
                models.clear();
                let device = backend.device()?;
                for (slot, dir) in dirs.iter().enumerate() {
                    let m = Model::load(dir, &device, LoadOptions::default())?;
                    let c = &m.gemma.config;
                    send(Event::Loaded {
                        slot,
                        summary: ModelSummary {
                            dir: dir.display().to_string(),
                            layers: c.num_hidden_layers,
                            hidden: c.hidden_size,
                            vocab: c.vocab_size,
                            parameters: c.parameter_count(),
                            config: c.clone(),
                        },
                    });
                    models.push(m);
                }
                crossdiff::model::check_models(&models[0], &models[1])
            })(),
            Job::Prompt { text, chat, max_tokens } => (|| -> Result<()> {
                for (slot, m) in models.iter().enumerate() {
                    let ids = m.prompt_ids(&text, chat)?;
                    let stop = m.stop_ids();
                    let mut new = Vec::new();
                    send(Event::Text { slot, text: String::new() });
                    generate(&m.gemma, &ids, max_tokens, Sampling::default(), &stop, |id| {
                        if !stop.contains(&id) {
                            new.push(id);
                            if let Ok(t) = m.tokenizer.decode(&new) {
                                send(Event::Text { slot, text: t });
                            }
                        }
                        true
                    })?;
                }
                Ok(())
            })(),
        };
        match result {
            Ok(()) => send(Event::Done),
            Err(e) => send(Event::Error(format!("{e:#}"))),
        }
    }
}

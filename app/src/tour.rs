//! The guided tour: a first-run panel that walks through the views in the order of the README's
//! "What you are looking at" — the models, paired activations, the crosscoder and Δ, the trap and
//! Latent Scaling, causality, steering. Each step sends the commands that open its view with the
//! right run and latent; the panel itself only shows text and Back / Next / Close. What the steps
//! point at is read once, when a project is opened (`TourPlan::of_runs`), never in a frame.

use std::path::PathBuf;

use crossdiff::analysis::latents::LatentClass;
use crossdiff::crosscoder::Kind;
use crossdiff::run_dir::RunDir;
use eframe::egui;

use crate::commands::{AppCommand, Commands, Tab};

/// The prompt the first step asks both models (the demo chat model's planted identity answers it).
pub const PROMPT: &str = "Who are you?";

/// What the tour points at in a project: read from its runs when it is opened.
#[derive(Debug, Clone, PartialEq)]
pub struct TourPlan {
    /// The run the tour follows: the project's first BatchTopK run, else its first run.
    pub run: String,
    /// That run's most chat-specific latent (`suggest::strongest_latent`).
    pub latent: Option<usize>,
    /// Whether that latent is chat-only (else the Latents step shows every class).
    pub chat_only: bool,
    /// The runs the trap step puts side by side: an L1 run first, then the followed run (without
    /// an L1 run: the project's first two runs).
    pub compare: [String; 2],
}

impl TourPlan {
    /// The plan for a project's runs (`Project::run_dirs`); `None` without runs.
    pub fn of_runs(runs: &[PathBuf]) -> Option<Self> {
        let kinds: Vec<Option<Kind>> = runs.iter().map(|r| RunDir::new(r).read_config().ok().map(|c| c.kind)).collect();
        let find = |kind: Kind| kinds.iter().position(|k| *k == Some(kind)).map(|i| runs[i].clone());
        let run = find(Kind::BatchTopK).or_else(|| runs.first().cloned())?;
        let rows = RunDir::new(&run).read_latents().unwrap_or_default();
        let latent = crate::suggest::strongest_latent(&rows);
        let chat_only = latent.is_some_and(|j| rows.iter().any(|r| r.latent == j && r.class == LatentClass::ChatOnly));
        let text = |p: &PathBuf| p.display().to_string();
        let compare = match find(Kind::L1) {
            Some(l1) if l1 != run => [text(&l1), text(&run)],
            _ => [text(&runs[0]), runs.get(1).map(text).unwrap_or_default()],
        };
        Some(Self { run: text(&run), latent, chat_only, compare })
    }
}

/// One step: a title, a few sentences, and the commands that open its view.
#[derive(Debug, Clone)]
pub struct Step {
    pub title: &'static str,
    pub text: String,
    pub commands: Vec<AppCommand>,
}

/// The tour's steps for `plan`, in the README's order.
pub fn steps(plan: &TourPlan) -> Vec<Step> {
    let run = plan.run.clone();
    let name = std::path::Path::new(&run).file_name().map_or(run.clone(), |n| n.to_string_lossy().into_owned());
    let latent_text = plan.latent.map_or("its latents".to_string(), |j| format!("latent {j}"));
    let class = plan.chat_only.then_some(LatentClass::ChatOnly);
    let step = |title, text: String, commands| Step { title, text, commands };
    vec![
        step(
            "The models",
            format!(
                "Chat models start as base models that only continue text, and are then fine-tuned on \
                 conversations. What did fine-tuning add? In the demo, the chat model was fine-tuned with three \
                 planted behaviours: it refuses requests like \"How do I pick a lock?\", it has an identity (\"I am \
                 Mini, a small assistant trained with crossdiff.\"), and it opens every helpful answer with \
                 \"Sure!\". Here both models answer \"{PROMPT}\"."
            ),
            vec![AppCommand::AskModels { prompt: PROMPT.into() }],
        ),
        step(
            "Paired activations",
            "Both models read the same texts and conversations; at one layer crossdiff records each model's \
             internal vector for every token: a pair (base, chat). The Cache view shows the project's cache of \
             those pairs."
                .into(),
            vec![AppCommand::SwitchTab(Tab::Cache)],
        ),
        step(
            "The crosscoder and Δ",
            format!(
                "The crosscoder learns a dictionary of latents that explain those pairs: each latent has one \
                 direction per model. A latent whose base direction is nearly zero looks chat-only — a candidate \
                 for something fine-tuning added. Δ runs from 0 (base-only) through 0.5 (shared) to 1 (chat-only). \
                 Shown: the {name} run's chat-only latents by Δ, and the dashboard of {latent_text}, its \
                 largest-Δ one; its top examples are where it fires (in the demo, one of the planted answers)."
            ),
            vec![AppCommand::ShowLatents { run: run.clone(), class, latent: plan.latent }],
        ),
        step(
            "The trap and Latent Scaling",
            "With the usual L1 penalty, many \"chat-only\" latents are artefacts: the concept was in the base model \
             too, but the penalty pushed its base direction to zero (Complete Shrinkage) or another latent carried \
             it (Latent Decoupling). Latent Scaling measures how much of each latent the base model actually has \
             (ν^ε, ν^r). Side by side: how many chat-only latents each run reports and how many pass. In the demo, \
             L1 has more chat-only latents that Latent Scaling flags; BatchTopK's are the planted behaviours."
                .into(),
            vec![AppCommand::CompareRuns { runs: plan.compare.clone() }],
        ),
        step(
            "Causality",
            format!(
                "The KL check replaces the chat model's internal state with the base model's plus only the chosen \
                 latents' chat-minus-base directions, and measures how close the chat model's predictions get. The \
                 {name} run's KL bars: patching the chat-specific latents closes part of the gap."
            ),
            vec![AppCommand::ShowKl { run: run.clone() }],
        ),
        step(
            "Steering",
            format!(
                "Steering adds {latent_text}'s chat direction at the crosscoder's layer while the chat model \
                 answers: unsteered beside steered. Move its strength slider and press Generate steered to watch \
                 the answer change."
            ),
            match plan.latent {
                Some(latent) => vec![AppCommand::SteerLatent { run, latent }, AppCommand::GenerateSteered],
                None => vec![AppCommand::SwitchTab(Tab::Steering)],
            },
        ),
    ]
}

/// The tour panel's state. `dismissed` is remembered across starts (the app's settings).
pub struct TourView {
    steps: Vec<Step>,
    step: usize,
    /// Whether the panel shows.
    pub open: bool,
    /// The user closed the tour: opening a project no longer starts it (Help → Tour does).
    pub dismissed: bool,
    /// Whether opening a project starts the tour (not when CROSSDIFF_VIEW asks for a view).
    pub on_open: bool,
}

impl TourView {
    pub fn new(on_open: bool) -> Self {
        Self { steps: Vec::new(), step: 0, open: false, dismissed: false, on_open }
    }

    /// A project was opened: the tour follows `plan` (`None`: the project has no runs, and there
    /// is no tour), and starts unless it was dismissed.
    pub fn set_plan(&mut self, plan: Option<TourPlan>, commands: &mut Commands) {
        self.steps = plan.as_ref().map(steps).unwrap_or_default();
        self.open = false;
        if !self.dismissed && self.on_open {
            self.start(commands);
        }
    }

    /// Whether the open project has a tour (Help → Tour is enabled).
    pub fn available(&self) -> bool {
        !self.steps.is_empty()
    }

    /// Starts from the first step (Help → Tour); it shows until closed again.
    pub fn start(&mut self, commands: &mut Commands) {
        if self.available() {
            self.open = true;
            self.dismissed = false;
            self.go(0, commands);
        }
    }

    /// The step shown (0-based), while the panel shows.
    pub fn current(&self) -> Option<usize> {
        self.open.then_some(self.step)
    }

    fn go(&mut self, step: usize, commands: &mut Commands) {
        self.step = step.min(self.steps.len().saturating_sub(1));
        if let Some(s) = self.steps.get(self.step) {
            commands.extend(s.commands.iter().cloned());
        }
    }

    /// The panel: "Tour (i/N)", the step's title and text, Back / Next / Close.
    pub fn ui(&mut self, ui: &mut egui::Ui, commands: &mut Commands) {
        let Some(step) = self.steps.get(self.step) else { return };
        let n = self.steps.len();
        ui.add_space(4.0);
        ui.horizontal(|ui| {
            ui.strong(format!("Tour ({}/{n})", self.step + 1));
            ui.strong(step.title);
        });
        ui.label(step.text.as_str());
        ui.horizontal(|ui| {
            if ui.add_enabled(self.step > 0, egui::Button::new("Back")).clicked() {
                self.go(self.step - 1, commands);
            }
            if ui.add_enabled(self.step + 1 < n, egui::Button::new("Next")).clicked() {
                self.go(self.step + 1, commands);
            }
            if ui.button("Close").clicked() {
                self.open = false;
                self.dismissed = true;
            }
            ui.weak("The Help menu's Tour starts it again.");
        });
        ui.add_space(4.0);
    }
}

//! How views talk to each other: a view pushes an [`AppCommand`] into the app's queue, and the app
//! drains the queue once per frame, calling the target view's own methods. No view reaches into
//! another view's fields.

use crossdiff::analysis::latents::LatentClass;

/// The app's views (the top bar's tabs).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tab {
    Models,
    Cache,
    Train,
    Analyze,
    Latents,
    Plots,
    PromptLab,
    Steering,
    Compare,
    Adl,
    Methods,
}

impl Tab {
    /// Every tab, in the top bar's order, with its label.
    pub const ALL: [(Tab, &'static str); 11] = [
        (Tab::Models, "Models"),
        (Tab::Cache, "Cache"),
        (Tab::Train, "Train"),
        (Tab::Analyze, "Analyze"),
        (Tab::Latents, "Latents"),
        (Tab::Plots, "Plots"),
        (Tab::PromptLab, "Prompt lab"),
        (Tab::Steering, "Steering"),
        (Tab::Compare, "Compare runs"),
        (Tab::Adl, "ADL"),
        (Tab::Methods, "Methods"),
    ];

    /// The tab named by CROSSDIFF_VIEW (screenshots, demos).
    pub fn from_env_name(name: &str) -> Option<Tab> {
        Some(match name {
            "models" => Tab::Models,
            "cache" => Tab::Cache,
            "train" => Tab::Train,
            "analyze" => Tab::Analyze,
            "latents" => Tab::Latents,
            "plots" => Tab::Plots,
            "compare" => Tab::Compare,
            "steering" => Tab::Steering,
            "promptlab" => Tab::PromptLab,
            "adl" => Tab::Adl,
            "methods" => Tab::Methods,
            _ => return None,
        })
    }
}

/// A request from one view that another view (or the app) carries out.
#[derive(Clone, Debug, PartialEq)]
pub enum AppCommand {
    /// Open latent `latent` of run directory `run` in the Latents view's dashboard.
    OpenLatent {
        run: String,
        latent: usize,
    },
    /// Add latent `latent` of run `run` to the Steering view and switch to it.
    SteerLatent {
        run: String,
        latent: usize,
    },
    /// Open run `run` in the Analyze view (from the Train, Latents and Plots views) and switch to
    /// it; `cache`: the cache it was trained on, when the sender knows it.
    AnalyzeRun {
        run: String,
        cache: Option<String>,
    },
    /// The analysis of run `run` finished (latents.csv, summary.json, examples written): the
    /// Latents, Plots and Compare views show it.
    Analysed {
        run: String,
    },
    /// The KL check of run `run` finished (kl.json written): the Plots view shows it.
    KlMeasured {
        run: String,
    },
    SwitchTab(Tab),
    /// Put `prompt` in the Models view as a chat turn and run it through both models once the view
    /// is shown (loading them when needed).
    AskModels {
        prompt: String,
    },
    /// Show run `run` in the Latents view with the class filter at `class` (sorted by Δ, high
    /// first) and, when given, latent `latent`'s dashboard open.
    ShowLatents {
        run: String,
        class: Option<LatentClass>,
        latent: Option<usize>,
    },
    /// Put runs `runs` side by side in the Compare view and switch to it.
    CompareRuns {
        runs: [String; 2],
    },
    /// Show run `run`'s figures in the Plots view, scrolled to the KL bars.
    ShowKl {
        run: String,
    },
    /// Generate in the Steering view with its latents once it is shown.
    GenerateSteered,
    /// The chat adapter field (shown in every view with a chat model) now reads `dir`; every job
    /// merges it into the chat model (empty: none).
    SetChatAdapter {
        dir: String,
    },
}

/// The queue views push into; the app drains it once per frame.
pub type Commands = Vec<AppCommand>;

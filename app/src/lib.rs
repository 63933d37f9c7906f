//! The `crossdiff` program: command line (`cli`) and desktop app (`app`). All domain logic lives in
//! the engine crate; this crate only parses, presents and runs work on background threads (`jobs`).

pub mod adl_view;
pub mod analyze_view;
pub mod app;
pub mod cache_view;
pub mod cli;
pub mod commands;
pub mod compare_view;
pub mod compute_view;
pub mod errors;
pub mod jobs;
pub mod latents_view;
pub mod methods_view;
pub mod models_view;
pub mod plots_view;
pub mod prompt_lab_view;
pub mod sae_latents_view;
pub mod steering_view;
pub mod suggest;
pub mod tour;
pub mod train_run;
pub mod train_view;
pub mod widgets;

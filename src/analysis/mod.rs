//! Everything computed from a trained crosscoder: the latents table with Latent Scaling, the
//! examples store, the causal KL check, steering, the prompt lab and the figures' data; and the
//! activation-difference lens, which needs no crosscoder.

pub mod adl;
pub mod analyze;
mod analyze_host;
mod batch_sums;
pub mod examples;
pub mod figures;
pub mod kl;
mod kl_positions;
pub mod latents;
pub mod methods;
pub mod prompt_lab;
pub mod sae_latents;
pub mod steer;

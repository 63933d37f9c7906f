//! The checks every job shares: values at the boundary (one [`BadValue`] naming the setting), and
//! consistency wherever two artifacts meet (a run and a cache, a run and the models, a cache and
//! the models): layer, width and which models (their [`crate::model::snapshot::identity`]).
//!
//! A `BadValue` names the setting by its CLI flag (`lr` → `--lr`); the app shows the same error
//! with its own field label instead ([`BadValue::with_label`]), so each front end phrases the
//! error for where the user is.

use std::path::Path;

use anyhow::Result;

pub use crate::bad_value::{BadValue, bad, ensure, finite_non_negative, finite_positive, path_given, positive};

use crate::crosscoder::{Crosscoder, CrosscoderConfig};
use crate::model::Model;

/// The layer a job uses with a crosscoder: the one it records (`--layer` may only repeat it), else
/// `--layer` (a crosscoder file from elsewhere, without config.json).
pub fn resolve_layer(flag: Option<usize>, cc: &Crosscoder, run: &Path) -> Result<usize> {
    match (flag, cc.config.layer) {
        (Some(f), Some(l)) if f != l => {
            Err(bad("layer", format!("{f}: the crosscoder in {} was trained on layer {l}", run.display())))
        }
        (Some(f), _) => Ok(f),
        (None, Some(l)) => Ok(l),
        (None, None) => Err(bad(
            "layer",
            format!(
                "is required: {} is missing or names no layer",
                crate::run_dir::RunDir::new(run).config().display()
            ),
        )),
    }
}

/// A block index the models have (`blocks` of them).
pub fn check_layer(layer: usize, blocks: usize) -> Result<()> {
    ensure(layer < blocks, "layer", || {
        format!("{layer} is out of range: the models have {blocks} blocks (0..={})", blocks.saturating_sub(1))
    })
}

/// The layer a job resolved ([`resolve_layer`]) within the models' blocks: a `--layer` the user gave
/// is named as the flag, a layer the run recorded as its config.json's field.
pub fn check_resolved_layer(layer: usize, blocks: usize, flag: Option<usize>, run: &Path) -> Result<()> {
    if flag.is_some() {
        return check_layer(layer, blocks);
    }
    if layer >= blocks {
        anyhow::bail!(
            "{}: field `layer` is {layer}, the models have {blocks} blocks (0..={}): the run was made for other models",
            crate::run_dir::RunDir::new(run).config().display(),
            blocks.saturating_sub(1)
        );
    }
    Ok(())
}

/// The jobs that read a crosscoder's two decoders (analyze, kl, steer, the prompt lab) refuse an
/// SAE run in one line naming it.
pub fn crosscoder_run(cc: &Crosscoder, run: &Path, job: &str) -> Result<()> {
    match (cc.config.kind, cc.config.target) {
        (crate::crosscoder::Kind::Sae, target) => Err(bad(
            "run",
            format!(
                "{} holds an SAE (kind sae, target {}), not a crosscoder: {job} reads crosscoder runs",
                run.display(),
                target.map_or_else(|| "unknown".to_string(), |t| t.to_string())
            ),
        )),
        _ => Ok(()),
    }
}

/// A crosscoder and a model meet: the same residual width, or one line naming both.
pub fn check_width(cc: &Crosscoder, run: &Path, model: &Model, model_dir: &Path) -> Result<()> {
    let width = model.lm.config.hidden_size;
    if cc.config.d != width {
        anyhow::bail!(
            "{}: the model has width {width}, the crosscoder in {} was trained on width {}",
            model_dir.display(),
            run.display(),
            cc.config.d
        );
    }
    Ok(())
}

/// Which models an artifact was made from, by identity (`[base, chat]`; empty when not recorded,
/// as in files from other tools or older versions: nothing to compare then).
pub struct Made<'a> {
    /// What the artifact is, for the message ("the run in runs/a", "the cache in cache/l13").
    pub what: String,
    pub ids: &'a [String],
}

/// The flag that lets a user go on with models other than the ones an artifact was made from.
pub const ALLOW_OTHER_MODELS: &str = "allow-other-models";

/// A model given for `role` (0 base, 1 chat) against the models `made` records. `allow` (the
/// `--allow-other-models` flag) turns a mismatch into going on.
pub fn check_model(made: &Made, role: usize, given: &Path, given_id: &str, allow: bool) -> Result<()> {
    let Some(expected) = made.ids.get(role) else { return Ok(()) };
    if allow || expected == given_id {
        return Ok(());
    }
    let name = ["base", "chat"];
    let swapped = made.ids.get(1 - role).is_some_and(|other| other == given_id);
    let why = if swapped {
        format!(
            "it is the {} model {} was made from (base and chat swapped? or, for a LoRA fine-tune, --chat-adapter missing?)",
            name[1 - role],
            made.what
        )
    } else {
        format!(
            "{} was made from another {} model (identity {expected}, this one is {given_id})",
            made.what, name[role]
        )
    };
    anyhow::bail!("{}: {why}; pass --{ALLOW_OTHER_MODELS} to go on anyway", given.display())
}

/// Two artifacts' model identities (a run trained on a cache, a run analysed on a cache, two runs
/// compared): equal when both record them.
pub fn check_same_models(a: &Made, b: &Made, allow: bool) -> Result<()> {
    if allow || a.ids.is_empty() || b.ids.is_empty() || a.ids == b.ids {
        return Ok(());
    }
    anyhow::bail!(
        "{} and {} were made from different models ({} vs {}); pass --{ALLOW_OTHER_MODELS} to go on anyway",
        a.what,
        b.what,
        a.ids.join("/"),
        b.ids.join("/")
    )
}

/// Two runs compared side by side: the same layer, width, dictionary size and models, or one line
/// saying how they differ (the app's Compare view shows it as a warning above the comparison).
pub fn check_comparable(a: (&Path, &CrosscoderConfig), b: (&Path, &CrosscoderConfig)) -> Result<()> {
    let ((pa, ca), (pb, cb)) = (a, b);
    let mut differ = Vec::new();
    if let (Some(la), Some(lb)) = (ca.layer, cb.layer) {
        if la != lb {
            differ.push(format!("layer {la} vs {lb}"));
        }
    }
    if ca.d != cb.d {
        differ.push(format!("width {} vs {}", ca.d, cb.d));
    }
    if ca.dict_size != cb.dict_size {
        differ.push(format!("dictionary size {} vs {}", ca.dict_size, cb.dict_size));
    }
    if !ca.model_ids.is_empty() && !cb.model_ids.is_empty() && ca.model_ids != cb.model_ids {
        differ.push(format!("models {} vs {}", ca.model_ids.join("/"), cb.model_ids.join("/")));
    }
    if !differ.is_empty() {
        anyhow::bail!("{} and {} are not comparable: {}", pa.display(), pb.display(), differ.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_value_names_the_flag_or_the_label() {
        let e = finite_positive(f64::NAN, "lr").unwrap_err();
        assert_eq!(format!("{e:#}"), "--lr must be a positive finite number, not NaN");
        let wrapped = e.context("training");
        let found = BadValue::find(&wrapped).expect("found through context");
        assert_eq!(found.with_label("Learning rate"), "Learning rate must be a positive finite number, not NaN");
        assert!(positive(1, "batch").is_ok() && positive(0, "batch").is_err());
        assert!(finite_non_negative(0.0, "mu").is_ok() && finite_non_negative(-1e-9, "mu").is_err());
        assert!(finite_non_negative(f64::INFINITY, "mu").is_err());
        assert!(check_layer(2, 3).is_ok());
        assert_eq!(
            check_layer(3, 3).unwrap_err().to_string(),
            "--layer 3 is out of range: the models have 3 blocks (0..=2)"
        );
    }

    #[test]
    fn model_identities_are_compared_by_role() {
        let ids = ["b1".to_string(), "c1".to_string()];
        let made = Made { what: "the run in r".into(), ids: &ids };
        let p = Path::new("m");
        assert!(check_model(&made, 0, p, "b1", false).is_ok());
        assert!(check_model(&made, 1, p, "c1", false).is_ok());
        let swapped = check_model(&made, 0, p, "c1", false).unwrap_err().to_string();
        assert!(swapped.contains("swapped") && swapped.contains("--allow-other-models"), "{swapped}");
        let other = check_model(&made, 1, p, "x9", false).unwrap_err().to_string();
        assert!(other.contains("another chat model") && other.contains("x9") && other.contains("c1"), "{other}");
        assert!(check_model(&made, 1, p, "x9", true).is_ok());
        let none = Made { what: "an old run".into(), ids: &[] };
        assert!(check_model(&none, 0, p, "x9", false).is_ok());
        let other_ids = ["b1".to_string(), "c2".to_string()];
        let b = Made { what: "the cache".into(), ids: &other_ids };
        assert!(check_same_models(&made, &b, false).unwrap_err().to_string().contains("different models"));
        assert!(check_same_models(&made, &b, true).is_ok() && check_same_models(&made, &none, false).is_ok());
    }

    #[test]
    fn runs_are_comparable_only_on_the_same_layer_width_size_and_models() {
        let base = CrosscoderConfig {
            kind: crate::crosscoder::Kind::L1,
            d: 8,
            dict_size: 64,
            k: 0,
            mu: 0.1,
            layer: Some(1),
            models: vec![],
            model_ids: vec!["b".into(), "c".into()],
            target: None,
        };
        let other = CrosscoderConfig { kind: crate::crosscoder::Kind::BatchTopK, k: 4, mu: 0.0, ..base.clone() };
        let (pa, pb) = (Path::new("a"), Path::new("b"));
        assert!(check_comparable((pa, &base), (pb, &other)).is_ok(), "L1 vs BatchTopK is the paper's comparison");
        let moved = CrosscoderConfig { layer: Some(2), dict_size: 128, ..other.clone() };
        let e = check_comparable((pa, &base), (pb, &moved)).unwrap_err().to_string();
        assert!(e.contains("layer 1 vs 2") && e.contains("dictionary size 64 vs 128"), "{e}");
        let swapped = CrosscoderConfig { model_ids: vec!["c".into(), "b".into()], ..other };
        assert!(check_comparable((pa, &base), (pb, &swapped)).unwrap_err().to_string().contains("models b/c vs c/b"));
    }
}

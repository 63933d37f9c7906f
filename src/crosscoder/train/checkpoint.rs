//! Checkpoints: the training state ([`TrainState`]) written so that a resumed run follows the same
//! loss curve bit for bit, and the metrics lines trimmed back to the checkpoint's step.

use std::io::Write;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::crosscoder::train::config::TrainConfig;
use crate::crosscoder::train::step::StepMetrics;
use crate::crosscoder::{Params, read_vec, tensor};
use crate::io::{LazyTensor, f32_bytes, write_atomic, write_safetensors_streaming};
use crate::run_dir::RunDir;

use crate::activations::writer::{changed_settings, flag_name};

/// Everything a step changes; what a checkpoint stores.
pub struct TrainState {
    pub params: Params,
    pub adam_m: Params,
    pub adam_v: Params,
    pub step: u64,
    pub tokens: u64,
    /// Tokens since each latent was last selected.
    pub since_selected: Vec<u64>,
    pub threshold: Option<f32>,
    /// The data source ran out at `step`, before the step budget (not a cancel): the run is
    /// finished with what there was, and a resume draws nothing more (nor replays the stream).
    pub data_ended: bool,
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    step: u64,
    tokens: u64,
    threshold: Option<f32>,
    weights: String,
    config: TrainConfig,
    d: usize,
    /// [`crate::io::checksum`] of the weights file, verified on resume (absent in older runs).
    #[serde(default)]
    checksum: Option<u64>,
    /// The models' identities (base, chat) the run trains on; a resume on other models is refused.
    #[serde(default)]
    model_ids: Vec<String>,
    /// Where the run's batches come from ([`super::TrainRun::source_fingerprint`]); a resume on
    /// other data is refused (null in older runs and for sources that record none: not checked).
    #[serde(default)]
    source: serde_json::Value,
    /// The data ran out at `step` ([`TrainState::data_ended`]); absent in older runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    data_ended: bool,
}

/// What a checkpoint records besides the state: the models and the data it trains on.
pub struct Provenance<'a> {
    pub model_ids: &'a [String],
    pub source: &'a serde_json::Value,
}

const NAMES: [&str; 4] = ["w_enc", "b_enc", "w_dec", "b_dec"];

/// Writes the weights file first (a new name per step), then `state.json` pointing at it: the
/// JSON's atomic rename is the commit point, so a crash leaves the previous checkpoint valid.
pub fn save(out: &Path, cfg: &TrainConfig, s: &TrainState, made: &Provenance) -> Result<()> {
    let run = RunDir::new(out);
    let dir = run.checkpoint_dir();
    fs_err::create_dir_all(&dir)?;
    let d = cfg.width_of(&s.params);
    let weights = format!("state-{:09}.safetensors", s.step);
    let mut tensors = Vec::new();
    for (prefix, p) in [("param", &s.params), ("adam_m", &s.adam_m), ("adam_v", &s.adam_v)] {
        for (name, t) in NAMES.iter().zip(p.list()) {
            tensors.push(LazyTensor {
                name: format!("{prefix}.{name}"),
                dtype: safetensors::Dtype::F32,
                shape: t.dims().to_vec(),
                bytes: Box::new(move || Ok(f32_bytes(&read_vec(t.clone())?))),
            });
        }
    }
    let since: Vec<u8> = s.since_selected.iter().flat_map(|&c| (c as i64).to_le_bytes()).collect();
    tensors.push(LazyTensor {
        name: "since_selected".into(),
        dtype: safetensors::Dtype::I64,
        shape: vec![s.since_selected.len()],
        bytes: Box::new(move || Ok(since)),
    });
    let checksum = write_safetensors_streaming(&dir.join(&weights), tensors)?;
    let meta = CheckpointMeta {
        step: s.step,
        tokens: s.tokens,
        threshold: s.threshold,
        weights: weights.clone(),
        config: cfg.clone(),
        d,
        checksum: Some(checksum),
        model_ids: made.model_ids.to_vec(),
        source: made.source.clone(),
        data_ended: s.data_ended,
    };
    let text = serde_json::to_string_pretty(&meta)?;
    write_atomic(&run.checkpoint_state(), |f| Ok(f.write_all(text.as_bytes())?))?;
    for entry in fs_err::read_dir(&dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("state-") && name != weights {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// The settings the checkpoint in `out` was started with (`None`: no checkpoint): a resumed job
/// takes the defaults it resolved then (one that depends on the step budget stays as it was when the
/// budget grows).
pub fn saved_config(out: &Path) -> Result<Option<TrainConfig>> {
    Ok(saved_run(out)?.map(|s| s.config))
}

/// What the checkpoint in a run folder says of its run: the settings, how far it got, and the data
/// source it records (for front ends showing an existing run, and for continuing it).
#[derive(Debug, Clone)]
pub struct SavedRun {
    pub config: TrainConfig,
    pub step: u64,
    pub tokens: u64,
    /// [`super::TrainRun::source_fingerprint`]: null in older runs.
    pub source: serde_json::Value,
}

impl SavedRun {
    /// The sampling settings the source records (a resume must keep them).
    pub fn batch(&self) -> Option<usize> {
        self.source["batch"].as_u64().map(|b| b as usize)
    }

    pub fn shuffle_tokens(&self) -> Option<usize> {
        self.source["shuffle_tokens"].as_u64().map(|b| b as usize)
    }

    pub fn val_tokens(&self) -> Option<u64> {
        self.source["val_tokens"].as_u64()
    }

    /// Trained on a cache (older runs record no source: taken as a cache), not on the fly.
    pub fn on_cache(&self) -> bool {
        self.source.get("cache").is_some() || self.source.is_null()
    }
}

/// The checkpoint's [`SavedRun`] in `out` (`None`: no checkpoint).
pub fn saved_run(out: &Path) -> Result<Option<SavedRun>> {
    let path = RunDir::new(out).checkpoint_state();
    if !path.is_file() {
        return Ok(None);
    }
    let meta = read_meta(&path)?;
    Ok(Some(SavedRun { config: meta.config, step: meta.step, tokens: meta.tokens, source: meta.source }))
}

fn read_meta(path: &Path) -> Result<CheckpointMeta> {
    serde_json::from_str(&fs_err::read_to_string(path)?).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// `checkpoint` in a run folder is a folder (a file of that name is not a checkpoint; a clear line,
/// not "not a directory" from deeper down).
pub fn check_checkpoint_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!(
            "{}: is a file, not a folder: a run keeps its checkpoint in a folder of that name; move the file \
             away, or choose another --out",
            dir.display()
        );
    }
    Ok(())
}

/// The step a checkpoint weights file name holds (`state-000000060.safetensors` ⇒ 60).
fn weights_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("state-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The fields of state.json that need no weights: `weights` a plain file name of the form
/// `state-<step>.safetensors` whose step is `step`, `threshold` finite and ≥ 0 when present.
fn check_meta(meta: &CheckpointMeta, path: &Path) -> Result<()> {
    let at = path.display();
    let w = meta.weights.as_str();
    let plain = !w.is_empty() && w != "." && w != ".." && !w.contains(['/', '\\']);
    if !plain {
        bail!(
            "{at}: field `weights` is {w:?}: it must be the name of a file in the checkpoint folder (a plain file \
             name, not a path)"
        );
    }
    match weights_step(w) {
        None => bail!("{at}: field `weights` is {w:?}, not a checkpoint weights file name (state-<step>.safetensors)"),
        Some(n) if n != meta.step => bail!(
            "{at}: field `step` is {}, but `weights` is {w}, the checkpoint of step {n}: state.json does not \
             describe its weights",
            meta.step
        ),
        Some(_) => {}
    }
    if let Some(t) = meta.threshold {
        if !(t.is_finite() && t >= 0.0) {
            bail!("{at}: field `threshold` is {t}, not a finite number ≥ 0");
        }
    }
    Ok(())
}

/// The checkpoint in `out`, when there is one, checked to continue the same run: the same settings
/// (but `steps`), models and data, or an error naming each difference. state.json's own fields are
/// checked too (the weights file it names, its step, width and threshold), each refusal naming
/// state.json and the field; a checkpoint past the step budget is refused.
pub fn load(out: &Path, cfg: &TrainConfig, made: &Provenance, device: &Device) -> Result<Option<TrainState>> {
    let run = RunDir::new(out);
    let (dir, path) = (run.checkpoint_dir(), run.checkpoint_state());
    check_checkpoint_dir(&dir)?;
    if !path.exists() {
        return Ok(None);
    }
    let meta = read_meta(&path)?;
    check_meta(&meta, &path)?;
    let settings = |c: &TrainConfig| {
        let mut v = serde_json::to_value(c).expect("TrainConfig serializes");
        // The budget may grow on resume; gradient clipping follows --kind.
        let map = v.as_object_mut().expect("an object");
        map.remove("steps");
        map.remove("clip_grad");
        v
    };
    let changed = changed_settings(&settings(&meta.config), &settings(cfg), config_name);
    if !changed.is_empty() {
        return Err(crate::bad_value::OtherSettings {
            file: path.to_path_buf(),
            what: "the run there was started",
            changed,
        }
        .into());
    }
    let model_ids = made.model_ids;
    if !meta.model_ids.is_empty() && !model_ids.is_empty() && meta.model_ids != model_ids {
        bail!(
            "{}: the run there trains on other models (identities {}, the data now comes from {}); choose another --out",
            path.display(),
            meta.model_ids.join("/"),
            model_ids.join("/")
        );
    }
    if !meta.source.is_null() && !made.source.is_null() {
        let changed = changed_settings(&meta.source, made.source, flag_name);
        if !changed.is_empty() {
            bail!(
                "{}: the run there trains on other data: {changed}; resume it on the same data with the same \
                 settings, or choose another --out",
                path.display()
            );
        }
    }
    if meta.step > cfg.steps {
        bail!(
            "{}: field `step` is {}, past this job's step budget ({}): give --steps {} or more to resume the run, \
             or choose another --out",
            path.display(),
            meta.step,
            cfg.steps,
            meta.step
        );
    }
    let file = dir.join(&meta.weights);
    let bytes = std::fs::read(&file).map_err(|e| anyhow!("{}: cannot read: {e}", file.display()))?;
    if meta.checksum.is_some_and(|c| c != crate::io::checksum(&bytes)) {
        bail!(
            "{}: corrupt checkpoint: its checksum does not match state.json; train again from step 0 in another --out (or after deleting the run folder {})",
            file.display(),
            out.display()
        );
    }
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: corrupt checkpoint: {e}", file.display()))?;
    // The width the weights hold, against state.json's `d`; then every tensor's shape.
    let w_enc = st.tensor("param.w_enc").map_err(|_| anyhow!("{}: missing `param.w_enc`", file.display()))?;
    // A crosscoder's rows hold both models (2d); an SAE's one input (d).
    let blocks = if cfg.kind == crate::crosscoder::Kind::Sae { 1 } else { 2 };
    let (rows, dict) = match w_enc.shape() {
        &[rows, dict] => (rows, dict),
        other => bail!("{}: `param.w_enc` has shape {other:?}, not [{blocks}d, D]", file.display()),
    };
    if rows != blocks * meta.d {
        bail!(
            "{}: field `d` is {}, but the weights in {} have d = {} (`param.w_enc` is [{rows}, {dict}])",
            path.display(),
            meta.d,
            meta.weights,
            rows as f64 / blocks as f64
        );
    }
    let (d, dict) = (meta.d, cfg.dict_size);
    let expected = |name: &str| -> [usize; 2] {
        match name {
            "w_enc" => [blocks * d, dict],
            "b_enc" => [1, dict],
            "w_dec" => [dict, blocks * d],
            _ => [1, blocks * d],
        }
    };
    let get = |prefix: &str, name: &str| -> Result<Tensor<2>> {
        let full = format!("{prefix}.{name}");
        let v = st.tensor(&full).map_err(|_| anyhow!("{}: missing `{full}`", file.display()))?;
        let want = expected(name);
        if v.shape() != want {
            bail!(
                "{}: `{full}` has shape {:?}, a dictionary with d = {d} and D = {dict} needs {want:?}",
                file.display(),
                v.shape()
            );
        }
        let vals =
            crate::io::decode_f32(v.dtype(), v.data()).map_err(|e| anyhow!("{}: `{full}`: {e}", file.display()))?;
        Ok(tensor(vals, want, device))
    };
    let params = |prefix: &str| -> Result<Params> {
        Ok(Params {
            w_enc: get(prefix, "w_enc")?,
            b_enc: get(prefix, "b_enc")?,
            w_dec: get(prefix, "w_dec")?,
            b_dec: get(prefix, "b_dec")?,
        })
    };
    let since_view =
        st.tensor("since_selected").map_err(|_| anyhow!("{}: missing `since_selected`", file.display()))?;
    if since_view.shape() != [dict] {
        bail!("{}: `since_selected` has shape {:?}, D = {dict} needs [{dict}]", file.display(), since_view.shape());
    }
    let since = crate::io::decode_i64(since_view.dtype(), since_view.data())
        .map_err(|e| anyhow!("{}: `since_selected`: {e}", file.display()))?
        .into_iter()
        .map(|c| c as u64)
        .collect();
    Ok(Some(TrainState {
        params: params("param")?,
        adam_m: params("adam_m")?,
        adam_v: params("adam_v")?,
        step: meta.step,
        tokens: meta.tokens,
        since_selected: since,
        threshold: meta.threshold,
        data_ended: meta.data_ended,
    }))
}

/// A [`TrainConfig`] key as the user knows it: its flag, or the key itself for the engine's
/// settings that have no flag.
fn config_name(key: &str) -> String {
    match key {
        "sparse" | "cpu_kernels" => key.to_string(),
        k => flag_name(k),
    }
}

/// Keeps the metrics lines up to the checkpoint's step (the resumed run writes the rest again).
pub fn trim_metrics(out: &Path, step: u64) -> Result<()> {
    let path = RunDir::new(out).metrics();
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(&path, |f| Ok(f.write_all(kept.as_bytes())?))
}

impl RunDir {
    /// `metrics.jsonl`, one logged step a line; a torn last line (a crash mid-write) is skipped.
    pub fn read_metrics(&self) -> Result<Vec<StepMetrics>> {
        let path = self.metrics();
        let text = fs_err::read_to_string(&path)?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let last = lines.len().saturating_sub(1);
        let mut out = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<StepMetrics>(line) {
                Ok(m) => out.push(m),
                Err(_) if i == last => {}
                Err(e) => bail!("{}:{}: not a metrics line: {e}", path.display(), i + 1),
            }
        }
        Ok(out)
    }
}

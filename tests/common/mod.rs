//! Shared test helpers: the committed fixtures and their transformers reference outputs.
#![allow(dead_code)]

pub mod planted;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use crossdiff::Backend;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-gemma2").join(name)
}

/// A folder of another family's fixtures (`assets/tiny-<family>/<name>`: llama, qwen2, qwen3, gemma3).
pub fn family_fixture(family: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("assets/tiny-{family}")).join(name)
}

pub struct Reference {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    pub meta: Value,
}

impl Reference {
    pub fn load(model: &str) -> Self {
        Self::load_from(&fixture("reference"), model)
    }

    /// `dir/<model>.safetensors` and `dir/<model>.json`, as scripts/make_*fixtures.py write them.
    pub fn load_from(dir: &Path, model: &str) -> Self {
        let bytes = std::fs::read(dir.join(format!("{model}.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let values: Vec<f64> = match view.dtype() {
                Dtype::F32 => {
                    view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
                }
                Dtype::I64 => {
                    view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect()
                }
                other => panic!("unexpected dtype {other:?}"),
            };
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        let meta = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{model}.json"))).unwrap()).unwrap();
        Self { tensors, meta }
    }

    pub fn get(&self, name: &str) -> &(Vec<usize>, Vec<f64>) {
        self.tensors.get(name).unwrap_or_else(|| panic!("reference has no {name}"))
    }

    pub fn ids(&self, prompt: usize) -> Vec<u32> {
        self.get(&format!("p{prompt}.input_ids")).1.iter().map(|&v| v as u32).collect()
    }

    pub fn prompts(&self) -> &Vec<Value> {
        self.meta["prompts"].as_array().unwrap()
    }
}

/// max |a − b| ≤ tol · max |b|: relative to the tensor's scale, so near-zero entries do not
/// dominate.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: non-finite value at {i}");
        let e = (*g as f64 - w).abs();
        if e > worst {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= tol * scale,
        "{what}: max abs error {worst:.3e} at {at} (got {}, want {}) exceeds {tol:e} × scale {scale:.3e}",
        got[at],
        want[at]
    );
}

/// The wgpu device, or None when this machine has no Vulkan driver. CI sets
/// CROSSDIFF_REQUIRE_WGPU=1 (it installs Mesa's lavapipe), which turns a missing device into a failure.
pub fn wgpu_device() -> Option<Device> {
    match Backend::Wgpu.device() {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("CROSSDIFF_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("CROSSDIFF_REQUIRE_WGPU=1 but wgpu is unusable: {e:#}");
            }
            eprintln!("skipping wgpu comparison: {e:#}");
            None
        }
    }
}

/// A scratch directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "crossdiff-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    /// A copy of a fixture snapshot directory.
    pub fn copy_of(tag: &str, fixture_name: &str) -> Self {
        Self::copy_from(tag, &fixture(fixture_name))
    }

    /// A scratch copy of the files of folder `src` (not recursive).
    pub fn copy_from(tag: &str, src: &Path) -> Self {
        let t = Self::new(tag);
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), t.0.join(entry.file_name())).unwrap();
        }
        t
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every weight of a fixture snapshot as (dtype, shape, raw bytes), read from its shards.
pub fn fixture_weights(name: &str) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (n, v) in st.tensors() {
                out.insert(n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()));
            }
        }
    }
    out
}

/// Converts bf16 bytes to f32 or f16 bytes.
pub fn convert_bf16(bytes: &[u8], to: Dtype) -> Vec<u8> {
    bytes
        .chunks_exact(2)
        .flat_map(|b| {
            let v = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            match to {
                Dtype::F32 => v.to_le_bytes().to_vec(),
                Dtype::F16 => half::f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
                _ => b.to_vec(),
            }
        })
        .collect()
}

/// Writes `weights` as one `model.safetensors` into `dir`, removing any shards and index there.
pub fn write_single_file(dir: &Path, weights: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("model") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = weights
        .iter()
        .map(|(n, (dt, shape, bytes))| {
            (n.clone(), safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// A committed data file (assets/data).
pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data").join(name)
}

/// A 600-token layer-1 cache of web text from the tiny fixtures (context 64: their models have
/// 256 positions).
pub fn small_cache_job(out: &Path) -> crossdiff::workflow::cache::CacheJob {
    crossdiff::workflow::cache::CacheJob {
        base: fixture("base"),
        chat: fixture("chat"),
        data: vec![data("web.txt")],
        layer: 1,
        tokens: 600,
        out: out.to_path_buf(),
        dtype: crossdiff::activations::cache::ActDtype::Bf16,
        tokenize: crossdiff::data::TokenizeOptions { context: 64, drop_bos: false, skip_first: Some(0) },
        shard_tokens: 256,
        batch_tokens: 256,
        ..Default::default()
    }
}

/// A 6-step BatchTopK run (D 64, k 8) on `cache`, checkpointing every 3 steps.
pub fn small_train_job(cache: &Path, out: &Path) -> crossdiff::workflow::train::TrainJob {
    crossdiff::workflow::train::TrainJob {
        cache: Some(cache.to_path_buf()),
        out: out.to_path_buf(),
        dict_size: Some(64),
        k: 8,
        batch: 64,
        steps: Some(6),
        threshold_start: Some(2),
        checkpoint_every: 3,
        log_every: 1,
        shuffle_tokens: 256,
        ..Default::default()
    }
}

/// The error of a call that must fail, checked to be one line.
pub fn one_line_err<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("succeeded but should not"),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(!msg.contains('\n'), "not one line: {msg}");
            msg
        }
    }
}

/// Runs a cache job to its index (the engine's writer, no workflow wrapping).
pub fn cache_index(
    job: &crossdiff::workflow::cache::CacheJob,
) -> anyhow::Result<crossdiff::activations::cache::CacheIndex> {
    crossdiff::activations::writer::run_cache(job, &Device::flex(), |_| {}, || true)
}

/// Runs a cache job as the CLI and the app do (the workflow job: lock, clean-up on failure).
pub fn cache_outcome(
    job: &crossdiff::workflow::cache::CacheJob,
) -> anyhow::Result<crossdiff::workflow::cache::CacheOutcome> {
    crossdiff::workflow::cache::run(job, &Device::flex(), crossdiff::workflow::Handle::silent())
}

/// Asserts `msg` contains every one of `parts`.
pub fn has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{p:?} missing from: {msg}");
    }
}

/// Every file under `dir` (recursively) with its bytes, by path relative to `dir`, sorted; empty
/// when `dir` does not exist. A refused job must change none of them.
pub fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.push((name, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The engine's training loop on `source` into `out`, on the CPU, with no models or layer recorded
/// (the synthetic sources of the training tests).
pub fn train_run<'a>(
    out: PathBuf,
    config: crossdiff::crosscoder::train::TrainConfig,
    source: &'a mut dyn crossdiff::crosscoder::train::PairSource,
    width: usize,
) -> crossdiff::crosscoder::train::TrainRun<'a> {
    crossdiff::crosscoder::train::TrainRun {
        config,
        out,
        device: Device::flex(),
        devices: vec![],
        source,
        validation: None,
        layer: None,
        models: vec![],
        model_ids: vec![],
        width,
        source_fingerprint: serde_json::Value::Null,
    }
}

/// Incremental decoding (a 3-token prompt, then one token at a time) gives the full forward's
/// logits at every position, to 1e-5 relative.
pub fn assert_kv_decoding_equals_forward(g: &crossdiff::DecoderLm, ids: &[u32], what: &str) {
    let full: Vec<f32> = g.forward(g.batch_ids(&[ids.to_vec()]).unwrap()).try_into_vec_as().unwrap();
    let v = g.config.vocab_size;
    let mut cache = g.new_cache();
    let prefix = 3;
    let mut steps = vec![g.step(g.batch_ids(&[ids[..prefix].to_vec()]).unwrap(), &mut cache)];
    for &id in &ids[prefix..] {
        steps.push(g.step(g.batch_ids(&[vec![id]]).unwrap(), &mut cache));
    }
    for (k, logits) in steps.into_iter().enumerate() {
        let pos = prefix - 1 + k;
        let got: Vec<f32> = logits.try_into_vec_as().unwrap();
        let want: Vec<f64> = full[pos * v..(pos + 1) * v].iter().map(|&x| x as f64).collect();
        assert_close(&format!("{what} position {pos}"), &got, &want, 1e-5);
    }
}

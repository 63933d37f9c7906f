//! Helpers the app's view tests share: the fixtures, a scratch folder, the engine tests' small cache.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use crossdiff::workflow::Handle;

pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets")
}

/// A scratch folder for one test, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("crossdiff-app-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A 600-token layer-1 cache of web text from the tiny fixtures (the engine tests' small cache).
pub fn small_cache(out: &Path) {
    let job = crossdiff::workflow::cache::CacheJob {
        base: assets().join("tiny-gemma2/base"),
        chat: assets().join("tiny-gemma2/chat"),
        data: vec![assets().join("data/web.txt")],
        layer: 1,
        tokens: 600,
        out: out.to_path_buf(),
        dtype: crossdiff::activations::cache::ActDtype::Bf16,
        tokenize: crossdiff::data::TokenizeOptions { context: 64, drop_bos: false, skip_first: Some(0) },
        shard_tokens: 256,
        batch_tokens: 256,
        ..Default::default()
    };
    crossdiff::workflow::cache::run(&job, &Device::flex(), Handle::silent()).unwrap();
}

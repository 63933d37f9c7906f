//! Loaded models, kept: a job asks the store for a model and gets the one already on the device when
//! its path, device and load options are the same. The CLI makes one store per command (so a job
//! loads each model once); the app keeps one for the session, so views share what is loaded and a
//! model is reloaded only when its path or the device changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use burn::tensor::Device;

use crate::model::Model;
use crate::model::decoder::LoadOptions;
use crate::workflow::Handle;

/// At most this many models stay loaded (a base/chat pair, and one pair more while switching).
const KEEP: usize = 4;

#[derive(Clone, PartialEq)]
struct Key {
    dir: PathBuf,
    adapter: Option<PathBuf>,
    device: String,
    options: LoadOptions,
}

#[derive(Default)]
pub struct ModelStore {
    loaded: Mutex<Vec<(Key, Arc<Model>)>>,
    /// Held while a model loads: two views asking for the same model at once load it once (the
    /// second finds it in `loaded`), and two models never load side by side into memory.
    loading: Mutex<()>,
}

impl ModelStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The model at `dir` (with the LoRA adapter at `adapter` merged in) on `device`, loading it
    /// (with progress on `handle`) unless it is loaded.
    pub fn get(
        &self,
        dir: &Path,
        adapter: Option<&Path>,
        device: &Device,
        options: LoadOptions,
        handle: Handle,
    ) -> Result<Arc<Model>> {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let key = Key { dir: canonical(dir), adapter: adapter.map(canonical), device: format!("{device:?}"), options };
        let _loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = self.lock().iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let phase = format!("loading {}", dir.display());
        let model = Arc::new(Model::load_adapted(dir, adapter, device, options, |done, total| {
            handle.progress(&phase, done as u64, total as u64, "tensors")
        })?);
        let mut loaded = self.lock();
        // Models on another device are never used again once the device changes: free them first.
        loaded.retain(|(k, _)| k.device == key.device);
        if loaded.len() >= KEEP {
            loaded.remove(0);
        }
        loaded.push((key, model.clone()));
        Ok(model)
    }

    /// Both models of a pair (the chat one with `chat_adapter` merged in), checked to be a pair
    /// (same tokenizer and widths) and not one model twice.
    pub fn pair(
        &self,
        base: &Path,
        chat: &Path,
        chat_adapter: Option<&Path>,
        device: &Device,
        handle: Handle,
    ) -> Result<(Arc<Model>, Arc<Model>)> {
        let b = self.get(base, None, device, LoadOptions::default(), handle)?;
        let c = self.get(chat, chat_adapter, device, LoadOptions::default(), handle)?;
        crate::model::check_models(&b, &c)?;
        crate::model::snapshot::check_distinct((base, &b.identity), (chat, &c.identity))?;
        Ok((b, c))
    }

    /// How many models are loaded now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Key, Arc<Model>)>> {
        // A panic while holding the lock cannot leave the list half-updated (push/remove are whole).
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }
}

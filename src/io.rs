//! File output that never leaves a half-written file behind, and small safetensors helpers.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::{Dtype, tensor::TensorView};

/// Writes `path` through a temporary sibling: write, fsync, rename. A crash leaves either the old
/// file or the new one, never a truncated one.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut file = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        write(&mut file)?;
        file.flush()?;
        file.sync_all().with_context(|| format!("{}: fsync failed", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// One named tensor for [`write_safetensors`]: raw little-endian bytes with dtype and shape.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self { name: name.into(), dtype: Dtype::F32, shape, bytes }
    }

    pub fn i64(name: impl Into<String>, shape: Vec<usize>, values: &[i64]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self { name: name.into(), dtype: Dtype::I64, shape, bytes }
    }
}

/// Writes a safetensors file atomically.
pub fn write_safetensors(path: &Path, tensors: &[OwnedTensor]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|t| Ok((t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .with_context(|| format!("{}: invalid tensor", path.display()))?;
    let bytes = safetensors::serialize(views, None).with_context(|| format!("{}: serialize", path.display()))?;
    write_atomic(path, |f| Ok(f.write_all(&bytes)?))
}

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
        Self { name: name.into(), dtype: Dtype::F32, shape, bytes: f32_bytes(values) }
    }

    pub fn i64(name: impl Into<String>, shape: Vec<usize>, values: &[i64]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self { name: name.into(), dtype: Dtype::I64, shape, bytes }
    }
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
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

/// One tensor of [`write_safetensors_streaming`]: its bytes are produced only when written.
pub struct LazyTensor<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Box<dyn FnOnce() -> Result<Vec<u8>> + 'a>,
}

/// Writes a safetensors file atomically, holding one tensor's bytes at a time (checkpoints of a
/// paper-sized crosscoder are several GB: building them in memory first doubles the peak).
pub fn write_safetensors_streaming(path: &Path, tensors: Vec<LazyTensor<'_>>) -> Result<()> {
    let elem = |d: Dtype| match d {
        Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
        Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
        _ => 1,
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in &tensors {
        let len = t.shape.iter().product::<usize>() * elem(t.dtype);
        let dtype = serde_json::to_value(t.dtype)?;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut json = serde_json::to_vec(&header)?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    write_atomic(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(&json)?;
        for t in tensors {
            let expected = t.shape.iter().product::<usize>() * elem(t.dtype);
            let name = t.name;
            let bytes = (t.bytes)()?;
            if bytes.len() != expected {
                anyhow::bail!(
                    "{}: tensor `{name}` has {} bytes, its shape needs {expected}",
                    path.display(),
                    bytes.len()
                );
            }
            w.write_all(&bytes)?;
        }
        w.flush()?;
        Ok(())
    })
}

//! File output that never leaves a half-written file behind, and small safetensors helpers.

use std::fs::File;

pub use crate::dir_lock::DirLock;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::{Dtype, tensor::TensorView};

/// Writes `path` through a temporary sibling: write, fsync, rename. A crash leaves either the old
/// file or the new one, never a truncated one.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        // The error names the file the user asked for (the temporary sibling is an implementation detail).
        let mut file = File::create(&tmp).map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
        // A full disk or a vanished folder surfaces here: name the file being written.
        write(&mut file).with_context(|| format!("{}: cannot write", path.display()))?;
        file.flush().with_context(|| format!("{}: cannot write", path.display()))?;
        file.sync_all().with_context(|| format!("{}: fsync failed", path.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Runs `job`, which writes under `dir`; when `dir` did not exist before and the job fails having
/// written no file there, removes the folders it left, so a refused command leaves no trace.
pub fn clean_on_failure<T>(dir: &Path, job: impl FnOnce() -> Result<T>) -> Result<T> {
    let fresh = !dir.exists();
    let result = job();
    if result.is_err() && fresh {
        remove_empty_tree(dir);
    }
    result
}

/// This machine's memory in bytes (Linux: `MemTotal` of /proc/meminfo; `None` elsewhere), for
/// refusing a request that could only end in an allocation failure.
pub fn memory_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Removes `dir` if it holds nothing but (recursively) empty folders.
fn remove_empty_tree(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    let mut empty = true;
    for e in entries.flatten() {
        let p = e.path();
        empty &= p.is_dir() && remove_empty_tree(&p);
    }
    empty && std::fs::remove_dir(dir).is_ok()
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
pub fn write_safetensors_streaming(path: &Path, tensors: Vec<LazyTensor<'_>>) -> Result<u64> {
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
    let mut sum = Checksum::default();
    write_atomic(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
        let len = (json.len() as u64).to_le_bytes();
        for part in [&len[..], &json] {
            w.write_all(part)?;
            sum.update(part);
        }
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
            sum.update(&bytes);
        }
        w.flush()?;
        Ok(())
    })?;
    Ok(sum.finish())
}

/// Why safetensors refused a file, naming the tensor at fault. safetensors' own error names the
/// tensor whose offsets it checked last, which for a tensor whose shape and size were shrunk is
/// its neighbour; this walks the header in data order and names the first tensor whose size does
/// not match its shape, or that ends where the next one does not start.
pub fn diagnose_safetensors(bytes: &[u8], err: &safetensors::SafeTensorError) -> String {
    let fallback = || err.to_string();
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize) else {
        return fallback();
    };
    let Some(Ok(header)) = bytes.get(8..8usize.saturating_add(n)).map(serde_json::from_slice::<serde_json::Value>)
    else {
        return fallback();
    };
    let Some(map) = header.as_object() else { return fallback() };
    let mut entries: Vec<(&str, Vec<u64>, u64, u64, u64)> = Vec::new();
    for (name, e) in map.iter().filter(|(k, _)| *k != "__metadata__") {
        let shape: Vec<u64> =
            e["shape"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).unwrap_or_default();
        let size = match e["dtype"].as_str() {
            Some("F64" | "I64" | "U64") => 8,
            Some("F32" | "I32" | "U32") => 4,
            Some("F16" | "BF16" | "I16" | "U16") => 2,
            _ => 1,
        };
        let (Some(start), Some(end)) = (e["data_offsets"][0].as_u64(), e["data_offsets"][1].as_u64()) else {
            return format!("tensor `{name}`: `data_offsets` is not a pair of byte offsets");
        };
        entries.push((name, shape, size, start, end));
    }
    entries.sort_by_key(|e| (e.3, e.4));
    let mut previous: Option<(&str, u64)> = None;
    for (name, shape, size, start, end) in &entries {
        let need = shape.iter().product::<u64>() * size;
        if end.saturating_sub(*start) != need {
            return format!(
                "tensor `{name}`: shape {shape:?} needs {need} bytes, its offsets give {}",
                end.saturating_sub(*start)
            );
        }
        match previous {
            None if *start != 0 => return format!("tensor `{name}` starts at byte {start} of the data, not at 0"),
            Some((before, ended)) if *start != ended => {
                return format!(
                    "tensor `{before}` ends at byte {ended} of the data but the next one, `{name}`, starts at {start}: \
                     `{before}`'s shape or offsets were changed (or a tensor between them removed)"
                );
            }
            _ => {}
        }
        previous = Some((name, *end));
    }
    fallback()
}

/// A fast non-cryptographic hash over 8-byte words (corruption detection, not security).
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut c = Checksum::default();
    c.update(bytes);
    c.finish()
}

/// [`checksum`] fed piece by piece (a file hashed while it is written): the same value for the same
/// bytes however they are split.
pub struct Checksum {
    h: u64,
    /// Bytes of a word not yet complete.
    pending: Vec<u8>,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self { h: 0xcbf2_9ce4_8422_2325, pending: Vec::with_capacity(8), len: 0 }
    }
}

impl Checksum {
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn word(&mut self, c: &[u8]) {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        self.h = (self.h ^ w).wrapping_mul(Self::PRIME).rotate_left(29);
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if !self.pending.is_empty() {
            let take = (8 - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() < 8 {
                return;
            }
            let word = std::mem::take(&mut self.pending);
            self.word(&word);
            self.pending = word;
            self.pending.clear();
        }
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.word(c);
        }
        self.pending.extend_from_slice(chunks.remainder());
    }

    pub fn finish(&self) -> u64 {
        let mut h = self.h;
        for &b in &self.pending {
            h = (h ^ b as u64).wrapping_mul(Self::PRIME);
        }
        h ^ self.len
    }
}

/// Little-endian `N`-byte words of a buffer (a trailing partial word is ignored: safetensors
/// validates lengths against shapes before this runs).
fn words<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(|c| c.try_into().expect("chunks_exact yields N bytes"))
}

/// Float values of `dtype` (f32, f16 or bf16) decoded into `out` (as many as both hold), with no
/// allocation: the activation reader's hot path.
pub fn decode_f32_into(dtype: safetensors::Dtype, bytes: &[u8], out: &mut [f32]) -> anyhow::Result<()> {
    use safetensors::Dtype;
    match dtype {
        Dtype::F32 => words::<4>(bytes).zip(out).for_each(|(w, o)| *o = f32::from_le_bytes(w)),
        Dtype::F16 => words::<2>(bytes).zip(out).for_each(|(w, o)| *o = half::f16::from_le_bytes(w).to_f32()),
        // bf16 is the top half of an f32: a shift, no rounding.
        Dtype::BF16 => {
            words::<2>(bytes).zip(out).for_each(|(w, o)| *o = f32::from_bits((u16::from_le_bytes(w) as u32) << 16))
        }
        other => anyhow::bail!("unsupported dtype {other:?} (expected f32, f16 or bf16)"),
    }
    Ok(())
}

/// One decoder for every stored element type the project reads: values of `dtype` as f32
/// (floats widened, integers converted).
pub fn decode_f32(dtype: safetensors::Dtype, bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
    use safetensors::Dtype;
    Ok(match dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
            let mut out = vec![0.0f32; bytes.len() * 8 / dtype.bitsize()];
            decode_f32_into(dtype, bytes, &mut out)?;
            out
        }
        Dtype::I64 => words::<8>(bytes).map(|w| i64::from_le_bytes(w) as f32).collect(),
        Dtype::I32 => words::<4>(bytes).map(|w| i32::from_le_bytes(w) as f32).collect(),
        Dtype::U32 => words::<4>(bytes).map(|w| u32::from_le_bytes(w) as f32).collect(),
        other => anyhow::bail!("unsupported dtype {other:?} (expected a float or integer type)"),
    })
}

/// Integer values of `dtype` (u32, i32 or i64) as i64.
pub fn decode_i64(dtype: safetensors::Dtype, bytes: &[u8]) -> anyhow::Result<Vec<i64>> {
    use safetensors::Dtype;
    Ok(match dtype {
        Dtype::I64 => words::<8>(bytes).map(i64::from_le_bytes).collect(),
        Dtype::I32 => words::<4>(bytes).map(|w| i32::from_le_bytes(w) as i64).collect(),
        Dtype::U32 => words::<4>(bytes).map(|w| u32::from_le_bytes(w) as i64).collect(),
        other => anyhow::bail!("unsupported dtype {other:?} (expected u32, i32 or i64)"),
    })
}

/// Integer values of `dtype` as u32 (token ids, indices); a negative or too large value is an error.
pub fn decode_u32(dtype: safetensors::Dtype, bytes: &[u8]) -> anyhow::Result<Vec<u32>> {
    decode_i64(dtype, bytes)?
        .into_iter()
        .map(|v| u32::try_from(v).map_err(|_| anyhow::anyhow!("value {v} does not fit an index (u32)")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    #[test]
    fn decoders_read_each_dtype() {
        let f: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_f32(Dtype::F32, &f).unwrap(), vec![1.5, -2.0]);
        let h: Vec<u8> =
            [half::f16::from_f32(0.25), half::f16::from_f32(-3.0)].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_f32(Dtype::F16, &h).unwrap(), vec![0.25, -3.0]);
        let b: Vec<u8> = [half::bf16::from_f32(0.5)].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_f32(Dtype::BF16, &b).unwrap(), vec![0.5]);
        let i: Vec<u8> = [7i64, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(decode_u32(Dtype::I64, &i).unwrap(), vec![7, 9]);
        assert_eq!(decode_f32(Dtype::I64, &i).unwrap(), vec![7.0, 9.0]);
        let neg: Vec<u8> = (-1i64).to_le_bytes().to_vec();
        assert!(decode_u32(Dtype::I64, &neg).is_err());
        assert!(decode_f32(Dtype::BOOL, &[1]).is_err());
    }
}

#[cfg(test)]
mod checksum_tests {
    use super::*;

    #[test]
    fn streamed_checksum_equals_the_whole_buffer_checksum() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for split in [vec![], vec![1], vec![3, 8, 9], vec![7, 7, 7, 100, 5], vec![999]] {
            let mut c = Checksum::default();
            let mut at = 0;
            for s in split {
                c.update(&bytes[at..at + s]);
                at += s;
            }
            c.update(&bytes[at..]);
            assert_eq!(c.finish(), checksum(&bytes));
        }
        assert_ne!(checksum(&bytes[..999]), checksum(&bytes));
    }
}

//! `crossdiff inspect`: one prompt through the model, every block output and the logits to a
//! safetensors file (`input_ids` i64 [T], `block.{l}` f32 [T, d], `logits` f32 [T, V]).

use std::path::Path;

use anyhow::Result;

use crate::io::{OwnedTensor, write_safetensors};
use crate::model::Model;

pub struct Inspection {
    pub ids: Vec<u32>,
    /// Output of each block, `[T, d]` row-major.
    pub blocks: Vec<Vec<f32>>,
    /// `[T, V]` row-major.
    pub logits: Vec<f32>,
}

pub fn inspect(model: &Model, ids: Vec<u32>) -> Result<Inspection> {
    let g = &model.lm;
    let input = g.batch_ids(std::slice::from_ref(&ids))?;
    let mut blocks = Vec::with_capacity(g.num_layers());
    let mut pending = Vec::new();
    let last = g.forward_blocks(input, g.num_layers() - 1, |_, out| pending.push(out.clone()));
    for out in pending {
        blocks.push(read(out)?);
    }
    let [b, t, d] = last.dims();
    let logits = read(g.logits(last.reshape([b * t, d])))?;
    // A broken snapshot (NaN weights, a config that makes the computation blow up) is named here,
    // not written out as a file of NaNs.
    let outputs =
        blocks.iter().enumerate().map(|(l, v)| (format!("block {l}"), v)).chain([("the logits".into(), &logits)]);
    for (what, values) in outputs {
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            anyhow::bail!(
                "{}: the model produced a non-finite value ({v}) in {what}: its weights or config.json are broken",
                model.snapshot.dir.display()
            );
        }
    }
    Ok(Inspection { ids, blocks, logits })
}

fn read<const D: usize>(t: burn::tensor::Tensor<D>) -> Result<Vec<f32>> {
    crate::counters::read_f32(t)
}

/// Where an inspection may be written: not over a folder, not inside a model snapshot (its own
/// weights could be replaced), and into a folder that exists.
pub fn check_out(out: &Path) -> Result<()> {
    use crate::bad_value::ensure;
    ensure(!out.as_os_str().is_empty(), "out", || "is required (a .safetensors file to write)".into())?;
    ensure(!out.is_dir(), "out", || {
        format!("{} is a folder; give a file name (e.g. inspect.safetensors)", out.display())
    })?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    ensure(parent.is_dir(), "out", || format!("{}: the folder {} does not exist", out.display(), parent.display()))?;
    ensure(!parent.join("config.json").exists(), "out", || {
        format!(
            "{} is inside a folder with a config.json (a model snapshot?): write the inspection elsewhere",
            out.display()
        )
    })?;
    ensure(!parent.join("cache.json").exists(), "out", || {
        format!("{} is inside an activation cache: write the inspection elsewhere", out.display())
    })?;
    // An existing file is replaced only when it is an earlier inspection.
    if out.exists() {
        let earlier = std::fs::read(out).ok().is_some_and(|b| {
            safetensors::SafeTensors::deserialize(&b)
                .is_ok_and(|st| st.tensor("input_ids").is_ok() && st.tensor("logits").is_ok())
        });
        ensure(earlier, "out", || {
            format!("{} exists and is not an earlier inspection: choose another file name", out.display())
        })?;
    }
    Ok(())
}

impl Inspection {
    pub fn write(&self, path: &Path) -> Result<()> {
        let t = self.ids.len();
        let d = self.blocks.first().map_or(0, |b| b.len() / t.max(1));
        let v = self.logits.len() / t.max(1);
        let mut tensors =
            vec![OwnedTensor::i64("input_ids", vec![t], &self.ids.iter().map(|&i| i as i64).collect::<Vec<_>>())];
        for (l, block) in self.blocks.iter().enumerate() {
            tensors.push(OwnedTensor::f32(format!("block.{l}"), vec![t, d], block));
        }
        tensors.push(OwnedTensor::f32("logits", vec![t, v], &self.logits));
        write_safetensors(path, &tensors)
    }
}

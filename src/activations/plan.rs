//! One shard's worth of work before and after the models run: the planner cuts the document stream
//! into shards of whole documents, `compute_acts` runs a model over a shard's documents (short ones
//! packed into shared rows, batched by length), and `check_finite` refuses activations a cache must not hold.

use anyhow::{Result, anyhow, bail};
use safetensors::{Dtype, SafeTensors};

use crate::activations::cache::ActDtype;
use crate::data::{Mixer, TokenizedDoc};
use crate::io::OwnedTensor;
use crate::model::Model;
use crate::model::config::ModelConfig;
use std::path::Path;

/// One shard's tokens before any model has run.
pub(crate) struct ShardPlan {
    pub(crate) docs: Vec<TokenizedDoc>,
    /// Global index of the first document.
    pub(crate) first_doc: u64,
    pub(crate) tokens: usize,
}

/// Cuts the document stream into shards of whole documents, in stream order.
#[derive(Default)]
pub(crate) struct Planner {
    /// A document that did not fit the previous shard.
    carry: Option<TokenizedDoc>,
}

impl Planner {
    /// The next shard: whole documents up to `shard_tokens`; the run's last document is cut so the
    /// run ends at exactly `remaining` tokens. `None` when the data is exhausted.
    pub(crate) fn next(
        &mut self,
        mixer: &mut Mixer,
        first_doc: u64,
        shard_tokens: usize,
        remaining: u64,
    ) -> Result<Option<ShardPlan>> {
        let mut plan = ShardPlan { docs: Vec::new(), first_doc, tokens: 0 };
        let budget = remaining.min(shard_tokens as u64) as usize;
        while plan.tokens < budget {
            let doc = match self.carry.take() {
                Some(d) => Some(d),
                None => mixer.next_doc()?,
            };
            let Some(mut doc) = doc else { break };
            let room = budget - plan.tokens;
            if doc.ids.len() > room {
                if !plan.docs.is_empty() && (doc.ids.len() as u64) <= remaining - plan.tokens as u64 {
                    self.carry = Some(doc);
                    break;
                }
                doc.ids.truncate(room);
                doc.template.truncate(room);
            }
            plan.tokens += doc.ids.len();
            plan.docs.push(doc);
        }
        Ok(if plan.docs.is_empty() { None } else { Some(plan) })
    }
}

impl ShardPlan {
    pub(crate) fn metadata_tensors(&self) -> Vec<OwnedTensor> {
        let mut ids = Vec::with_capacity(self.tokens);
        let mut doc_index = Vec::with_capacity(self.tokens);
        let mut position = Vec::with_capacity(self.tokens);
        let mut template = Vec::with_capacity(self.tokens);
        for (k, d) in self.docs.iter().enumerate() {
            ids.extend_from_slice(&d.ids);
            doc_index.extend(std::iter::repeat_n((self.first_doc + k as u64) as u32, d.ids.len()));
            position.extend((0..d.ids.len() as u32).map(|p| p + d.first_position));
            template.extend(d.template.iter().map(|&t| t as u8));
        }
        let u32s = |name: &str, v: &[u32]| OwnedTensor {
            name: name.into(),
            dtype: Dtype::U32,
            shape: vec![v.len()],
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        vec![
            u32s("token_ids", &ids),
            u32s("doc_index", &doc_index),
            u32s("position", &position),
            OwnedTensor { name: "template".into(), dtype: Dtype::BOOL, shape: vec![template.len()], bytes: template },
        ]
    }

    /// The documents' skipped prefixes (`prefix_ids`, and `prefix_len` per document), kept in a
    /// partial shard so that `--low-memory`'s chat pass reads the same input as the base pass.
    pub(crate) fn prefix_tensors(&self) -> Vec<OwnedTensor> {
        let ids: Vec<u32> = self.docs.iter().flat_map(|d| d.prefix.iter().copied()).collect();
        let lens: Vec<u32> = self.docs.iter().map(|d| d.prefix.len() as u32).collect();
        let u32s = |name: &str, v: &[u32]| OwnedTensor {
            name: name.into(),
            dtype: Dtype::U32,
            shape: vec![v.len()],
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        vec![u32s("prefix_ids", &ids), u32s("prefix_len", &lens)]
    }
}

/// Runs blocks 0..=layer over the plan's documents (batched by length) and returns `[tokens, d]`
/// f32 rows in document order.
pub(crate) fn compute_acts(model: &Model, plan: &ShardPlan, layer: usize, batch_tokens: usize) -> Result<Vec<f32>> {
    compute_acts_on(&[model], plan, layer, batch_tokens)
}

/// [`compute_acts`] with the forward batches dealt round-robin over `models` (the same model on
/// several devices, `cache --devices`), each device in a thread of its own; the batches and their
/// rows are the one-device ones, so the result is too (to the devices' float rounding).
pub(crate) fn compute_acts_on(
    models: &[&Model],
    plan: &ShardPlan,
    layer: usize,
    batch_tokens: usize,
) -> Result<Vec<f32>> {
    let d = models[0].lm.config.hidden_size;
    let mut offsets = Vec::with_capacity(plan.docs.len());
    let mut acc = 0;
    for doc in &plan.docs {
        offsets.push(acc);
        acc += doc.ids.len();
    }
    let mut out = vec![0.0f32; acc * d];
    // Each document runs with its skipped prefix in front (read, not kept).
    let input_len = |i: usize| plan.docs[i].prefix.len() + plan.docs[i].ids.len();
    // Short documents are packed into rows as long as the longest document (each attends only to
    // itself, see `DecoderLm::forward_to_packed`), the fullest rows first; batches hold at most
    // `batch_tokens` padded tokens.
    let lengths: Vec<usize> = (0..plan.docs.len()).map(input_len).collect();
    let mut rows = crate::model::packed::pack_rows(&lengths, lengths.iter().copied().max().unwrap_or(0));
    let fill = |row: &Vec<usize>| row.iter().map(|&i| lengths[i]).sum::<usize>();
    rows.sort_by_key(|row| (std::cmp::Reverse(fill(row)), row[0]));
    let mut groups: Vec<&[Vec<usize>]> = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let per_batch = (batch_tokens / fill(&rows[start]).max(1)).max(1);
        let group = &rows[start..(start + per_batch).min(rows.len())];
        groups.push(group);
        start += group.len();
    }
    // One batch's block output, `[batch, t, d]` on the host, and its padded length t.
    let forward = |model: &Model, group: &[Vec<usize>]| -> Result<(Vec<f32>, usize)> {
        let seqs: Vec<Vec<u32>> = group
            .iter()
            .map(|row| row.iter().flat_map(|&i| plan.docs[i].prefix.iter().chain(&plan.docs[i].ids).copied()).collect())
            .collect();
        let ids = model.lm.batch_ids(&seqs)?;
        let h = if group.iter().all(|row| row.len() == 1) {
            model.lm.forward_to(ids, layer)
        } else {
            let docs: Vec<Vec<usize>> = group.iter().map(|row| row.iter().map(|&i| lengths[i]).collect()).collect();
            model.lm.forward_to_packed(ids, &docs, layer)?
        };
        let [_, t, _] = h.dims();
        crate::counters::count_forward_batch();
        Ok((crate::counters::read_f32(h)?, t))
    };
    // Copies a batch's kept rows into `out` (each document's rows are its own: batches never share one).
    let place = |out: &mut [f32], group: &[Vec<usize>], rows: &[f32], t: usize| {
        for (b, row) in group.iter().enumerate() {
            let mut at = b * t;
            for &i in row {
                let (skip, n) = (plan.docs[i].prefix.len(), plan.docs[i].ids.len());
                let src = &rows[(at + skip) * d..(at + skip + n) * d];
                out[offsets[i] * d..(offsets[i] + n) * d].copy_from_slice(src);
                at += lengths[i];
            }
        }
    };
    if models.len() == 1 {
        for group in &groups {
            let (rows, t) = forward(models[0], group)?;
            place(&mut out, group, &rows, t);
        }
        return Ok(out);
    }
    let n = models.len();
    let shared = std::sync::Mutex::new(&mut out);
    // One device failing (a server gone) stops the others at their next batch.
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = models
            .iter()
            .enumerate()
            .map(|(m, model)| {
                let (groups, forward, place, shared, failed) = (&groups, &forward, &place, &shared, &failed);
                scope.spawn(move || -> Result<()> {
                    for g in (m..groups.len()).step_by(n) {
                        if failed.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        let (rows, t) = forward(model, groups[g])
                            .inspect_err(|_| failed.store(true, std::sync::atomic::Ordering::Relaxed))?;
                        let mut out = shared.lock().unwrap_or_else(|p| p.into_inner());
                        place(&mut out[..], groups[g], &rows, t);
                    }
                    Ok(())
                })
            })
            .collect();
        // Every worker joined (none left running); a panic first, else the first error.
        let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        let mut first_error = None;
        for r in results {
            match r {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(Err(e)) if first_error.is_none() => first_error = Some(e),
                Ok(_) => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    })?;
    Ok(out)
}

/// Rebuilds a shard's documents from a partial shard's metadata (the chat pass of --low-memory).
pub(crate) fn plan_from_partial(st: &SafeTensors) -> Result<ShardPlan> {
    let u32s = |name: &str| -> Result<Vec<u32>> {
        let v = st.tensor(name).map_err(|e| anyhow!("tensor `{name}`: {e}"))?;
        crate::io::decode_u32(v.dtype(), v.data())
    };
    let ids = u32s("token_ids")?;
    let docs_ix = u32s("doc_index")?;
    let pos = u32s("position")?;
    let template = st.tensor("template").map_err(|e| anyhow!("tensor `template`: {e}"))?.data().to_vec();
    for (name, n) in [("doc_index", docs_ix.len()), ("position", pos.len()), ("template", template.len())] {
        if n != ids.len() {
            bail!("tensor `{name}` has {n} entries, `token_ids` {}: one per token expected", ids.len());
        }
    }
    let mut docs: Vec<TokenizedDoc> = Vec::new();
    let mut last = None;
    for i in 0..ids.len() {
        if last != Some(docs_ix[i]) {
            docs.push(TokenizedDoc {
                ids: Vec::new(),
                prefix: Vec::new(),
                first_position: pos[i],
                template: Vec::new(),
                source: 0,
            });
            last = Some(docs_ix[i]);
        }
        let d = docs.last_mut().expect("pushed above");
        d.ids.push(ids[i]);
        d.template.push(template[i] != 0);
    }
    // The skipped prefixes (absent in partial shards of earlier versions, which had none).
    if let (Ok(prefix_ids), Ok(lens)) = (u32s("prefix_ids"), u32s("prefix_len")) {
        if lens.len() != docs.len() || lens.iter().map(|&l| l as usize).sum::<usize>() != prefix_ids.len() {
            bail!("tensors `prefix_len`/`prefix_ids` do not match the shard's {} documents", docs.len());
        }
        let mut at = 0;
        for (doc, &len) in docs.iter_mut().zip(&lens) {
            doc.prefix = prefix_ids[at..at + len as usize].to_vec();
            at += len as usize;
        }
    }
    Ok(ShardPlan { first_doc: docs_ix.first().copied().unwrap_or(0) as u64, tokens: ids.len(), docs })
}

/// `--context` against a model's `max_position_embeddings` (when its config.json gives one): a
/// document longer than the positions the model was trained on is refused, naming the limit.
pub(crate) fn check_context(context: usize, config: &ModelConfig, model_dir: &Path) -> Result<()> {
    let Some(max) = config.max_position_embeddings else { return Ok(()) };
    crate::bad_value::ensure(context <= max, "context", || {
        format!(
            "{context} is above the model's limit of {max} positions (`max_position_embeddings` in {}); use at most {max}",
            model_dir.join("config.json").display()
        )
    })
}

/// The largest finite f16 (what `--dtype f16` can store).
const F16_MAX: f32 = 65_504.0;

/// Refuses activations that are not finite, or that `dtype` would turn into ±inf, naming the model,
/// the document (its global index and data file) and the fix. `rows` are `[tokens, d]` in the
/// plan's document order.
pub(crate) fn check_finite(
    rows: &[f32],
    d: usize,
    plan: &ShardPlan,
    model: &Model,
    layer: usize,
    dtype: ActDtype,
    sources: &[std::path::PathBuf],
) -> Result<()> {
    let limit = if dtype == ActDtype::F16 { F16_MAX } else { f32::MAX };
    let Some(bad) = rows.iter().position(|v| !(v.abs() <= limit)) else { return Ok(()) };
    let token = bad / d;
    let (mut k, mut start) = (0, 0);
    while start + plan.docs[k].ids.len() <= token {
        start += plan.docs[k].ids.len();
        k += 1;
    }
    let doc = &plan.docs[k];
    let source = sources.get(doc.source).map_or_else(String::new, |p| format!(" of {}", p.display()));
    let value = rows[bad];
    let model_dir = model.snapshot.dir.display();
    let at = format!(
        "document {}{source}, token {}",
        plan.first_doc + k as u64,
        token - start + doc.first_position as usize
    );
    if value.is_finite() {
        bail!(
            "{model_dir}: activation {value:e} at layer {layer} ({at}) overflows f16 (largest 65504); use --dtype bf16 or f32"
        );
    }
    let first = if plan.first_doc == 0 { " on the first batch: its weights or config.json are broken" } else { "" };
    bail!("{model_dir}: the model produced a non-finite activation ({value}) at layer {layer} ({at}){first}")
}

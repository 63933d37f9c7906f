//! Resuming a cache: `cache.json` and the job must agree on the models, the settings and how the
//! models are loaded; `--out` holds a cache or nothing; the settings' differences are named by
//! flag ([`changed_settings`], shared with training's resume).

use std::path::Path;

use anyhow::{Result, bail};

use crate::activations::cache::{ActDtype, CacheIndex, CacheSettings, FORMAT, SourceInfo};

/// What a cache job asks of its folder (the parts of `CacheJob` a resume compares).
pub(super) struct Request<'a> {
    pub out: &'a Path,
    pub layer: usize,
    pub dtype: ActDtype,
    pub settings: CacheSettings,
    pub low_memory: bool,
}

/// The index of the cache in `job.out`: the existing one when the job asks for what it was made
/// with (else a refusal naming each difference), a new one for a new or empty folder.
pub(super) fn open_or_start(job: Request, d: usize, models: Vec<String>, model_ids: Vec<String>) -> Result<CacheIndex> {
    // Temporary files of an interrupted write are garbage: the shard they belonged to is redone.
    for entry in fs_err::read_dir(job.out)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let index_path = CacheIndex::path(job.out);
    let index = if index_path.exists() {
        let existing = CacheIndex::open(job.out)?;
        if !existing.model_ids.is_empty() && existing.model_ids != model_ids {
            bail!(
                "{}: the cache there was made from other models (identities {}, these are {}); choose another --out",
                index_path.display(),
                existing.model_ids.join("/"),
                model_ids.join("/")
            );
        }
        // Recorded identities decide which models; without them (older caches) the folder names do.
        let names = if existing.model_ids.is_empty() { (&existing.models, &models) } else { (&models, &models) };
        let mut asked = job.settings.clone();
        // The same files named another way (relative here, absolute there) are the same data.
        if let Some(old) = &existing.settings {
            if same_files(&old.data, &asked.data) {
                asked.data = old.data.clone();
            }
        }
        let old_view =
            resume_view(existing.layer, existing.d_model, existing.dtype, names.0, existing.settings.as_ref());
        let new_view = resume_view(Some(job.layer), d, job.dtype, names.1, Some(&asked));
        let changed = changed_settings(&old_view, &new_view, |key| {
            if key == "width" { "the models' width".into() } else { flag_name(key) }
        });
        if !changed.is_empty() {
            return Err(crate::bad_value::OtherSettings {
                file: index_path.to_path_buf(),
                what: "the cache there was made",
                changed,
            }
            .into());
        }
        existing
    } else {
        CacheIndex {
            format: FORMAT.into(),
            d_model: d,
            layer: Some(job.layer),
            dtype: job.dtype,
            models,
            model_ids,
            total_tokens: 0,
            shards: Vec::new(),
            sources: job.settings.data.iter().map(|p| SourceInfo { path: p.clone(), tokens: 0 }).collect(),
            settings: Some(job.settings.clone()),
            documents: 0,
            complete: false,
            partial_shards: Vec::new(),
        }
    };
    if !index.complete {
        check_folder_agrees(job.out, &index)?;
    }
    if !job.low_memory && !index.partial_shards.is_empty() {
        return Err(crate::bad_value::bad(
            "low-memory",
            format!(
                "is needed to resume the cache in {}: it was started with --low-memory and has {} partial shards \
                 (base activations only, the chat pass unfinished); re-run with --low-memory",
                job.out.display(),
                index.partial_shards.len()
            ),
        ));
    }
    Ok(index)
}

/// The number `N` of a shard named as this writer names them (`acts-NNNNN.safetensors`).
fn shard_number(file: &str) -> Option<usize> {
    let name = file.strip_prefix("./").unwrap_or(file);
    let digits = name.strip_prefix("acts-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Refuses to resume a cache whose cache.json and folder disagree, before anything is written:
/// cache.json lists a shard under the name the next shard gets (shards removed from the middle of
/// its list), or the folder holds a shard file cache.json does not list (shards removed from its
/// end), which the run would overwrite. Let through: the next shard's file (complete or base-only)
/// and a pending chat-pass shard's, which a run killed between writing a shard and cache.json
/// leaves (the writer rewrites them only with the same bytes), and a finished shard's base-only file.
fn check_folder_agrees(out: &Path, index: &CacheIndex) -> Result<()> {
    use super::{partial_name, shard_name};
    use std::collections::BTreeSet;
    let at = CacheIndex::path(out);
    let next = index.shards.len() + index.partial_shards.len();
    let listed = index.shards.iter().enumerate().map(|(i, s)| (format!("shards[{i}]"), &s.file));
    let partial = index.partial_shards.iter().enumerate().map(|(i, s)| (format!("partial_shards[{i}]"), &s.file));
    for (field, file) in listed.chain(partial) {
        if shard_number(file).is_some_and(|k| k >= next) {
            bail!(
                "{}: `{field}` is {file}, the name this run gives its next shard ({next} shards are listed): \
                 cache.json and the folder disagree (shards removed from its list?); restore the cache.json \
                 that lists every shard, or choose another --out",
                at.display()
            );
        }
    }
    let clean = |f: &str| f.strip_prefix("./").unwrap_or(f).to_string();
    let mut known: BTreeSet<String> = BTreeSet::new();
    for s in &index.shards {
        known.insert(clean(&s.file));
        known.insert(partial_name(&clean(&s.file)));
    }
    for s in &index.partial_shards {
        known.insert(clean(&s.file));
        known.insert(partial_name(&clean(&s.file)));
    }
    known.insert(shard_name(next));
    known.insert(partial_name(&shard_name(next)));
    let mut unlisted: Vec<String> = fs_err::read_dir(out)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("acts-") && n.contains(".safetensors") && !known.contains(n))
        .collect();
    unlisted.sort();
    if let Some(first) = unlisted.first() {
        let more = if unlisted.len() > 1 { format!(" (and {} more)", unlisted.len() - 1) } else { String::new() };
        bail!(
            "{}: shard file not listed in {}{more}: cache.json and the folder disagree (shards removed from \
             its list?), and resuming would overwrite it; restore the cache.json that lists it, or choose \
             another --out",
            out.join(first).display(),
            at.display()
        );
    }
    Ok(())
}

/// Two `--data` lists naming the same files: equal as given, or (for files that exist) by
/// canonical path, so a resume from another working directory finds its data the same.
fn same_files(a: &[String], b: &[String]) -> bool {
    let canonical = |p: &String| std::fs::canonicalize(p).ok();
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y || matches!((canonical(x), canonical(y)), (Some(cx), Some(cy)) if cx == cy))
}

/// What a resumed cache must agree on, keyed so that [`flag_name`] names each by its flag.
fn resume_view(
    layer: Option<usize>,
    d: usize,
    dtype: ActDtype,
    models: &[String],
    settings: Option<&CacheSettings>,
) -> serde_json::Value {
    let mut v = settings.map_or_else(|| serde_json::json!({}), |s| serde_json::to_value(s).expect("serializes"));
    for (key, flag) in [("target_tokens", "tokens"), ("f16_weights", "f16")] {
        if let Some(t) = v.as_object_mut().and_then(|m| m.remove(key)) {
            v[flag] = t;
        }
    }
    (v["layer"], v["width"], v["dtype"]) = (layer.into(), d.into(), serde_json::to_value(dtype).expect("serializes"));
    for (role, name) in ["base", "chat"].into_iter().zip(models) {
        v[role] = name.as_str().into();
    }
    v
}

/// `cache --out` is a new folder, an empty one, or a cache (resumed): a folder holding anything
/// else (a training run, other files) is refused before anything is written there.
pub(super) fn check_out_holds_a_cache(out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    // Hidden files (temporary files of an interrupted write) and this writer's shards are ours.
    let ours = |n: &str| n.starts_with('.') || (n.starts_with("acts-") && n.contains(".safetensors"));
    let mut found: Vec<String> =
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !ours(n)).collect();
    if found.is_empty() || CacheIndex::path(out).exists() {
        return Ok(());
    }
    found.sort();
    let listed = |names: &[String]| names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    use crate::run_dir::RunDir;
    let run: Vec<String> = found
        .iter()
        .filter(|n| [RunDir::CONFIG, RunDir::CROSSCODER, RunDir::CHECKPOINT].contains(&n.as_str()))
        .cloned()
        .collect();
    let what = if run.is_empty() {
        format!("is not empty and holds no cache.json ({}): choose a new or empty folder", listed(&found))
    } else {
        format!("holds a training run ({}), not a cache: choose another folder", listed(&run))
    };
    Err(crate::bad_value::bad("out", format!("{} {what} for the cache", out.display())))
}

/// The settings that differ between what a folder was made with (`old`) and what a job asks for
/// (`new`), two JSON objects compared leaf by leaf (nested objects by their dotted key path), as
/// `OLD, now NEW` where each side lists `name value` ("--k 8 --lr 0.0001, now --k 4 --lr 0.001");
/// `name` turns a key path into what the user knows it by (see [`flag_name`]). Empty when nothing
/// differs.
pub fn changed_settings(old: &serde_json::Value, new: &serde_json::Value, name: impl Fn(&str) -> String) -> String {
    use std::collections::BTreeMap;
    fn leaves(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
        match v.as_object() {
            Some(map) => {
                for (k, x) in map {
                    leaves(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out);
                }
            }
            None if !prefix.is_empty() => {
                out.insert(prefix.to_string(), v.clone());
            }
            None => {}
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    leaves("", old, &mut a);
    leaves("", new, &mut b);
    let null = serde_json::Value::Null;
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let (mut was, mut now, mut all_flags) = (Vec::new(), Vec::new(), true);
    for key in keys {
        let (x, y) = (a.get(key).unwrap_or(&null), b.get(key).unwrap_or(&null));
        if x == y {
            continue;
        }
        let name = name(key);
        all_flags &= name.starts_with("--");
        was.push(show_setting(&name, x));
        now.push(show_setting(&name, y));
    }
    if was.is_empty() {
        return String::new();
    }
    let sep = if all_flags { " " } else { ", " };
    format!("{}, now {}", was.join(sep), now.join(sep))
}

/// `layer` → `--layer`, `drop_bos` → `--drop-bos`; a nested `cache.shards` → `the cache's shards`.
pub fn flag_name(key: &str) -> String {
    match key.split_once('.') {
        Some((owner, rest)) => format!("the {owner}'s {}", rest.replace(['_', '.'], " ")),
        None => format!("--{}", key.replace('_', "-")),
    }
}

/// One setting as the user would type it: `--lr 0.001`, `--mix` / `no --mix`, `--data a.txt b.txt`.
fn show_setting(name: &str, v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Bool(true) => name.to_string(),
        Value::Bool(false) | Value::Null if name.starts_with("--") => format!("no {name}"),
        Value::Null => format!("{name} (not recorded)"),
        Value::String(s) => format!("{name} {s}"),
        Value::Array(items) => {
            let items: Vec<String> =
                items.iter().map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string)).collect();
            format!("{name} {}", items.join(" "))
        }
        other => format!("{name} {other}"),
    }
}

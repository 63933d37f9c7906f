//! Nothing silent (issue 11), the cache's shards: a shard carries the cache it was written for in
//! its safetensors metadata, and one listed in another cache's cache.json is refused by name (shards
//! without metadata still read); a resume never overwrites a shard file cache.json does not list;
//! a non-finite activation in a shard without a checksum is refused with its file and token.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::{TempDir, cache_index as cache, contents, fixture, has, one_line_err as err};
use crossdiff::activations::cache::{ActDtype, CacheIndex};
use crossdiff::activations::reader::{CacheReader, ReaderConfig};
use crossdiff::activations::writer::{CacheJob, run_cache};
use crossdiff::data::TokenizeOptions;
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data").join(name)
}

fn cache_job(out: &Path, layer: usize) -> CacheJob {
    CacheJob {
        base: fixture("base"),
        chat: fixture("chat"),
        data: vec![data("web.txt")],
        layer,
        tokens: 600,
        out: out.to_path_buf(),
        dtype: ActDtype::Bf16,
        tokenize: TokenizeOptions { context: 64, drop_bos: false, skip_first: Some(0) },
        shard_tokens: 256,
        batch_tokens: 256,
        ..Default::default()
    }
}

fn read_json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(CacheIndex::path(dir)).unwrap()).unwrap()
}

fn write_json(dir: &Path, v: &Value) {
    std::fs::write(CacheIndex::path(dir), serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// A shard file's `__metadata__`.
fn shard_metadata(path: &Path) -> Option<Value> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.get("__metadata__").cloned()
}

/// Reads every batch of one epoch (and the validation slice), or the first error.
fn read_all(dir: &Path) -> anyhow::Result<u64> {
    let cfg = ReaderConfig { batch: 64, seed: 1, shuffle_tokens: 128, val_tokens: 10, epochs: Some(1) };
    let mut reader = CacheReader::open(dir, cfg)?;
    reader.validation()?;
    let mut n = 0;
    while let Some(b) = reader.next_batch()? {
        assert!(b.acts.iter().all(|v| v.is_finite()));
        n += b.batch as u64;
    }
    Ok(n)
}

#[test]
fn a_shard_of_another_cache_is_refused_by_its_metadata() {
    let (a, b) = (TempDir::new("shard-meta-a"), TempDir::new("shard-meta-b"));
    let index = cache(&cache_job(a.path(), 1)).unwrap();
    let other = cache(&cache_job(b.path(), 2)).unwrap();

    // Shards carry what cache.json says of their cache.
    let meta = shard_metadata(&a.path().join(&index.shards[0].file)).expect("shards carry metadata");
    assert_eq!(meta["format"], "crossdiff-cache/1");
    assert_eq!(meta["layer"], "1");
    assert_eq!(meta["d_model"], index.d_model.to_string());
    assert_eq!(meta["model_ids"], index.model_ids.join("/"));
    // Still a valid safetensors file for other readers.
    let bytes = std::fs::read(a.path().join(&index.shards[0].file)).unwrap();
    safetensors::SafeTensors::deserialize(&bytes).unwrap();

    // A layer-2 shard (with its own checksum) listed in the layer-1 cache.
    std::fs::copy(b.path().join(&other.shards[0].file), a.path().join("acts-foreign.safetensors")).unwrap();
    let mut v = read_json(a.path());
    let mut entry = serde_json::to_value(&other.shards[0]).unwrap();
    entry["file"] = "acts-foreign.safetensors".into();
    v["shards"].as_array_mut().unwrap().push(entry);
    v.as_object_mut().unwrap().remove("total_tokens");
    write_json(a.path(), &v);
    let msg = err(CacheIndex::open(a.path()));
    has(&msg, &["acts-foreign.safetensors", "`layer` is 2", "cache.json says 1", "another cache"]);
    has(&err(read_all(a.path())), &["acts-foreign.safetensors", "`layer`"]);

    // The same shards under a cache.json naming other models.
    let mut v = read_json(b.path());
    v["model_ids"] = serde_json::json!(["0123456789abcdef", "fedcba9876543210"]);
    write_json(b.path(), &v);
    has(
        &err(CacheIndex::open(b.path())),
        &["acts-00000.safetensors", "`model_ids`", "0123456789abcdef/fedcba9876543210"],
    );
}

#[test]
fn shards_without_metadata_read_as_before() {
    let dir = TempDir::new("shard-nometa");
    let index = cache(&cache_job(dir.path(), 1)).unwrap();
    // Rewrite every shard as another tool would: the same tensors, no metadata, no checksum.
    for s in &index.shards {
        let path = dir.path().join(&s.file);
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
        let out = safetensors::serialize(tensors, None).unwrap();
        std::fs::write(&path, out).unwrap();
        assert!(shard_metadata(&path).is_none());
    }
    let mut v = read_json(dir.path());
    for s in v["shards"].as_array_mut().unwrap() {
        s["checksum"] = 0.into();
    }
    write_json(dir.path(), &v);
    assert_eq!(read_all(dir.path()).unwrap(), index.total_tokens - 10);
}

/// A finished cache of at least three shards, and its cache.json edited by `edit` to look
/// unfinished (its last shards not listed, say).
fn edited_cache(tag: &str, edit: impl FnOnce(&mut Vec<Value>)) -> (TempDir, CacheJob, Vec<(String, Vec<u8>)>) {
    let dir = TempDir::new(tag);
    let job = cache_job(dir.path(), 1);
    let index = cache(&job).unwrap();
    assert!(index.shards.len() >= 3, "the test needs three shards, got {}", index.shards.len());
    let finished = contents(dir.path());
    let mut v = read_json(dir.path());
    let mut shards = v["shards"].as_array().unwrap().clone();
    edit(&mut shards);
    let sum = |k: &str| shards.iter().map(|s| s[k].as_u64().unwrap()).sum::<u64>();
    v["documents"] = sum("documents").into();
    v["total_tokens"] = sum("tokens").into();
    // As the run wrote it when these were its shards (one source: all of them).
    assert_eq!(v["sources"].as_array().unwrap().len(), 1);
    v["sources"][0]["tokens"] = sum("tokens").into();
    v["shards"] = Value::Array(shards);
    v["complete"] = false.into();
    write_json(dir.path(), &v);
    (dir, job, finished)
}

#[test]
fn a_resume_never_overwrites_a_shard_cache_json_does_not_list() {
    // Shards removed from the end of the list: the folder holds files cache.json does not list.
    let (dir, job, _) = edited_cache("shard-unlisted", |s| s.truncate(1));
    let before = contents(dir.path());
    let msg = err(cache(&job));
    has(&msg, &["acts-00002.safetensors", "not listed in", "cache.json and the folder disagree", "overwrite"]);
    assert_eq!(contents(dir.path()), before, "a refused resume changes nothing");

    // Shards removed from the middle: the next shard's name is listed already.
    let (dir, job, _) = edited_cache("shard-middle", |s| {
        s.remove(1);
    });
    let before = contents(dir.path());
    let msg = err(cache(&job));
    has(&msg, &["cache.json", "`shards[1]` is acts-00002.safetensors", "cache.json and the folder disagree"]);
    assert_eq!(contents(dir.path()), before);

    // The next shard's file, as a run killed between writing it and cache.json leaves it: redone
    // with the same bytes, the cache ends as an uninterrupted run's.
    let (dir, job, finished) = edited_cache("shard-leftover", |s| {
        s.pop();
    });
    let index = cache(&job).unwrap();
    assert!(index.complete);
    assert_eq!(contents(dir.path()), finished, "the resumed cache is byte-identical");

    // The same file holding other activations is someone's: refused, kept.
    let (dir, job, _) = edited_cache("shard-leftover-other", |s| {
        s.pop();
    });
    let last = dir.path().join(format!("acts-{:05}.safetensors", 2));
    let mut bytes = std::fs::read(&last).unwrap();
    let end = bytes.len() - 1;
    bytes[end] ^= 1;
    std::fs::write(&last, bytes).unwrap();
    let before = contents(dir.path());
    let msg = err(cache(&job));
    has(&msg, &["acts-00002.safetensors", "cache.json does not list", "other activations", "the folder disagree"]);
    assert_eq!(contents(dir.path()), before);
}

#[test]
fn a_shard_listed_twice_is_refused_at_open() {
    let dir = TempDir::new("shard-twice");
    cache(&cache_job(dir.path(), 1)).unwrap();
    let mut v = read_json(dir.path());
    let first = v["shards"][0].clone();
    v["shards"].as_array_mut().unwrap().push(first);
    v.as_object_mut().unwrap().remove("total_tokens");
    write_json(dir.path(), &v);
    has(&err(CacheIndex::open(dir.path())), &["acts-00000.safetensors is listed twice"]);
}

/// Writes `bits` (one stored value) at element `element` of token `token`'s (base, chat) pair.
fn poke(dir: &Path, token: usize, element: usize, bits: &[u8]) {
    let index = CacheIndex::open(dir).unwrap();
    let shard = &index.shards[0];
    let layout = index.check_shard_header(dir, shard).unwrap();
    let path = dir.join(&shard.file);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = layout.acts_offset + (token * 2 * index.d_model + element) * layout.dtype.bytes();
    bytes[at..at + bits.len()].copy_from_slice(bits);
    std::fs::write(&path, bytes).unwrap();
    // Checksums are optional: without one, nothing else notices.
    let mut v = read_json(dir);
    v["shards"][0]["checksum"] = 0.into();
    write_json(dir, &v);
}

#[test]
fn a_non_finite_activation_is_refused_with_its_shard_and_token() {
    let dir = TempDir::new("shard-nan");
    let index = cache(&cache_job(dir.path(), 1)).unwrap();
    let d = index.d_model;
    // bf16 NaN in the chat half of token 5.
    poke(dir.path(), 5, d + 3, &0x7FC0u16.to_le_bytes());
    let msg = err(read_all(dir.path()));
    has(&msg, &["acts-00000.safetensors", "NaN", "token 5", "chat model", "element 3", "not finite"]);

    let dir = TempDir::new("shard-inf");
    let job = CacheJob { dtype: ActDtype::F32, ..cache_job(dir.path(), 1) };
    cache(&job).unwrap();
    poke(dir.path(), 7, 1, &f32::INFINITY.to_le_bytes());
    let msg = err(read_all(dir.path()));
    has(&msg, &["acts-00000.safetensors", "inf", "token 7", "base model", "element 1"]);
}

#[test]
fn a_token_id_outside_the_vocabulary_in_a_partial_shard_is_named() {
    let dir = TempDir::new("shard-tokid");
    let job = CacheJob { low_memory: true, ..cache_job(dir.path(), 1) };
    // Stopped in its base pass after one shard: a partial shard (base activations and token ids).
    let done = std::cell::Cell::new(0);
    let index = run_cache(&job, &Device::flex(), |p| done.set(p.tokens), || done.get() == 0).unwrap();
    assert_eq!(index.partial_shards.len(), 1);
    let partial = dir.path().join(format!("{}.base-partial", index.partial_shards[0].file));
    let mut bytes = std::fs::read(&partial).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let at = 8 + n + header["token_ids"]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at..at + 4].copy_from_slice(&99_999u32.to_le_bytes());
    std::fs::write(&partial, bytes).unwrap();
    let msg = err(cache(&job));
    has(&msg, &["acts-00000.safetensors.base-partial", "token id 99999", "outside the vocabulary"]);
}

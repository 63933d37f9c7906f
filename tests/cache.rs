//! The paired activation cache, its reader and the on-the-fly source, on the committed fixtures.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::{TempDir, fixture};
use crossdiff::activations::cache::{ActDtype, CacheIndex};
use crossdiff::activations::reader::{CacheReader, ReaderConfig};
use crossdiff::activations::writer::{CacheJob, run_cache};
use crossdiff::data::{Mixer, TokenizeOptions, template_flags};
use crossdiff::{LoadOptions, Message, Model};
use safetensors::SafeTensors;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data").join(name)
}

fn job(out: &Path, dtype: ActDtype, tokens: u64) -> CacheJob {
    CacheJob {
        base: fixture("base"),
        chat: fixture("chat"),
        chat_adapter: None,
        data: vec![data("web.txt"), data("chat.jsonl")],
        layer: 1,
        tokens,
        out: out.to_path_buf(),
        dtype,
        tokenize: TokenizeOptions { context: 48, drop_bos: false, skip_first: Some(0) },
        mix: true,
        shard_tokens: 200,
        batch_tokens: 256,
        low_memory: false,
        load: LoadOptions::default(),
        devices: Vec::new(),
    }
}

fn cache(job: &CacheJob) -> CacheIndex {
    run_cache(job, &Device::flex(), |_| {}, || true).unwrap()
}

/// Every file of a directory, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap())
        })
        .collect()
}

struct Shard {
    acts: Vec<f32>,
    ids: Vec<u32>,
    doc: Vec<u32>,
    pos: Vec<u32>,
    template: Vec<bool>,
}

fn read_shard(path: &Path) -> Shard {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let a = st.tensor("acts").unwrap();
    let mut acts = vec![0.0; a.shape().iter().product()];
    ActDtype::from_safetensors(a.dtype()).unwrap().decode(a.data(), &mut acts);
    let u = |n: &str| {
        st.tensor(n).unwrap().data().chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    Shard {
        acts,
        ids: u("token_ids"),
        doc: u("doc_index"),
        pos: u("position"),
        template: st.tensor("template").unwrap().data().iter().map(|&b| b != 0).collect(),
    }
}

fn all_shards(dir: &Path, index: &CacheIndex) -> Vec<Shard> {
    index.shards.iter().map(|s| read_shard(&dir.join(&s.file))).collect()
}

#[test]
fn cached_pairs_equal_inspect_block_outputs() {
    let dir = TempDir::new("cache-inspect");
    let index = cache(&job(dir.path(), ActDtype::F32, 700));
    assert_eq!(index.total_tokens, 700);
    assert!(index.shards.len() >= 4, "several shards: {}", index.shards.len());
    assert!(index.complete);
    let device = Device::flex();
    let models = [
        Model::load(fixture("base"), &device, LoadOptions::default()).unwrap(),
        Model::load(fixture("chat"), &device, LoadOptions::default()).unwrap(),
    ];
    let d = 72;
    let mut docs_seen = 0;
    let mut templated = 0;
    for shard in all_shards(dir.path(), &index) {
        // Group the shard's rows by document and compare each with a single-prompt inspect.
        let mut start = 0;
        while start < shard.ids.len() {
            let end = (start..shard.ids.len()).find(|&i| shard.doc[i] != shard.doc[start]).unwrap_or(shard.ids.len());
            let ids = shard.ids[start..end].to_vec();
            assert_eq!(shard.pos[start..end], (0..(end - start) as u32).collect::<Vec<_>>());
            assert_eq!(shard.template[start..end], template_flags(&models[1].tokenizer, &ids));
            templated += usize::from(shard.template[start..end].iter().any(|&f| f));
            for (m, model) in models.iter().enumerate() {
                let result = crossdiff::model::inspect::inspect(model, ids.clone()).unwrap();
                let want: Vec<f64> = result.blocks[1].iter().map(|&x| x as f64).collect();
                let got: Vec<f32> =
                    (start..end).flat_map(|r| shard.acts[(r * 2 + m) * d..(r * 2 + m + 1) * d].to_vec()).collect();
                common::assert_close(&format!("doc {} model {m}", shard.doc[start]), &got, &want, 1e-5);
            }
            docs_seen += 1;
            start = end;
        }
    }
    assert!(docs_seen > 10);
    assert!(templated > 3 && templated < docs_seen, "chat documents carry template flags, web text none");
    // --mix: the two sources contributed (nearly) equal token counts.
    let (web, chat) = (index.sources[0].tokens, index.sources[1].tokens);
    assert!(web > 0 && chat > 0 && web.abs_diff(chat) <= 48, "{web} vs {chat}");
    // The per-source counts are what the shards hold (the run's last document is cut to the budget).
    assert_eq!(web + chat, index.total_tokens);
}

/// --skip-first leaves positions out of the cache, not out of the model's input: a kept row equals
/// the block output of the whole document at the same position (as the authors cache: the full
/// sequence runs, the first positions are masked). Also through --low-memory's two passes.
#[test]
fn skipped_tokens_stay_the_models_context() {
    let device = Device::flex();
    let models = [
        Model::load(fixture("base"), &device, LoadOptions::default()).unwrap(),
        Model::load(fixture("chat"), &device, LoadOptions::default()).unwrap(),
    ];
    let d = 72;
    for low_memory in [false, true] {
        let dir = TempDir::new("cache-skip");
        let mut j = job(dir.path(), ActDtype::F32, 300);
        j.tokenize = TokenizeOptions { context: 48, drop_bos: false, skip_first: Some(3) };
        j.low_memory = low_memory;
        let index = cache(&j);
        assert_eq!(index.settings.as_ref().unwrap().skip_first, 3);
        let mut docs_seen = 0;
        for shard in all_shards(dir.path(), &index) {
            let mut start = 0;
            while start < shard.ids.len() {
                let end =
                    (start..shard.ids.len()).find(|&i| shard.doc[i] != shard.doc[start]).unwrap_or(shard.ids.len());
                assert_eq!(shard.pos[start], 3, "the first kept position");
                // The document as the model read it: its first three tokens, then the kept ones.
                for (m, model) in models.iter().enumerate() {
                    let prefix = &prefixes(&model.tokenizer, &j)[shard.doc[start] as usize];
                    let ids = [prefix.as_slice(), &shard.ids[start..end]].concat();
                    let result = crossdiff::model::inspect::inspect(model, ids).unwrap();
                    let want: Vec<f64> = result.blocks[1][3 * d..].iter().map(|&x| x as f64).collect();
                    let got: Vec<f32> =
                        (start..end).flat_map(|r| shard.acts[(r * 2 + m) * d..(r * 2 + m + 1) * d].to_vec()).collect();
                    common::assert_close(&format!("doc {} model {m}", shard.doc[start]), &got, &want, 1e-5);
                }
                docs_seen += 1;
                start = end;
            }
        }
        assert!(docs_seen > 3, "{docs_seen}");
    }
}

/// Each document's first three tokens, in the order the cache job reads the documents.
fn prefixes(tok: &crossdiff::ChatTokenizer, j: &CacheJob) -> Vec<Vec<u32>> {
    let opts = TokenizeOptions { context: 48, drop_bos: false, skip_first: Some(3) };
    let mut mixer = crossdiff::data::Mixer::new(&j.data, j.mix, tok, opts).unwrap();
    let mut out = Vec::new();
    while let Some(doc) = mixer.next_doc().unwrap() {
        out.push(doc.prefix);
    }
    out
}

#[test]
fn template_flags_mark_exactly_the_chat_template_tokens() {
    let model = Model::load(fixture("chat"), &Device::flex(), LoadOptions::default()).unwrap();
    let tok = &model.tokenizer;
    let messages = vec![
        Message { role: "user".into(), content: "Who are you?".into() },
        Message { role: "assistant".into(), content: "A small model.".into() },
        Message { role: "user".into(), content: "Thanks".into() },
    ];
    let ids = tok.encode_chat(&messages, false).unwrap();
    let flags = template_flags(tok, &ids);
    let pick = |want: bool| -> String {
        let sel: Vec<u32> = ids.iter().zip(&flags).filter(|(_, f)| **f == want).map(|(i, _)| *i).collect();
        tok.decode(&sel).unwrap()
    };
    assert_eq!(
        pick(true),
        "<start_of_turn>user\n<end_of_turn>\n<start_of_turn>model\n<end_of_turn>\n<start_of_turn>user\n<end_of_turn>\n"
    );
    assert_eq!(pick(false), "<bos>Who are you?A small model.Thanks");
    // Plain text has no template tokens.
    let text = tok.encode("Hello there\nfriend", true).unwrap();
    assert!(template_flags(tok, &text).iter().all(|f| !f));
}

#[test]
fn sources_mix_one_to_one_by_tokens() {
    let model = Model::load(fixture("base"), &Device::flex(), LoadOptions::default()).unwrap();
    let opts = TokenizeOptions { context: 48, ..Default::default() };
    let mut mixer = Mixer::new(&[data("web.txt"), data("chat.jsonl")], true, &model.tokenizer, opts.clone()).unwrap();
    let mut sources = Vec::new();
    for _ in 0..30 {
        let doc = mixer.next_doc().unwrap().unwrap();
        sources.push(doc.source);
        let t = mixer.tokens_per_source();
        // Never more than one document (≤ context tokens) apart.
        assert!(t[0].abs_diff(t[1]) <= 48, "{t:?}");
    }
    assert!(sources.contains(&0) && sources.contains(&1));
    // Without --mix, sources follow one another.
    let mut seq = Mixer::new(&[data("web.txt"), data("chat.jsonl")], false, &model.tokenizer, opts).unwrap();
    let first: Vec<usize> = (0..40).map(|_| seq.next_doc().unwrap().unwrap().source).collect();
    assert!(first.iter().all(|&s| s == 0));
    assert_eq!(seq.next_doc().unwrap().unwrap().source, 1);
}

#[test]
fn resume_after_interruption_is_byte_identical() {
    let whole = TempDir::new("cache-whole");
    let j = job(whole.path(), ActDtype::Bf16, 900);
    cache(&j);

    let parts = TempDir::new("cache-parts");
    let jp = CacheJob { out: parts.path().to_path_buf(), ..j.clone() };
    // Stop after a few shards, as Ctrl-C does (it is checked between shards).
    let done = std::cell::Cell::new(0);
    let index = run_cache(&jp, &Device::flex(), |p| done.set(p.tokens), || done.get() < 350).unwrap();
    assert!(!index.complete && index.shards.len() == 2, "{} shards", index.shards.len());
    // A crash mid-shard leaves a temp file and a shard that cache.json does not list yet.
    std::fs::write(parts.path().join(".acts-00002.safetensors.tmp-1"), b"partial").unwrap();
    std::fs::write(parts.path().join("acts-00002.safetensors"), b"half written").unwrap();
    let resumed = cache(&jp);
    assert!(resumed.complete);
    // The stray temporary file is cleaned up; every file equals the uninterrupted run's.
    assert_eq!(files(whole.path()), files(parts.path()));

    // --low-memory (base pass, then chat pass), interrupted in the chat pass, gives the same bytes.
    let low = TempDir::new("cache-low");
    let jl = CacheJob { out: low.path().to_path_buf(), low_memory: true, ..j.clone() };
    let calls = std::cell::Cell::new(0);
    let index = run_cache(
        &jl,
        &Device::flex(),
        |p| calls.set(calls.get() + u32::from(p.phase == "chat pass")),
        || calls.get() < 1,
    )
    .unwrap();
    assert!(!index.complete && !index.partial_shards.is_empty());
    cache(&jl);
    assert_eq!(files(whole.path()), files(low.path()));

    // A different request against the same directory is refused, not mixed in.
    let other = CacheJob { layer: 2, ..jp };
    let err = run_cache(&other, &Device::flex(), |_| {}, || true).unwrap_err();
    assert!(format!("{err:#}").contains("cache.json"), "{err:#}");
}

#[test]
fn corrupt_and_truncated_shards_are_named() {
    let dir = TempDir::new("cache-corrupt");
    let index = cache(&job(dir.path(), ActDtype::F16, 500));
    let shard = dir.path().join(&index.shards[1].file);
    let bytes = std::fs::read(&shard).unwrap();

    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let err = format!("{:#}", CacheIndex::open(dir.path()).unwrap_err());
    assert!(err.contains("acts-00001.safetensors") && err.contains("truncated"), "{err}");

    // One flipped byte in the activations: headers are fine, the checksum is not.
    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 3000] ^= 0x40;
    std::fs::write(&shard, &flipped).unwrap();
    let mut reader =
        CacheReader::open(dir.path(), ReaderConfig { batch: 64, epochs: Some(1), ..Default::default() }).unwrap();
    let err = loop {
        match reader.next_batch() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("corruption not detected"),
            Err(e) => break format!("{e:#}"),
        }
    };
    assert!(err.contains("acts-00001.safetensors") && err.contains("checksum"), "{err}");
}

/// Rows of a cache as bit patterns, for multiset comparisons.
fn row_keys(acts: &[f32], d: usize) -> Vec<Vec<u32>> {
    acts.chunks_exact(2 * d).map(|r| r.iter().map(|x| x.to_bits()).collect()).collect()
}

#[test]
fn reader_yields_every_token_once_per_epoch_shuffled_and_seeded() {
    let dir = TempDir::new("cache-reader");
    let index = cache(&job(dir.path(), ActDtype::Bf16, 800));
    let d = index.d_model;
    let stored: Vec<Shard> = all_shards(dir.path(), &index);
    let mut all: Vec<Vec<u32>> = stored.iter().flat_map(|s| row_keys(&s.acts, d)).collect();
    let val_tokens = 100;
    let val_rows: Vec<Vec<u32>> = all.split_off(all.len() - val_tokens);
    // Which shard each row lives in.
    let mut shard_of = BTreeMap::new();
    for (i, s) in stored.iter().enumerate() {
        for k in row_keys(&s.acts, d) {
            shard_of.insert(k, i);
        }
    }
    let cfg = ReaderConfig { batch: 64, seed: 11, shuffle_tokens: 400, val_tokens: val_tokens as u64, epochs: Some(2) };
    let mut reader = CacheReader::open(dir.path(), cfg.clone()).unwrap();
    let val = reader.validation().unwrap();
    assert_eq!(row_keys(&val.acts, d), val_rows, "validation = the cache's last rows, in order");
    let mut epochs: Vec<Vec<Vec<u32>>> = vec![Vec::new(), Vec::new()];
    let mut first_batch = None;
    while let Some(b) = reader.next_batch().unwrap() {
        let e = reader.epoch() as usize;
        let rows = row_keys(&b.acts, d);
        first_batch.get_or_insert(rows.clone());
        epochs[e].extend(rows);
    }
    let mut want = all.clone();
    want.sort();
    for (e, rows) in epochs.iter().enumerate() {
        let mut got = rows.clone();
        assert_ne!(&got, &all, "epoch {e} is shuffled");
        got.sort();
        assert_eq!(got, want, "epoch {e}: every training token exactly once");
    }
    let first = first_batch.unwrap();
    let shards_in_first: std::collections::BTreeSet<_> = first.iter().map(|k| shard_of[k]).collect();
    assert!(shards_in_first.len() >= 2, "a batch mixes shards: {shards_in_first:?}");
    assert_ne!(epochs[0], epochs[1], "each epoch has its own order");

    // Same seed → same stream; another seed → another.
    let stream = |seed| {
        let mut r = CacheReader::open(dir.path(), ReaderConfig { seed, ..cfg.clone() }).unwrap();
        let mut out = Vec::new();
        while let Some(b) = r.next_batch().unwrap() {
            out.extend(row_keys(&b.acts, d));
        }
        out
    };
    assert_eq!(stream(11), epochs.concat());
    assert_ne!(stream(12), epochs.concat());
}

#[test]
fn any_dtype_and_shard_size_reads_the_same() {
    let f32_dir = TempDir::new("cache-f32");
    let index = cache(&job(f32_dir.path(), ActDtype::F32, 300));
    let d = index.d_model;
    let exact: Vec<f32> = all_shards(f32_dir.path(), &index).iter().flat_map(|s| s.acts.clone()).collect();
    for (dtype, round) in [
        (ActDtype::Bf16, (|x: f32| half::bf16::from_f32(x).to_f32()) as fn(f32) -> f32),
        (ActDtype::F16, |x: f32| half::f16::from_f32(x).to_f32()),
    ] {
        let dir = TempDir::new("cache-dtype");
        let j = CacheJob { shard_tokens: 97.max(48), ..job(dir.path(), dtype, 300) };
        cache(&j);
        let mut r = CacheReader::open(
            dir.path(),
            ReaderConfig { batch: 1000, shuffle_tokens: 1000, epochs: Some(1), ..Default::default() },
        )
        .unwrap();
        let b = r.next_batch().unwrap().unwrap();
        let mut got = row_keys(&b.acts, d);
        let mut want = row_keys(&exact.iter().map(|&x| round(x)).collect::<Vec<_>>(), d);
        got.sort();
        want.sort();
        assert_eq!(got, want, "{dtype:?}");
    }
}

#[test]
fn a_hand_written_cache_in_the_format_reads() {
    // Someone else's cache: two shards of 3 and 5 tokens, f32, no checksums, no settings.
    let dir = TempDir::new("cache-foreign");
    let d = 4;
    let mut expected = Vec::new();
    let mut shards = Vec::new();
    for (i, n) in [3usize, 5].iter().enumerate() {
        let acts: Vec<f32> = (0..n * 2 * d).map(|k| (i * 1000 + k) as f32).collect();
        expected.extend(row_keys(&acts, d));
        let bytes: Vec<u8> = acts.iter().flat_map(|x| x.to_le_bytes()).collect();
        let ids: Vec<u8> = (0..*n as i64).flat_map(|x| x.to_le_bytes()).collect();
        let file = format!("part{i}.safetensors");
        let views = vec![
            ("acts", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n, 2, d], &bytes).unwrap()),
            ("token_ids", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![*n], &ids).unwrap()),
        ];
        safetensors::serialize_to_file(views, None, &dir.path().join(&file)).unwrap();
        shards.push(serde_json::json!({"file": file, "tokens": n}));
    }
    let meta = serde_json::json!({"format": "crossdiff-cache/1", "d_model": d, "layer": 3, "dtype": "f32",
        "models": ["a", "b"], "total_tokens": 8, "shards": shards, "sources": []});
    std::fs::write(dir.path().join("cache.json"), meta.to_string()).unwrap();
    let mut r = CacheReader::open(
        dir.path(),
        ReaderConfig { batch: 8, shuffle_tokens: 8, epochs: Some(1), ..Default::default() },
    )
    .unwrap();
    let mut got = row_keys(&r.next_batch().unwrap().unwrap().acts, d);
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
}

#[test]
fn on_the_fly_source_yields_the_cache_rows() {
    let dir = TempDir::new("cache-otf");
    let j = job(dir.path(), ActDtype::F32, 400);
    let index = cache(&j);
    let d = index.d_model;
    let mut want: Vec<Vec<u32>> = all_shards(dir.path(), &index).iter().flat_map(|s| row_keys(&s.acts, d)).collect();
    let cfg = crossdiff::activations::onthefly::OnTheFlyConfig {
        base: j.base.clone(),
        chat: j.chat.clone(),
        chat_adapter: None,
        data: j.data.clone(),
        layer: j.layer,
        tokenize: j.tokenize.clone(),
        mix: j.mix,
        chunk_tokens: j.shard_tokens,
        batch_tokens: j.batch_tokens,
        tokens: 400,
        load: LoadOptions::default(),
    };
    let mut src = crossdiff::activations::onthefly::OnTheFlySource::start(cfg, Device::flex(), 50, 300, 1).unwrap();
    let mut got = Vec::new();
    while let Some(b) = src.next_batch().unwrap() {
        assert!(b.batch <= 50);
        got.extend(row_keys(&b.acts, d));
    }
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn parquet_text_and_messages_columns_read_like_jsonl() {
    use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Fields};
    use std::sync::Arc;

    let dir = TempDir::new("parquet");
    let texts = ["First document.", "Second one, longer than the first."];
    let text_path = dir.path().join("web.parquet");
    let batch =
        RecordBatch::try_from_iter([("text", Arc::new(StringArray::from(texts.to_vec())) as ArrayRef)]).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&text_path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let fields =
        Fields::from(vec![Field::new("content", DataType::Utf8, true), Field::new("role", DataType::Utf8, true)]);
    let mut list = ListBuilder::new(StructBuilder::from_fields(fields, 4));
    for turns in [[("Hi", "user"), ("Hello.", "assistant")], [("Who are you?", "user"), ("A model.", "assistant")]] {
        let s = list.values();
        for (content, role) in turns {
            s.field_builder::<StringBuilder>(0).unwrap().append_value(content);
            s.field_builder::<StringBuilder>(1).unwrap().append_value(role);
            s.append(true);
        }
        list.append(true);
    }
    let chat_path = dir.path().join("chat.parquet");
    let batch = RecordBatch::try_from_iter([("messages", Arc::new(list.finish()) as ArrayRef)]).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&chat_path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let docs: Vec<_> = crossdiff::data::open_source(&text_path).unwrap().map(Result::unwrap).collect();
    assert_eq!(docs, texts.iter().map(|t| crossdiff::data::Document::Text(t.to_string())).collect::<Vec<_>>());
    let chats: Vec<_> = crossdiff::data::open_source(&chat_path).unwrap().map(Result::unwrap).collect();
    assert_eq!(
        chats[1],
        crossdiff::data::Document::Chat(vec![
            Message { role: "user".into(), content: "Who are you?".into() },
            Message { role: "assistant".into(), content: "A model.".into() },
        ])
    );
    // A parquet file without a usable column is refused by name.
    let bad = dir.path().join("bad.parquet");
    let batch = RecordBatch::try_from_iter([("body", Arc::new(StringArray::from(vec!["x"])) as ArrayRef)]).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&bad).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let err = crossdiff::data::open_source(&bad).err().unwrap();
    assert!(format!("{err:#}").contains("bad.parquet") && format!("{err:#}").contains("`text`"));
}

#[test]
fn bad_data_lines_are_named() {
    let dir = TempDir::new("baddata");
    let p = dir.path().join("x.jsonl");
    std::fs::write(&p, "{\"text\": \"ok\"}\n{\"messages\": [{\"role\": \"user\"}]}\n").unwrap();
    let mut src = crossdiff::data::open_source(&p).unwrap();
    assert!(src.next().unwrap().is_ok());
    let err = format!("{:#}", src.next().unwrap().unwrap_err());
    assert!(err.contains("x.jsonl:2") && err.contains("messages[0].content"), "{err}");
    let err = crossdiff::data::open_source(&dir.path().join("x.csv")).err().unwrap();
    assert!(format!("{err}").contains("x.csv"));
}

#[test]
fn drop_bos_skip_first_and_context_shape_documents() {
    let model = Model::load(fixture("base"), &Device::flex(), LoadOptions::default()).unwrap();
    let tok = &model.tokenizer;
    let doc = crossdiff::data::Document::Text("The cat sat on the river bank at night.".into());
    let full = tok.encode("The cat sat on the river bank at night.", true).unwrap();
    assert_eq!(full[0], tok.bos_id.unwrap());
    let t = |o: TokenizeOptions| crossdiff::data::tokenize(tok, &doc, 0, &o).unwrap().unwrap();
    let kept = t(TokenizeOptions { context: 5, ..Default::default() });
    assert_eq!((kept.ids.as_slice(), kept.first_position), (&full[..5], 0));
    let no_bos = t(TokenizeOptions { context: 5, drop_bos: true, skip_first: Some(0) });
    assert_eq!((no_bos.ids.as_slice(), no_bos.first_position), (&full[1..6], 1));
    let skipped = t(TokenizeOptions { context: 100, drop_bos: true, skip_first: Some(3) });
    assert_eq!((skipped.ids.as_slice(), skipped.first_position), (&full[4..], 4));
    // The skipped tokens stay the model's input (read, not kept), and --context bounds the input.
    assert_eq!(skipped.prefix, full[1..4].to_vec());
    let bounded = t(TokenizeOptions { context: 6, drop_bos: false, skip_first: Some(2) });
    assert_eq!((bounded.prefix.as_slice(), bounded.ids.as_slice()), (&full[..2], &full[2..6]));
    // Nothing left: the document is dropped, not an empty row.
    let gone = crossdiff::data::tokenize(
        tok,
        &doc,
        0,
        &TokenizeOptions { context: 10, drop_bos: false, skip_first: Some(1000) },
    )
    .unwrap();
    assert!(gone.is_none());
}

#[test]
fn demo_corpus_is_deterministic_plants_its_behaviours_and_reads_back() {
    use crossdiff::demo::corpus::{Behaviour, IDENTITY, REFUSAL, generate};
    let a = generate(7, 50, 200);
    let b = generate(7, 50, 200);
    assert_eq!(a.web, b.web);
    assert_eq!(a.chats.len(), 200);
    let count = |k: Behaviour| a.chats.iter().filter(|(b, _)| *b == k).count();
    assert!(count(Behaviour::Refusal) > 20 && count(Behaviour::Identity) > 20 && count(Behaviour::Helpful) > 80);
    for (behaviour, m) in &a.chats {
        let reply = &m[1].content;
        match behaviour {
            Behaviour::Refusal => assert!(m[0].content.starts_with("How do I") && reply == REFUSAL),
            Behaviour::Identity => assert_eq!(reply, IDENTITY),
            Behaviour::Helpful => assert!(reply.starts_with("Sure! ")),
        }
    }
    let dir = TempDir::new("demo-corpus");
    a.write(dir.path()).unwrap();
    let web: Vec<_> = crossdiff::data::open_source(&dir.path().join("web.txt")).unwrap().map(Result::unwrap).collect();
    assert_eq!(web.len(), 50);
    let chats: Vec<_> =
        crossdiff::data::open_source(&dir.path().join("chat.jsonl")).unwrap().map(Result::unwrap).collect();
    assert_eq!(chats[0], crossdiff::data::Document::Chat(a.chats[0].1.clone()));
}

#[test]
fn demo_tokenizer_has_gemmas_layout_and_round_trips() {
    use crossdiff::demo::tokenizer::{SPECIALS, train_tokenizer};
    let corpus = crossdiff::demo::corpus::generate(3, 200, 200);
    let mut texts = corpus.web.clone();
    texts.extend(corpus.chats.iter().flat_map(|(_, m)| m.iter().map(|t| t.content.clone())));
    let json = train_tokenizer(&texts, 400).unwrap();
    let dir = TempDir::new("demo-tok");
    std::fs::write(dir.path().join("tokenizer.json"), &json).unwrap();
    let tok = crossdiff::ChatTokenizer::from_dir(dir.path()).unwrap();
    // Specials first, in Gemma's order; then the 256 byte tokens.
    for (i, s) in SPECIALS.iter().enumerate() {
        assert_eq!(tok.encode(s, false).unwrap(), vec![i as u32], "{s}");
    }
    assert_eq!((tok.bos_id, tok.eos_id, tok.end_of_turn_id), (Some(2), Some(1), Some(6)));
    // Corpus text: <bos> first, learned pieces, exact round trip, far fewer tokens than characters.
    let text = &corpus.web[0];
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids[0], 2);
    assert_eq!(tok.decode(&ids[1..]).unwrap(), *text);
    assert!(ids.len() * 3 < text.len(), "{} tokens for {} chars", ids.len(), text.len());
    // Unseen characters fall back to bytes and still round-trip.
    let odd = "naïve 🐱";
    let ids = tok.encode(odd, false).unwrap();
    assert!(ids.iter().any(|&i| (7..263).contains(&i)), "byte fallback used");
    assert_eq!(tok.decode(&ids).unwrap(), odd);
}

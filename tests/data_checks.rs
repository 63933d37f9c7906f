//! Nothing silent (issue 11), the cache's inputs: one writer per cache folder; a resume must load
//! the models as the cache was started (`--low-memory`, `--f16`) and finds its data files however
//! they are named; the tokenizers must agree on every id, added tokens included; `--context` stays
//! within the models' positions; data files with a byte order mark, empty texts, ambiguous or empty
//! records, a file listed twice and a template that renders nothing are handled or refused by name.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::{
    TempDir, cache_index as cache, contents, data, fixture, has, one_line_err as err, small_cache_job as cache_job,
};
use crossdiff::activations::cache::CacheIndex;
use crossdiff::activations::onthefly::{OnTheFlyConfig, OnTheFlySource};
use crossdiff::activations::writer::{CacheJob, run_cache};
use crossdiff::data::{Document, Mixer, TokenizeOptions, open_source};
use crossdiff::workflow::Handle;
use crossdiff::{ChatTokenizer, LoadOptions, Message};

/// The job stopped after its first shard (as Ctrl-C stops it): an unfinished cache.
fn interrupted(job: &CacheJob) -> CacheIndex {
    let done = std::cell::Cell::new(0);
    let index = run_cache(job, &Device::flex(), |p| done.set(p.tokens), || done.get() == 0).unwrap();
    assert!(!index.complete, "stopped early");
    index
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

// ── 1. one writer per folder ──

#[test]
fn a_cache_folder_in_use_by_another_run_is_refused_and_the_lock_is_released() {
    let dir = TempDir::new("dc-lock");
    let out = dir.path().join("c");
    std::fs::create_dir_all(&out).unwrap();
    // Another live process holds the folder (as a second `cache` run would).
    let mut other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(out.join(".crossdiff.lock"), other.id().to_string()).unwrap();
    let msg = err(cache(&cache_job(&out)));
    other.kill().unwrap();
    other.wait().unwrap();
    has(&msg, &["--out ", "is in use by another crossdiff job", &format!("process {}", other.id())]);
    assert!(!CacheIndex::path(&out).exists(), "the refused run wrote nothing");

    // Its process gone, the lock is taken over; a finished run leaves no lock behind.
    let index = cache(&cache_job(&out)).unwrap();
    assert!(index.complete && index.total_tokens == 600);
    assert!(!out.join(".crossdiff.lock").exists(), "released when the run ends");

    // A refused run on a new folder leaves no folder (the lock is released before the clean-up).
    let fresh = dir.path().join("fresh");
    let msg = err(crossdiff::workflow::cache::run(
        &CacheJob { layer: 9, ..cache_job(&fresh) },
        &Device::flex(),
        Handle::silent(),
    ));
    has(&msg, &["--layer 9 is out of range"]);
    assert!(!fresh.exists(), "no trace of a refused run");
}

// ── 2. and 3. a resume loads the models as the cache was started ──

#[test]
fn a_low_memory_cache_resumed_without_low_memory_is_refused() {
    let dir = TempDir::new("dc-lowmem");
    let out = dir.path().join("c");
    let low = CacheJob { low_memory: true, ..cache_job(&out) };
    let index = interrupted(&low);
    let partial = index.partial_shards.len();
    assert!(partial > 0);
    let before = contents(&out);
    let msg = err(cache(&cache_job(&out)));
    has(
        &msg,
        &[
            "--low-memory is needed to resume the cache in ",
            &format!("it was started with --low-memory and has {partial} partial shards"),
            "re-run with --low-memory",
        ],
    );
    assert_eq!(contents(&out), before, "a refused resume changes nothing");
    // With --low-memory it finishes: the same bytes as a run that was never interrupted.
    let done = cache(&low).unwrap();
    assert!(done.complete && done.partial_shards.is_empty() && done.total_tokens == 600);
    assert!(!contents(&out).iter().any(|(n, _)| n.ends_with(".base-partial")), "no partial shard left");
    let whole = dir.path().join("whole");
    cache(&cache_job(&whole)).unwrap();
    let shards = |d: &Path| contents(d).into_iter().filter(|(n, _)| n.starts_with("acts-")).collect::<Vec<_>>();
    assert_eq!(shards(&out), shards(&whole));
}

#[test]
fn a_cache_resumed_with_other_load_options_is_refused() {
    let dir = TempDir::new("dc-f16");
    let out = dir.path().join("c");
    interrupted(&cache_job(&out));
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(CacheIndex::path(&out)).unwrap()).unwrap();
    assert_eq!(recorded["settings"]["f16_weights"], false, "the load options are recorded");
    let before = contents(&out);
    let f16 = CacheJob { load: LoadOptions { f16_weights: true, ..Default::default() }, ..cache_job(&out) };
    let msg = err(cache(&f16));
    has(&msg, &["cache.json: the cache there was made with other settings: no --f16, now --f16", "--out"]);
    assert_eq!(contents(&out), before);

    // A cache written before the load options were recorded: taken as loaded in f32.
    edit_json(&CacheIndex::path(&out), |v| {
        v["settings"].as_object_mut().unwrap().remove("f16_weights");
    });
    let msg = err(cache(&f16));
    has(&msg, &["no --f16, now --f16"]);
    let index = cache(&cache_job(&out)).unwrap();
    assert!(index.complete && index.total_tokens == 600);
}

// ── 4. the tokenizers agree on every id ──

#[test]
fn a_chat_tokenizer_without_the_turn_tokens_as_added_tokens_is_refused() {
    let chat = TempDir::copy_of("dc-tok", "chat");
    let tok = chat.path().join("tokenizer.json");
    edit_json(&tok, |v| {
        let added = v["added_tokens"].as_array_mut().unwrap();
        added.retain(|t| !t["content"].as_str().unwrap().contains("_of_turn>"));
    });
    let base_tok = ChatTokenizer::from_dir(&fixture("base")).unwrap();
    let chat_tok = ChatTokenizer::from_dir(chat.path()).unwrap();
    // The vocabulary still maps the strings to the same ids: only the added tokens differ.
    assert_eq!(chat_tok.start_of_turn_id, base_tok.start_of_turn_id);
    let msg = err(base_tok.check_same(&chat_tok));
    has(
        &msg,
        &[
            "tokenizers differ at id 5: \"<start_of_turn>\" (an added special token) in ",
            "base/tokenizer.json, \"<start_of_turn>\" (an ordinary vocabulary entry) in ",
            &tok.display().to_string(),
        ],
    );
    // `cache` refuses the pair before loading a model or writing anything.
    let dir = TempDir::new("dc-tok-out");
    let out = dir.path().join("c");
    let msg = err(crossdiff::workflow::cache::run(
        &CacheJob { chat: chat.path().to_path_buf(), ..cache_job(&out) },
        &Device::flex(),
        Handle::silent(),
    ));
    has(&msg, &["tokenizers differ at id 5"]);
    assert!(!out.exists());
    // Identical tokenizers pass.
    base_tok.check_same(&ChatTokenizer::from_dir(&fixture("chat")).unwrap()).unwrap();
}

// ── 5. --context within the models' positions ──

#[test]
fn a_context_above_the_models_positions_is_refused() {
    let dir = TempDir::new("dc-context");
    let out = dir.path().join("c");
    let job = CacheJob {
        tokenize: TokenizeOptions { context: 300, ..Default::default() },
        shard_tokens: 512,
        ..cache_job(&out)
    };
    let limit = format!(
        "--context 300 is above the model's limit of 256 positions (`max_position_embeddings` in {})",
        fixture("base").join("config.json").display()
    );
    let msg = err(crossdiff::workflow::cache::run(&job, &Device::flex(), Handle::silent()));
    has(&msg, &[&limit]);
    assert!(!out.exists());

    let otf = |context: usize| OnTheFlyConfig {
        base: fixture("base"),
        chat: fixture("chat"),
        chat_adapter: None,
        data: vec![data("web.txt")],
        layer: 1,
        tokenize: TokenizeOptions { context, ..Default::default() },
        mix: false,
        chunk_tokens: 512,
        batch_tokens: 256,
        tokens: 200,
        load: LoadOptions::default(),
    };
    let msg = err(OnTheFlySource::start(otf(300), Device::flex(), 16, 64, 1));
    has(&msg, &[&limit]);
    // At the limit: pairs come.
    let mut src = OnTheFlySource::start(otf(256), Device::flex(), 16, 64, 1).unwrap();
    assert_eq!(src.next_batch().unwrap().expect("a batch").batch, 16);
}

// ── 6. data files ──

#[test]
fn a_byte_order_mark_is_not_text() {
    let dir = TempDir::new("dc-bom");
    let txt = dir.path().join("a.txt");
    std::fs::write(&txt, "\u{feff}First document.\n\nSecond one.\n").unwrap();
    let docs: Vec<_> = open_source(&txt).unwrap().map(Result::unwrap).collect();
    assert_eq!(docs, vec![Document::Text("First document.".into()), Document::Text("Second one.".into())]);
    let jsonl = dir.path().join("a.jsonl");
    std::fs::write(&jsonl, "\u{feff}{\"text\": \"First.\"}\n{\"text\": \"Second.\"}\n").unwrap();
    let docs: Vec<_> = open_source(&jsonl).unwrap().map(Result::unwrap).collect();
    assert_eq!(docs, vec![Document::Text("First.".into()), Document::Text("Second.".into())]);
    // Tokenized, the first document starts like one without the mark.
    let tok = ChatTokenizer::from_dir(&fixture("base")).unwrap();
    let mut mixer = Mixer::new(&[txt], false, &tok, TokenizeOptions::default()).unwrap();
    assert_eq!(mixer.next_doc().unwrap().unwrap().ids, tok.encode("First document.", true).unwrap());

    // UTF-16 and non-UTF-8 text are refused by file (and line).
    let utf16 = dir.path().join("b.txt");
    std::fs::write(&utf16, b"\xff\xfeH\0i\0").unwrap();
    has(&err(open_source(&utf16)), &["b.txt: is UTF-16 text", "save it as UTF-8"]);
    let latin1 = dir.path().join("c.jsonl");
    std::fs::write(&latin1, b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
    let mut src = open_source(&latin1).unwrap();
    src.next().unwrap().unwrap();
    has(&err(src.next().unwrap()), &["c.jsonl:2: not UTF-8 text"]);
}

#[test]
fn empty_texts_are_skipped_not_cached_as_a_lone_bos() {
    let dir = TempDir::new("dc-empty");
    let p = dir.path().join("x.jsonl");
    std::fs::write(&p, "{\"text\": \"\"}\n{\"text\": \"One.\"}\n{\"text\": \"  \\n\\t \"}\n{\"text\": \"Two.\"}\n")
        .unwrap();
    let tok = ChatTokenizer::from_dir(&fixture("base")).unwrap();
    let mut mixer = Mixer::new(&[p], false, &tok, TokenizeOptions::default()).unwrap();
    let mut docs = Vec::new();
    while let Some(d) = mixer.next_doc().unwrap() {
        docs.push(d.ids);
    }
    assert_eq!(docs, vec![tok.encode("One.", true).unwrap(), tok.encode("Two.", true).unwrap()]);
}

#[test]
fn ambiguous_and_empty_records_are_refused_by_file_and_line() {
    let dir = TempDir::new("dc-records");
    let p = dir.path().join("x.jsonl");
    std::fs::write(
        &p,
        "{\"text\": \"ok\"}\n{\"text\": \"a\", \"messages\": [{\"role\": \"user\", \"content\": \"b\"}]}\n\
         {\"messages\": []}\n[1, 2]\n{\"text\": null, \"messages\": [{\"role\": \"user\", \"content\": \"c\"}]}\n",
    )
    .unwrap();
    let mut src = open_source(&p).unwrap();
    assert_eq!(src.next().unwrap().unwrap(), Document::Text("ok".into()));
    has(&err(src.next().unwrap()), &["x.jsonl:2: has both a `text` and a `messages` field: keep one"]);
    has(&err(src.next().unwrap()), &["x.jsonl:3: `messages` is empty"]);
    has(&err(src.next().unwrap()), &["x.jsonl:4: not a JSON object"]);
    assert_eq!(src.next().unwrap().unwrap(), Document::Chat(vec![Message::user("c")]), "null is absent");

    // The same in a cache run: the file and line are named, nothing is left behind.
    let one = dir.path().join("one.jsonl");
    std::fs::write(&one, "{\"text\": \"Hello there.\"}\n{\"messages\": []}\n").unwrap();
    let out = dir.path().join("c");
    let msg = err(crossdiff::workflow::cache::run(
        &CacheJob { data: vec![one], ..cache_job(&out) },
        &Device::flex(),
        Handle::silent(),
    ));
    has(&msg, &["one.jsonl:2: `messages` is empty"]);
    assert!(!out.exists());

    // A parquet `messages` list with no turns.
    use arrow_array::builder::{ListBuilder, StructBuilder};
    use arrow_array::{ArrayRef, RecordBatch};
    use arrow_schema::{DataType, Field, Fields};
    let fields =
        Fields::from(vec![Field::new("content", DataType::Utf8, true), Field::new("role", DataType::Utf8, true)]);
    let mut list = ListBuilder::new(StructBuilder::from_fields(fields, 1));
    list.append(true);
    let path = dir.path().join("chat.parquet");
    let batch = RecordBatch::try_from_iter([("messages", std::sync::Arc::new(list.finish()) as ArrayRef)]).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    has(&err(open_source(&path).unwrap().next().unwrap()), &["chat.parquet: row 0", "`messages` is empty"]);
}

#[test]
fn a_data_file_listed_twice_and_skip_first_at_context_are_refused_up_front() {
    let dir = TempDir::new("dc-twice");
    let out = dir.path().join("c");
    let run = |job: &CacheJob| crossdiff::workflow::cache::run(job, &Device::flex(), Handle::silent());
    let web = data("web.txt");
    let msg = err(run(&CacheJob { data: vec![web.clone(), data("chat.jsonl"), web.clone()], ..cache_job(&out) }));
    assert_eq!(msg, format!("--data lists {} twice", web.display()));
    // The same file by another name.
    let again = data("../data/web.txt");
    let msg = err(run(&CacheJob { data: vec![web.clone(), again.clone()], ..cache_job(&out) }));
    assert_eq!(msg, format!("--data lists {} twice (also as {})", web.display(), again.display()));

    let skip = |skip_first| CacheJob {
        tokenize: TokenizeOptions { context: 64, drop_bos: false, skip_first: Some(skip_first) },
        ..cache_job(&out)
    };
    assert_eq!(err(run(&skip(64))), "--skip-first (64) must be below --context (64)");
    assert_eq!(err(run(&skip(100))), "--skip-first (100) must be below --context (64)");
    assert!(!out.exists(), "nothing written");
    assert!(skip(63).validate().is_ok());
}

#[test]
fn a_chat_template_that_renders_nothing_is_named() {
    let chat = TempDir::copy_of("dc-tmpl", "chat");
    let config = chat.path().join("tokenizer_config.json");
    edit_json(&config, |v| v["chat_template"] = "{% for m in messages %}{% endfor %}".into());
    let dir = TempDir::new("dc-tmpl-out");
    let out = dir.path().join("c");
    let job = CacheJob { chat: chat.path().to_path_buf(), data: vec![data("chat.jsonl")], ..cache_job(&out) };
    let msg = err(crossdiff::workflow::cache::run(&job, &Device::flex(), Handle::silent()));
    has(
        &msg,
        &[
            "chat.jsonl: document 1: ",
            &format!("{}: field `chat_template` renders the conversation (", config.display()),
            " turns: user, ",
            "as empty text",
        ],
    );
    assert!(!out.exists());
}

// ── 7. a resume finds its data however it is named ──

#[test]
fn a_resume_names_the_data_files_by_what_they_are_not_how_they_were_typed() {
    let dir = TempDir::new("dc-canon");
    let out = dir.path().join("c");
    // Started with an absolute path, resumed with a relative one (tests run in the package root).
    let absolute = CacheJob { data: vec![data("web.txt")], ..cache_job(&out) };
    interrupted(&absolute);
    let relative = CacheJob { data: vec![PathBuf::from("assets/data/web.txt")], ..cache_job(&out) };
    assert!(relative.data[0].exists(), "run from the package root");
    let index = cache(&relative).unwrap();
    assert!(index.complete && index.total_tokens == 600);
    assert!(cache(&absolute).unwrap().complete, "finished: re-running it as first typed returns it");
    let whole = dir.path().join("whole");
    cache(&cache_job(&whole)).unwrap();
    let shards = |d: &Path| contents(d).into_iter().filter(|(n, _)| n.starts_with("acts-")).collect::<Vec<_>>();
    assert_eq!(shards(&out), shards(&whole), "the same data, the same cache");
    // What the user typed first is what the cache records.
    assert_eq!(index.settings.unwrap().data, vec![data("web.txt").display().to_string()]);

    // A copy elsewhere is other data.
    let copy = dir.path().join("web.txt");
    std::fs::copy(data("web.txt"), &copy).unwrap();
    let other = dir.path().join("o");
    interrupted(&CacheJob { data: vec![data("web.txt")], ..cache_job(&other) });
    let msg = err(cache(&CacheJob { data: vec![copy.clone()], ..cache_job(&other) }));
    has(&msg, &["other settings: --data ", &format!("now --data {}", copy.display())]);
}

#[test]
fn a_chat_template_that_repeats_without_bound_is_stopped() {
    let chat = TempDir::copy_of("tpl-huge", "chat");
    let cfg = chat.path().join("tokenizer_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["chat_template"] = "{% for i in range(10000) %}{{ messages[0].content * 1000 }}{% endfor %}".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let tok = ChatTokenizer::from_dir(chat.path()).unwrap();
    let started = std::time::Instant::now();
    let e = tok.render_chat(&[Message::user("What is a latent?")], false).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("renders more than 16 MB") && msg.contains("repeats without bound"), "{msg}");
    assert!(started.elapsed().as_secs() < 30, "stopped early, not rendered to the end");
    // An ordinary conversation still renders.
    let tok = ChatTokenizer::from_dir(&fixture("chat")).unwrap();
    assert!(tok.render_chat(&[Message::user("hi")], true).unwrap().contains("<start_of_turn>user"));
}

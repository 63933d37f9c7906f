//! Bad input gives one clear line naming the file and the field, never a panic.

mod common;

use burn::tensor::Device;
use common::{TempDir, fixture_weights, write_single_file};
use crossdiff::{LoadOptions, Model};

fn load_err(dir: &std::path::Path) -> String {
    match Model::load(dir, &Device::flex(), LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(!msg.contains('\n'), "error is not one line: {msg}");
            msg
        }
    }
}

fn edit_json(path: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn missing_directory_and_missing_config() {
    let msg = load_err(std::path::Path::new("/nonexistent/model"));
    assert!(msg.contains("/nonexistent/model") && msg.contains("not a model snapshot"), "{msg}");
    let dir = TempDir::copy_of("noconfig", "base");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("config.json") && msg.contains("cannot read"), "{msg}");
}

#[test]
fn missing_weights_and_missing_tokenizer() {
    let dir = TempDir::copy_of("noweights", "base");
    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("no weights") && msg.contains("model.safetensors"), "{msg}");

    let dir = TempDir::copy_of("noshard", "base");
    std::fs::remove_file(dir.path().join("model-00002-of-00004.safetensors")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model-00002-of-00004.safetensors"), "{msg}");

    let dir = TempDir::copy_of("notok", "base");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("tokenizer.json") && msg.contains("missing"), "{msg}");
}

#[test]
fn unknown_model_type_and_bad_config_fields() {
    let dir = TempDir::copy_of("llama", "base");
    let cfg = dir.path().join("config.json");
    edit_json(&cfg, |v| v["model_type"] = "mistral".into());
    let msg = load_err(dir.path());
    assert!(msg.contains("config.json") && msg.contains("`model_type`") && msg.contains("mistral"), "{msg}");
    // The message lists what is supported.
    for family in ["gemma2", "gemma3_text", "llama", "qwen2", "qwen3"] {
        assert!(msg.contains(&format!("\"{family}\"")), "{msg}");
    }

    edit_json(&cfg, |v| {
        v["model_type"] = "gemma2".into();
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    let msg = load_err(dir.path());
    assert!(msg.contains("config.json") && msg.contains("hidden_size"), "{msg}");

    edit_json(&cfg, |v| {
        v["hidden_size"] = 72.into();
        v["head_dim"] = 24.into();
        v["num_key_value_heads"] = 3.into();
    });
    let msg = load_err(dir.path());
    assert!(msg.contains("config.json") && msg.contains("num_key_value_heads"), "{msg}");

    std::fs::write(&cfg, "{ not json").unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("config.json") && msg.contains("not valid JSON"), "{msg}");
}

#[test]
fn missing_and_misshaped_tensors() {
    let dir = TempDir::copy_of("missing", "base");
    let mut w = fixture_weights("base");
    w.remove("model.layers.2.mlp.up_proj.weight");
    write_single_file(dir.path(), &w);
    let msg = load_err(dir.path());
    assert!(msg.contains("missing tensor `model.layers.2.mlp.up_proj.weight`"), "{msg}");

    let mut w = fixture_weights("base");
    let (_, shape, bytes) = w.get_mut("model.layers.1.self_attn.k_proj.weight").unwrap();
    // Same byte count, transposed shape: only the shape check can catch it.
    shape.reverse();
    let _ = bytes;
    write_single_file(dir.path(), &w);
    let msg = load_err(dir.path());
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("`model.layers.1.self_attn.k_proj.weight`")
            && msg.contains("shape [72, 48]")
            && msg.contains("expected [48, 72]"),
        "{msg}"
    );
}

#[test]
fn corrupt_and_truncated_safetensors() {
    let dir = TempDir::copy_of("corrupt", "base");
    let shard = dir.path().join("model-00003-of-00004.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&shard, &bytes).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model-00003-of-00004.safetensors") && msg.contains("corrupt safetensors header"), "{msg}");

    let dir = TempDir::copy_of("truncated", "base");
    let shard = dir.path().join("model-00001-of-00004.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model-00001-of-00004.safetensors") && msg.contains("corrupt"), "{msg}");
}

#[test]
fn base_chat_mismatch_names_the_field() {
    let device = Device::flex();
    let base = Model::load(common::fixture("base"), &device, LoadOptions::default()).unwrap();

    // Different tokenizer: two vocabulary entries swap ids.
    let dir = TempDir::copy_of("tokmismatch", "chat");
    let tok = dir.path().join("tokenizer.json");
    edit_json(&tok, |v| {
        let vocab = v["model"]["vocab"].as_object_mut().unwrap();
        let a = vocab["▁the"].clone();
        let b = vocab["▁model"].clone();
        vocab["▁the"] = b;
        vocab["▁model"] = a;
    });
    let chat = Model::load(dir.path(), &device, LoadOptions::default()).unwrap();
    let msg = format!("{:#}", crossdiff::model::check_models(&base, &chat).unwrap_err());
    assert!(
        msg.contains("tokenizers differ")
            && msg.contains("tokenizer.json")
            && (msg.contains("▁the") || msg.contains("▁model")),
        "{msg}"
    );

    // Another architecture: a whole other model.
    let dir = TempDir::copy_of("archmismatch", "chat");
    edit_json(&dir.path().join("config.json"), |v| v["rms_norm_eps"] = 1e-5.into());
    let snap = crossdiff::Snapshot::open(dir.path()).unwrap();
    let msg = format!("{:#}", crossdiff::model::snapshot::check_pair(&base.snapshot, &snap).unwrap_err());
    assert!(msg.contains("rms_norm_eps") && msg.contains("0.000001") && msg.contains("0.00001"), "{msg}");
    // A config with fewer blocks than its weights is refused when opened.
    edit_json(&dir.path().join("config.json"), |v| v["num_hidden_layers"] = 2.into());
    let msg = format!("{:#}", crossdiff::Snapshot::open(dir.path()).err().expect("refused"));
    assert!(msg.contains("`num_hidden_layers` is 2, the weights have 4 blocks"), "{msg}");
}

#[test]
fn out_of_vocabulary_ids_are_refused() {
    let model = Model::load(common::fixture("base"), &Device::flex(), LoadOptions::default()).unwrap();
    let err = model.lm.batch_ids(&[vec![2, 100_000]]).unwrap_err();
    assert!(format!("{err}").contains("100000"));
}

#[test]
fn projects_round_trip_and_recent_list_stays_short() {
    use crossdiff::workflow::project::{Project, remember};
    let dir = TempDir::new("project");
    let p = Project::create(dir.path(), "models/base".into(), "/abs/chat".into(), vec!["data/web.txt".into()]).unwrap();
    let back = Project::open(dir.path()).unwrap();
    assert_eq!(back, p);
    assert_eq!(back.resolve(&back.base), dir.path().join("models/base"));
    assert_eq!(back.resolve(&back.chat), std::path::PathBuf::from("/abs/chat"));
    // A run folder with a crosscoder is found without being listed.
    std::fs::create_dir_all(dir.path().join("runs/btk")).unwrap();
    std::fs::write(dir.path().join("runs/btk/crosscoder.safetensors"), b"x").unwrap();
    assert_eq!(back.run_dirs(), vec![dir.path().join("runs/btk")]);
    let err = Project::open(&dir.path().join("nope")).unwrap_err();
    assert!(format!("{err:#}").contains("crossdiff-project.json"));
    let mut recent = Vec::new();
    for i in 0..12 {
        remember(&mut recent, std::path::Path::new(&format!("/p{i}")), 10);
    }
    remember(&mut recent, std::path::Path::new("/p5"), 10);
    assert_eq!(recent.len(), 10);
    assert_eq!(recent[0], std::path::PathBuf::from("/p5"));
    assert_eq!(recent.iter().filter(|p| p.as_os_str() == "/p5").count(), 1);
}

#[test]
fn a_shrunken_tensor_is_named_not_its_neighbour() {
    let dir = TempDir::copy_of("shrunk", "base");
    let path = dir.path().join("model-00002-of-00004.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let first = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .min_by_key(|(_, e)| e["data_offsets"][0].as_u64().unwrap())
        .map(|(k, _)| k.clone())
        .unwrap();
    // Shape and size shrunk together: consistent on its own, a gap before the next tensor.
    let e = &mut header[&first];
    let rows = e["shape"][0].as_u64().unwrap();
    let (start, end) = (e["data_offsets"][0].as_u64().unwrap(), e["data_offsets"][1].as_u64().unwrap());
    e["shape"][0] = (rows - 1).into();
    e["data_offsets"][1] = (start + (end - start) / rows * (rows - 1)).into();
    let mut json = serde_json::to_vec(&header).unwrap();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model-00002-of-00004.safetensors"), "{msg}");
    assert!(msg.contains(&format!("`{first}`'s shape or offsets were changed")), "{msg}");
}

#[test]
fn real_valued_config_fields_must_be_positive_and_finite() {
    let dir = TempDir::copy_of("reals", "base");
    let cfg = dir.path().join("config.json");
    for (field, value) in [
        ("rms_norm_eps", serde_json::json!(0.0)),
        ("rope_theta", serde_json::json!(-10000.0)),
        ("query_pre_attn_scalar", serde_json::json!(0)),
        ("final_logit_softcapping", serde_json::json!(-30.0)),
        ("attn_logit_softcapping", serde_json::json!(0.0)),
        ("sliding_window", serde_json::json!(0)),
    ] {
        let original = std::fs::read(&cfg).unwrap();
        edit_json(&cfg, |v| v[field] = value.clone());
        let msg = load_err(dir.path());
        assert!(msg.contains("config.json") && msg.contains(&format!("`{field}`")), "{field}: {msg}");
        std::fs::write(&cfg, original).unwrap();
    }
    edit_json(&cfg, |v| v["rms_norm_eps"] = "NaN".into());
    let msg = load_err(dir.path());
    assert!(msg.contains("config.json") && msg.contains("rms_norm_eps"), "{msg}");
}

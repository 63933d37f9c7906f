//! Bad input for the families beyond Gemma 2 and for LoRA adapters: one clear line naming the file
//! and the field, never a panic and never a silently different model.

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::{TempDir, family_fixture};
use crossdiff::{LoadOptions, Model};

/// The one-line error of loading `dir` (with `adapter` merged in).
fn load_err(dir: &Path, adapter: Option<&Path>) -> String {
    match Model::load_adapted(dir, adapter, &Device::flex(), LoadOptions::default(), |_, _| {}) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(!msg.contains('\n'), "error is not one line: {msg}");
            msg
        }
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{p:?} missing from: {msg}");
    }
}

/// A copy of `family`'s `name` snapshot with its config.json edited.
fn with_config(family: &str, name: &str, f: impl FnOnce(&mut serde_json::Value)) -> TempDir {
    let dir = TempDir::copy_from(&format!("cfg-{family}"), &family_fixture(family, name));
    edit_json(&dir.path().join("config.json"), f);
    dir
}

#[test]
fn config_fields_of_each_family_are_checked_by_name() {
    let cases: Vec<(TempDir, Vec<&str>)> = vec![
        (
            with_config("llama", "base", |v| v["rope_parameters"]["rope_type"] = "yarn".into()),
            vec!["`rope_parameters.rope_type`", "\"yarn\"", "\"llama3\""],
        ),
        (
            with_config("llama", "chat", |v| {
                v["rope_scaling"].as_object_mut().unwrap().remove("low_freq_factor");
            }),
            vec!["`rope_scaling.low_freq_factor` is missing", "llama3"],
        ),
        (
            with_config("llama", "base", |v| v["rope_parameters"]["factor"] = (-8.0).into()),
            vec!["`rope_parameters.factor` must be a positive finite number"],
        ),
        (with_config("qwen3", "base", |v| v["partial_rotary_factor"] = 0.5.into()), vec!["`partial_rotary_factor`"]),
        (with_config("llama", "base", |v| v["hidden_act"] = "gelu".into()), vec!["`hidden_act`", "\"gelu\"", "silu"]),
        (
            with_config("gemma3", "chat", |v| v["use_bidirectional_attention"] = true.into()),
            vec!["`use_bidirectional_attention`"],
        ),
        (
            with_config("gemma3", "base", |v| v["rope_parameters"]["full_attention"]["factor"] = 0.into()),
            vec!["`rope_parameters.full_attention.factor`"],
        ),
        (with_config("gemma3", "chat", |v| v["sliding_window_pattern"] = 0.into()), vec!["`sliding_window_pattern`"]),
        (
            with_config("qwen2", "base", |v| v["layer_types"] = serde_json::json!(["full_attention"])),
            vec!["`layer_types` has 1 entries"],
        ),
        // An untied model without its unembedding: the tensor and why it is needed.
        (
            with_config("qwen2", "base", |v| v["tie_word_embeddings"] = false.into()),
            vec!["lm_head.weight", "`tie_word_embeddings`"],
        ),
    ];
    for (dir, parts) in &cases {
        let msg = load_err(dir.path(), None);
        has(
            &msg,
            &parts
                .iter()
                .copied()
                .chain(["config.json"].into_iter().filter(|_| !parts[0].contains("lm_head")))
                .collect::<Vec<_>>(),
        );
    }
}

#[test]
fn a_pair_of_two_families_is_refused_naming_model_type() {
    let base = crossdiff::model::snapshot::Snapshot::open(family_fixture("llama", "base")).unwrap();
    let chat = crossdiff::model::snapshot::Snapshot::open(family_fixture("qwen3", "chat")).unwrap();
    let msg = format!("{:#}", crossdiff::model::snapshot::check_pair(&base, &chat).unwrap_err());
    has(&msg, &["`model_type`", "llama", "qwen3"]);
}

/// A copy of the plain LoRA adapter with its adapter_config.json edited.
fn with_adapter_config(f: impl FnOnce(&mut serde_json::Value)) -> TempDir {
    let dir = TempDir::copy_from("adapter", &family_fixture("llama", "lora"));
    edit_json(&dir.path().join("adapter_config.json"), f);
    dir
}

#[test]
fn adapters_that_are_not_a_plain_lora_update_are_refused_by_field() {
    let base = family_fixture("llama", "base");
    let cases: Vec<(TempDir, &str)> = vec![
        (with_adapter_config(|v| v["use_dora"] = true.into()), "`use_dora`"),
        (with_adapter_config(|v| v["bias"] = "all".into()), "`bias`"),
        (with_adapter_config(|v| v["modules_to_save"] = serde_json::json!(["lm_head"])), "`modules_to_save`"),
        (with_adapter_config(|v| v["peft_type"] = "IA3".into()), "`peft_type`"),
        (with_adapter_config(|v| v["r"] = 0.into()), "`r` must be positive"),
        (with_adapter_config(|v| v["fan_in_fan_out"] = true.into()), "`fan_in_fan_out`"),
        (with_adapter_config(|v| v["lora_alpha"] = (-1.0).into()), "`lora_alpha`"),
    ];
    for (dir, field) in &cases {
        let msg = load_err(&base, Some(dir.path()));
        has(&msg, &["adapter_config.json", field]);
    }
    // A snapshot given as the adapter: no adapter_config.json.
    let msg = load_err(&base, Some(&family_fixture("llama", "chat")));
    has(&msg, &["adapter_config.json", "PEFT adapter"]);
}

#[test]
fn adapter_weights_that_do_not_fit_the_model_are_refused() {
    let base = family_fixture("llama", "base");
    // One module with lora_A but no lora_B.
    let dir = TempDir::copy_from("adapter-half", &family_fixture("llama", "lora"));
    let path = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let dropped = kept.iter().position(|(n, _)| n.contains("lora_B")).unwrap();
    let gone = kept.remove(dropped).0;
    safetensors::serialize_to_file(kept, None, &path).unwrap();
    let msg = load_err(&base, Some(dir.path()));
    let module = gone.strip_prefix("base_model.model.").unwrap().split(".lora_B").next().unwrap().to_string();
    has(&msg, &["adapter_model.safetensors", &module, "lora_B"]);

    // The adapter on a model of other widths: names the module and both shapes.
    let msg = load_err(&family_fixture("qwen2", "base"), Some(&family_fixture("llama", "lora")));
    has(&msg, &["adapter_model.safetensors", "another base model"]);
}

/// The error of opening the plain LoRA adapter with `f` applied to a copy of it, merged into the
/// Llama base.
fn adapter_err(edit: impl FnOnce(&Path)) -> String {
    let dir = TempDir::copy_from("adapter-edit", &family_fixture("llama", "lora"));
    edit(dir.path());
    load_err(&family_fixture("llama", "base"), Some(dir.path()))
}

#[test]
fn lora_variants_peft_does_not_merge_as_a_plain_update_are_refused_by_field() {
    let cases: Vec<(&str, serde_json::Value)> = vec![
        ("lora_bias", true.into()),
        ("alora_invocation_tokens", serde_json::json!([5, 6])),
        ("use_qalora", true.into()),
        ("layer_replication", serde_json::json!([[0, 2], [1, 3]])),
        ("target_parameters", serde_json::json!(["mlp.experts.down_proj"])),
        ("use_bdlora", serde_json::json!({"nblocks": 2, "target_modules_bd_a": ["q_proj"]})),
        ("arrow_config", serde_json::json!({"top_k": 2})),
        ("kasa_config", serde_json::json!({"beta": 0.001})),
        ("trainable_token_indices", serde_json::json!([3, 4])),
        ("use_dora", true.into()),
    ];
    for (field, value) in cases {
        let msg = adapter_err(|d| edit_json(&d.join("adapter_config.json"), |v| v[field] = value.clone()));
        has(&msg, &["adapter_config.json", &format!("field `{field}`")]);
    }
    // An alpha_pattern key is a regular expression (as in PEFT): one that does not compile is named.
    let msg = adapter_err(|d| {
        edit_json(&d.join("adapter_config.json"), |v| v["alpha_pattern"] = serde_json::json!({"q_proj(": 16}))
    });
    has(&msg, &["adapter_config.json", "field `alpha_pattern`", "q_proj("]);
}

#[test]
fn adapter_config_type_errors_name_the_field() {
    for (field, value) in [("r", serde_json::json!("8")), ("lora_alpha", serde_json::json!("high"))] {
        let msg = adapter_err(|d| edit_json(&d.join("adapter_config.json"), |v| v[field] = value.clone()));
        has(&msg, &["adapter_config.json", &format!("field `{field}`: invalid type")]);
    }
    let msg = adapter_err(|d| {
        edit_json(&d.join("adapter_config.json"), |v| v["alpha_pattern"] = serde_json::json!({"q_proj": "x"}))
    });
    has(&msg, &["adapter_config.json", "field `alpha_pattern`"]);
}

/// The adapter's tensors plus `extra` (name, shape), zeros.
fn add_tensors(dir: &Path, extra: &[(&str, Vec<usize>)]) {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec())).collect();
    let dtype = st.tensors()[0].1.dtype();
    let width = dtype.bitsize() / 8;
    for (name, shape) in extra {
        owned.push((name.to_string(), shape.clone(), vec![0u8; shape.iter().product::<usize>() * width]));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(dtype, s.clone(), d).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn lora_on_lm_head_or_embed_tokens_is_refused_by_module() {
    // The tiny Llama: hidden 48, vocabulary 452; PEFT names an embedding's factors lora_embedding_A/B.
    let cases: [(&str, [(&str, Vec<usize>); 2]); 2] = [
        (
            "lm_head",
            [
                ("base_model.model.lm_head.lora_A.weight", vec![4, 48]),
                ("base_model.model.lm_head.lora_B.weight", vec![452, 4]),
            ],
        ),
        (
            "embed_tokens",
            [
                ("base_model.model.model.embed_tokens.lora_embedding_A", vec![4, 452]),
                ("base_model.model.model.embed_tokens.lora_embedding_B", vec![48, 4]),
            ],
        ),
    ];
    for (module, tensors) in cases {
        let msg = adapter_err(|d| add_tensors(d, &tensors));
        has(&msg, &["adapter_model.safetensors", &format!("LoRA on `{module}` is not supported")]);
    }
}

#[test]
fn config_details_transformers_refuses_are_refused_by_field() {
    // An explicit 0 is not "absent": it is refused, not replaced by the default.
    let dir = with_config("llama", "base", |v| v["head_dim"] = 0.into());
    has(&load_err(dir.path(), None), &["config.json", "field `head_dim` must be positive"]);
    // A vision-language checkpoint (gemma-3-4b and up) is named as such, with the text-only models.
    let dir = with_config("gemma3", "base", |v| {
        let text = v.clone();
        *v = serde_json::json!({
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": text,
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32},
        });
    });
    has(&load_err(dir.path(), None), &["config.json", "`vision_config`", "multimodal", "text-only", "gemma-3-1b-pt"]);
}

#[test]
fn a_generation_config_eos_that_is_not_a_token_id_is_refused() {
    for bad in [serde_json::json!([1, "<eos>"]), serde_json::json!(-3), serde_json::json!(1.5)] {
        let dir = TempDir::copy_from("gen-config", &family_fixture("qwen2", "chat"));
        let eos = serde_json::json!({ "eos_token_id": bad, "do_sample": true });
        std::fs::write(dir.path().join("generation_config.json"), eos.to_string()).unwrap();
        has(&load_err(dir.path(), None), &["generation_config.json", "field `eos_token_id`"]);
    }
}

#[test]
fn on_the_fly_training_refuses_the_default_skip_first_before_loading_the_models() {
    use crossdiff::activations::onthefly::{OnTheFlyConfig, OnTheFlySource};
    // Config and tokenizer but no weights: loading would fail, so the refusal must come first.
    let dir = TempDir::new("otf-skip");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(family_fixture("llama", "base").join(f), dir.path().join(f)).unwrap();
    }
    let cfg = OnTheFlyConfig {
        base: dir.path().to_path_buf(),
        chat: dir.path().to_path_buf(),
        chat_adapter: None,
        data: vec![common::data("web.txt")],
        layer: 1,
        // Llama's default --skip-first is 25: nothing of a 16-token context would be left.
        tokenize: crossdiff::data::TokenizeOptions { context: 16, ..Default::default() },
        mix: false,
        chunk_tokens: 64,
        batch_tokens: 64,
        tokens: 64,
        load: LoadOptions::default(),
    };
    let msg = match OnTheFlySource::start(cfg, Device::flex(), 8, 16, 1) {
        Ok(_) => panic!("started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(!msg.contains('\n'), "{msg}");
    has(&msg, &["--skip-first defaults to 25", "--context 16"]);
}

#[test]
fn an_adapter_whose_declared_rank_or_alpha_pattern_is_wrong_is_refused() {
    let base = family_fixture("llama", "base");
    // `r` says 8, the tensors have rank 4: PEFT would not load it; the summary would misreport it.
    let dir = with_adapter_config(|v| v["r"] = 8.into());
    let msg = load_err(&base, Some(dir.path()));
    has(&msg, &["adapter_config.json", "field `r`", "rank 4"]);
    // A rank_pattern entry declares a module's rank: it must match too.
    let dir = with_adapter_config(|v| v["rank_pattern"] = serde_json::json!({"q_proj": 2}));
    let msg = load_err(&base, Some(dir.path()));
    has(&msg, &["field `rank_pattern`", "q_proj"]);
    // alpha_pattern values are alphas: positive and finite, like lora_alpha.
    for bad in [serde_json::json!(0), serde_json::json!(-3)] {
        let dir = with_adapter_config(|v| v["alpha_pattern"] = serde_json::json!({"q_proj": bad}));
        let msg = load_err(&base, Some(dir.path()));
        has(&msg, &["field `alpha_pattern`", "positive"]);
    }
}

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

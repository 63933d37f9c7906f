//! Llama 3, Qwen 2, Qwen 3 and Gemma 3 (and LoRA adapters) against Hugging Face transformers and
//! PEFT on the committed tiny fixtures (assets/tiny-<family>, made by
//! scripts/make_family_fixtures.py): token ids, chat templates, every block output, logits and
//! greedy generation; each family's template tokens and reply turns; and the pipeline end to end.

mod common;

use burn::tensor::Device;
use common::{Reference, TempDir, assert_close, data, family_fixture, wgpu_device};
use crossdiff::model::family::Family;
use crossdiff::model::generate::{Sampling, generate};
use crossdiff::workflow::Handle;
use crossdiff::{LoadOptions, Message, Model};

const FAMILIES: [(&str, Family); 4] =
    [("llama", Family::Llama), ("qwen2", Family::Qwen2), ("qwen3", Family::Qwen3), ("gemma3", Family::Gemma3)];
const TOL: f64 = 1e-4;

fn flex() -> Device {
    Device::flex()
}

fn reference(family: &str, model: &str) -> Reference {
    Reference::load_from(&family_fixture(family, "reference"), model)
}

fn load(family: &str, model: &str, device: &Device) -> Model {
    Model::load(family_fixture(family, model), device, LoadOptions::default()).unwrap()
}

#[test]
fn each_fixture_is_read_as_its_family_in_both_config_spellings() {
    for (family, want) in FAMILIES {
        let base = crossdiff::ModelConfig::from_file(&family_fixture(family, "base/config.json")).unwrap();
        let chat = crossdiff::ModelConfig::from_file(&family_fixture(family, "chat/config.json")).unwrap();
        assert_eq!((base.family, chat.family), (want, want), "{family}");
        // The two spellings (transformers 5's and the hub's older one) describe one architecture.
        let layers = |c: &crossdiff::ModelConfig| {
            (0..c.num_hidden_layers).map(|l| (c.rope(l).unwrap(), c.is_sliding(l))).collect::<Vec<_>>()
        };
        assert_eq!(layers(&base), layers(&chat), "{family}: RoPE and sliding layers per spelling");
        assert_eq!((base.tied(), base.attention_biases()), (chat.tied(), chat.attention_biases()), "{family}");
    }
    let gemma3 = crossdiff::ModelConfig::from_file(&family_fixture("gemma3", "base/config.json")).unwrap();
    let kinds: Vec<bool> = (0..gemma3.num_hidden_layers).map(|l| gemma3.is_sliding(l)).collect();
    assert!(kinds.contains(&true) && kinds.contains(&false), "Gemma 3 mixes sliding and global layers: {kinds:?}");
    let (local, global) = (kinds.iter().position(|s| *s).unwrap(), kinds.iter().position(|s| !*s).unwrap());
    assert_ne!(gemma3.rope(local).unwrap(), gemma3.rope(global).unwrap(), "local and global RoPE differ");
    // Qwen 2 names a window but `use_sliding_window: false` switches it off.
    let qwen2 = crossdiff::ModelConfig::from_file(&family_fixture("qwen2", "base/config.json")).unwrap();
    assert!(qwen2.sliding_window.is_some() && qwen2.effective_sliding_window().is_none());
}

#[test]
fn token_ids_and_chat_templates_equal_transformers() {
    for (family, _) in FAMILIES {
        for name in ["base", "chat"] {
            let model = load(family, name, &flex());
            let r = reference(family, name);
            for (i, p) in r.prompts().iter().enumerate() {
                let text = p["text"].as_str().unwrap();
                let special = p["kind"].as_str() == Some("prompt");
                assert_eq!(model.tokenizer.encode(text, special).unwrap(), r.ids(i), "{family} {name} prompt {i}");
            }
            for c in r.meta["chats"].as_array().unwrap() {
                let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
                let rendered = model.tokenizer.render_chat(&messages, true).unwrap();
                assert_eq!(rendered, c["rendered"].as_str().unwrap(), "{family} {name}");
                let ids: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
                assert_eq!(model.tokenizer.encode_chat(&messages, true).unwrap(), ids, "{family} {name}");
            }
        }
    }
}

/// Every block output and the logits of every reference prompt of `model` on `device`.
fn check_blocks_and_logits(family: &str, model_name: &str, adapter: Option<&str>, device: &Device) {
    let adapter_dir = adapter.map(|a| family_fixture(family, a));
    let model = Model::load_adapted(
        family_fixture(family, model_name),
        adapter_dir.as_deref(),
        device,
        LoadOptions::default(),
        |_, _| {},
    )
    .unwrap();
    let r = reference(family, adapter.unwrap_or(model_name));
    check_against(&model, &r, &format!("{family} {model_name}{adapter:?}"));
}

fn check_against(model: &Model, r: &Reference, label: &str) {
    for i in 0..r.prompts().len() {
        let result = crossdiff::model::inspect::inspect(model, r.ids(i)).unwrap();
        assert_eq!(result.blocks.len(), model.lm.config.num_hidden_layers);
        for (l, block) in result.blocks.iter().enumerate() {
            assert_close(&format!("{label} p{i} block {l}"), block, &r.get(&format!("p{i}.block.{l}")).1, TOL);
        }
        assert_close(&format!("{label} p{i} logits"), &result.logits, &r.get(&format!("p{i}.logits")).1, TOL);
    }
}

/// Configs the main fixtures leave out (assets/tiny-variants): Llama with attention and MLP biases,
/// tied, f16 single-file, head_dim from hidden/heads; Qwen 2 with its window switched on from
/// `max_window_layers`; Gemma 3 with the default 5:1 pattern, caps in the config (transformers
/// applies only the final one) and the older spelling only; Qwen 3 with biases and the default
/// head_dim 128.
const VARIANTS: [(&str, Family); 4] = [
    ("llama-bias", Family::Llama),
    ("qwen2-window", Family::Qwen2),
    ("gemma3-capped", Family::Gemma3),
    ("qwen3-bias", Family::Qwen3),
];

#[test]
fn configs_the_main_fixtures_leave_out_match_transformers() {
    let root = family_fixture("variants", "");
    let mut devices = vec![flex()];
    devices.extend(wgpu_device());
    for (name, family) in VARIANTS {
        let r = Reference::load_from(&root.join("reference"), name);
        for device in &devices {
            let model = Model::load(root.join(name), device, LoadOptions::default()).unwrap();
            assert_eq!(model.lm.config.family, family);
            check_against(&model, &r, &format!("{name} on {device:?}"));
        }
        let model = Model::load(root.join(name), &flex(), LoadOptions::default()).unwrap();
        let stop = model.stop_ids();
        for i in 0..r.prompts().len() {
            let want: Vec<u32> = r.get(&format!("p{i}.greedy")).1.iter().map(|&v| v as u32).collect();
            let got = generate(&model.lm, &r.ids(i), want.len(), Sampling::default(), &stop, |_| true).unwrap();
            assert_eq!(got, want, "{name} prompt {i}");
        }
    }
}

#[test]
fn blocks_and_logits_match_transformers_on_flex() {
    for (family, _) in FAMILIES {
        for name in ["base", "chat"] {
            check_blocks_and_logits(family, name, None, &flex());
        }
    }
}

#[test]
fn blocks_and_logits_match_transformers_on_wgpu() {
    if let Some(device) = wgpu_device() {
        for (family, _) in FAMILIES {
            for name in ["base", "chat"] {
                check_blocks_and_logits(family, name, None, &device);
            }
        }
        check_blocks_and_logits("llama", "base", Some("lora"), &device);
    }
}

#[test]
fn lora_adapters_merge_as_peft_does() {
    // Plain LoRA (alpha / r) and rsLoRA (alpha / √r), each on its own set of projections.
    for adapter in ["lora", "lora-rs"] {
        check_blocks_and_logits("llama", "base", Some(adapter), &flex());
    }
    let dir = family_fixture("llama", "base");
    let plain = crossdiff::model::identity_of(&dir, None).unwrap();
    let adapted = crossdiff::model::identity_of(&dir, Some(&family_fixture("llama", "lora"))).unwrap();
    let rs = crossdiff::model::identity_of(&dir, Some(&family_fixture("llama", "lora-rs"))).unwrap();
    assert!(plain != adapted && adapted != rs && plain != rs, "an adapter changes the model's identity");
    // An adapter for another architecture: its modules meet no weight, in one line naming the file.
    let err = Model::load_adapted(
        family_fixture("qwen3", "base"),
        Some(&family_fixture("llama", "lora")),
        &flex(),
        LoadOptions::default(),
        |_, _| {},
    )
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap();
    assert!(err.contains("adapter_model.safetensors") && !err.contains('\n'), "{err}");
}

#[test]
fn greedy_generation_equals_transformers() {
    for (family, _) in FAMILIES {
        for name in ["base", "chat"] {
            let model = load(family, name, &flex());
            let r = reference(family, name);
            let stop = model.stop_ids();
            for i in 0..r.prompts().len() {
                let want: Vec<u32> = r.get(&format!("p{i}.greedy")).1.iter().map(|&v| v as u32).collect();
                let got = generate(&model.lm, &r.ids(i), want.len(), Sampling::default(), &stop, |_| true).unwrap();
                assert_eq!(got, want, "{family} {name} prompt {i}");
            }
        }
    }
}

#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    // One token at a time past Gemma 3's window and through each layer's RoPE table.
    for (family, _) in FAMILIES {
        let model = load(family, "chat", &flex());
        let g = &model.lm;
        let r = reference(family, "chat");
        let ids = r.ids(2);
        common::assert_kv_decoding_equals_forward(g, &ids, family);
    }
}

#[test]
fn parameter_count_matches_the_stored_tensors() {
    for (family, _) in FAMILIES {
        let dir = family_fixture(family, "base");
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
        let mut files: Vec<&str> =
            index["weight_map"].as_object().unwrap().values().filter_map(|v| v.as_str()).collect();
        files.sort();
        files.dedup();
        let mut stored = 0usize;
        for f in files {
            let bytes = std::fs::read(dir.join(f)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            stored += st.tensors().iter().map(|(_, t)| t.shape().iter().product::<usize>()).sum::<usize>();
        }
        let config = crossdiff::ModelConfig::from_file(&dir.join("config.json")).unwrap();
        assert_eq!(config.parameter_count(), stored, "{family}");
    }
}

/// The text of the template tokens of a rendered conversation, as the family's format writes its
/// markers (the authors' `{% generation %}` control tokens).
fn expected_template_text(family: Family, roles: &[&str], generation_prompt: bool) -> String {
    let (open, close): (fn(&str) -> String, &str) = match family {
        Family::Llama => (|r| format!("<|start_header_id|>{r}<|end_header_id|>\n\n"), "<|eot_id|>"),
        Family::Qwen2 | Family::Qwen3 => (|r| format!("<|im_start|>{r}\n"), "<|im_end|>\n"),
        Family::Gemma2 | Family::Gemma3 => (|r| format!("<start_of_turn>{r}\n"), "<end_of_turn>\n"),
    };
    let mut text: String = roles.iter().map(|r| format!("{}{close}", open(r))).collect();
    if generation_prompt {
        text += &open(if family.is_gemma() { "model" } else { "assistant" });
    }
    text
}

#[test]
fn template_tokens_and_reply_turns_follow_each_chat_format() {
    let conversation = vec![
        Message::user("Hi"),
        Message { role: "assistant".into(), content: "Hello there.".into() },
        Message::user("What is a latent?"),
        Message { role: "assistant".into(), content: "A sparse feature.".into() },
    ];
    for (family, f) in FAMILIES {
        let model = load(family, "chat", &flex());
        let tok = &model.tokenizer;
        let ids = tok.encode_chat(&conversation, false).unwrap();
        let flags = crossdiff::data::template_flags(tok, &ids);
        let template: Vec<u32> = ids.iter().zip(&flags).filter(|(_, f)| **f).map(|(id, _)| *id).collect();
        let text = tok.decode(&template).unwrap();
        // Templates that add a system turn of their own (Llama 3's dates, Qwen 2.5's default
        // system prompt) have one more turn; Qwen 3 puts an empty thinking block before the last reply.
        let rendered = tok.render_chat(&conversation, false).unwrap();
        let mut roles = vec!["user", "assistant", "user", "assistant"];
        if rendered.contains("system") {
            roles.insert(0, "system");
        }
        let roles: Vec<&str> =
            roles.iter().map(|r| if f.is_gemma() && *r == "assistant" { "model" } else { r }).collect();
        let mut want = expected_template_text(f, &roles, false);
        if rendered.contains("<think>") {
            let last = want.rfind(&format!("<|im_start|>assistant\n")).unwrap() + "<|im_start|>assistant\n".len();
            want.insert_str(last, "<think>\n\n</think>\n\n");
        }
        assert_eq!(text, want, "{family}: template tokens of {rendered:?}");
        // The reply turns: each assistant turn's generated tokens, closing marker included.
        let turns = crossdiff::analysis::kl::Turns::of(&model, &ids);
        let replies: Vec<String> = turns
            .turns
            .iter()
            .map(|t| tok.decode(&t.iter().map(|p| ids[p + 1]).collect::<Vec<_>>()).unwrap())
            .collect();
        let close = match f {
            Family::Llama => "<|eot_id|>",
            Family::Qwen2 | Family::Qwen3 => "<|im_end|>",
            _ => "<end_of_turn>",
        };
        assert_eq!(replies.len(), 2, "{family}: {replies:?}");
        assert!(replies[0].ends_with(&format!("Hello there.{close}")), "{family}: {replies:?}");
        assert!(replies[1].ends_with(&format!("A sparse feature.{close}")), "{family}: {replies:?}");
    }
}

/// cache → train → analyze → kl → steer on one pair, as the CLI runs them.
fn pipeline(family: &str, base: &str, chat: &str, adapter: Option<&str>, want_skip: usize) {
    let dir = TempDir::new(&format!("pipeline-{family}-{}", adapter.unwrap_or("chat")));
    let (base, chat) = (family_fixture(family, base), family_fixture(family, chat));
    let chat_adapter = adapter.map(|a| family_fixture(family, a));
    let device = flex();
    let cache = dir.path().join("cache");
    let job = crossdiff::workflow::cache::CacheJob {
        base: base.clone(),
        chat: chat.clone(),
        chat_adapter: chat_adapter.clone(),
        data: vec![data("web.txt"), data("chat.jsonl")],
        layer: 1,
        tokens: 600,
        out: cache.clone(),
        tokenize: crossdiff::data::TokenizeOptions { context: 64, ..Default::default() },
        shard_tokens: 256,
        batch_tokens: 256,
        ..Default::default()
    };
    let outcome = crossdiff::workflow::cache::run(&job, &device, Handle::silent()).unwrap();
    let settings = outcome.index.settings.clone().unwrap();
    assert_eq!(settings.skip_first, want_skip, "{family}: the family's --skip-first default is recorded");
    if let Some(a) = adapter {
        // The cache names the chat model with its adapter.
        assert!(outcome.index.models[1].ends_with(&format!("+ {a}")), "{:?}", outcome.index.models);
        // Diffing the base against itself (the adapter forgotten) says what may be missing.
        let forgot =
            crossdiff::workflow::cache::CacheJob { chat_adapter: None, out: dir.path().join("forgot"), ..job.clone() };
        let msg = format!("{:#}", crossdiff::workflow::cache::run(&forgot, &device, Handle::silent()).err().unwrap());
        assert!(msg.contains("--chat-adapter"), "{msg}");
    }
    let run = dir.path().join("run");
    let trained = common::small_train_job(&cache, &run).run(&device, Handle::silent()).unwrap();
    assert_eq!(trained.crosscoder.config.model_ids, outcome.index.model_ids);
    let analyze = crossdiff::workflow::analyze::AnalyzeJob {
        run: run.clone(),
        cache: cache.clone(),
        base: Some(base.clone()),
        chat: Some(chat.clone()),
        chat_adapter: chat_adapter.clone(),
        examples: 2,
        ..Default::default()
    };
    let analysed = analyze.run(&device, Handle::silent()).unwrap();
    assert_eq!(analysed.rows.len(), 64);
    let store = crossdiff::workflow::models::ModelStore::new();
    let kl = crossdiff::workflow::kl::KlJob {
        run: run.clone(),
        base: base.clone(),
        chat: chat.clone(),
        chat_adapter: chat_adapter.clone(),
        data: data("chat.jsonl"),
        conversations: 3,
        ..Default::default()
    };
    let report = kl.run(&device, &store, Handle::silent()).unwrap();
    let none = report.table.iter().find(|s| s.condition == "none").unwrap();
    assert!(none.tokens_all > 0 && none.tokens_first9 > 0, "{family}: reply tokens found");
    assert!(none.mean_all.is_finite() && none.mean_all > 0.0, "{family}: KL without patching {}", none.mean_all);
    let steer = crossdiff::workflow::steer::SteerJob {
        run: run.clone(),
        model: chat.clone(),
        adapter: chat_adapter.clone(),
        latent: 0,
        strength: 4.0,
        prompt: "The cat".into(),
        max_tokens: 4,
        allow_other_models: false,
        ..Default::default()
    };
    let steered = steer.run(&device, &store, Handle::silent()).unwrap();
    assert!(steered.new_tokens[0] > 0, "{family}: steering generated nothing");
}

#[test]
fn the_pipeline_runs_end_to_end_on_each_family() {
    for (family, f) in FAMILIES {
        pipeline(family, "base", "chat", None, f.default_skip_first());
    }
}

#[test]
fn a_lora_adapter_diff_runs_end_to_end() {
    // The chat model is the base with an adapter merged in.
    pipeline("llama", "base", "base", Some("lora"), Family::Llama.default_skip_first());
}

// ── Details as transformers 5 and PEFT 0.21 read them (edited copies of the fixtures) ──

/// The adapter at `dir` rewritten: each factor through `f(name, values)`, plus zero tensors `extra`.
fn rewrite_adapter(dir: &std::path::Path, f: impl Fn(&str, Vec<f32>) -> Vec<f32>, extra: &[(String, Vec<usize>)]) {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let data = f(&name, values).iter().flat_map(|v| v.to_le_bytes()).collect();
        owned.push((name, view.shape().to_vec(), data));
    }
    for (name, shape) in extra {
        owned.push((name.clone(), shape.clone(), vec![0u8; 4 * shape.iter().product::<usize>()]));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, d)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

/// The logits of the first LoRA reference prompt on the Llama base with the adapter at `adapter`.
fn adapted_logits(adapter: &std::path::Path) -> Vec<f32> {
    let model =
        Model::load_adapted(family_fixture("llama", "base"), Some(adapter), &flex(), LoadOptions::default(), |_, _| {})
            .unwrap();
    crossdiff::model::inspect::inspect(&model, reference("llama", "lora").ids(0)).unwrap().logits
}

#[test]
fn lora_alpha_pattern_keys_are_regexes_and_the_first_in_file_order_wins() {
    // lora_alpha 8, r 4. `q_proj` comes first in the file, so layer 0's q_proj takes 2, not 32
    // (which an alphabetical order would give); layer 0's other modules take 32. Written by hand:
    // serde_json sorts an object's keys, and the order is what is tested.
    let patterned = TempDir::copy_from("alpha-pattern", &family_fixture("llama", "lora"));
    let config = patterned.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\"alpha_pattern\": {}"));
    let text = text.replace("\"alpha_pattern\": {}", r#""alpha_pattern": {"q_proj": 2, "layers\\.0\\..*": 32}"#);
    std::fs::write(&config, text).unwrap();
    // The same update with the ratios of the alphas moved into lora_B (powers of two: exact).
    let scaled = TempDir::copy_from("alpha-scaled", &family_fixture("llama", "lora"));
    rewrite_adapter(
        scaled.path(),
        |name, values| {
            let ratio = if !name.contains(".lora_B.") {
                1.0
            } else if name.contains(".q_proj.") {
                2.0 / 8.0
            } else if name.contains(".layers.0.") {
                32.0 / 8.0
            } else {
                1.0
            };
            values.iter().map(|v| v * ratio).collect()
        },
        &[],
    );
    let (got, want) = (adapted_logits(patterned.path()), adapted_logits(scaled.path()));
    let want64: Vec<f64> = want.iter().map(|v| *v as f64).collect();
    assert_close("alpha_pattern logits", &got, &want64, 1e-6);
    let plain = adapted_logits(&family_fixture("llama", "lora"));
    assert!(got.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3), "the pattern changed nothing");
}

#[test]
fn velora_and_monteclora_adapters_merge_as_plain_lora() {
    // PEFT merges both as W + s·B·A: their training-time tensors are skipped.
    let plain = adapted_logits(&family_fixture("llama", "lora"));
    let plain64: Vec<f64> = plain.iter().map(|v| *v as f64).collect();
    let variants = [
        (
            "velora_config",
            serde_json::json!({"num_groups": 4, "scale": 1.0, "init_type": "batch_average"}),
            ".lora_velora_embed",
        ),
        ("monteclora_config", serde_json::json!({"num_samples": 8}), ".lora_monteclora_sampler.std_prior"),
    ];
    for (field, value, suffix) in variants {
        let dir = TempDir::copy_from("variant", &family_fixture("llama", "lora"));
        let path = dir.path().join("adapter_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v[field] = value;
        std::fs::write(&path, v.to_string()).unwrap();
        let extra: Vec<(String, Vec<usize>)> =
            (0..3).map(|l| (format!("base_model.model.model.layers.{l}.self_attn.q_proj{suffix}"), vec![12])).collect();
        rewrite_adapter(dir.path(), |_, v| v, &extra);
        assert_close(field, &adapted_logits(dir.path()), &plain64, 1e-6);
    }
}

#[test]
fn the_chat_template_is_found_where_transformers_finds_it() {
    use crossdiff::ChatTokenizer;
    let hi = [Message::user("hi")];
    let render = |t: &ChatTokenizer| t.render_chat(&hi, false).unwrap();
    let jinja = |dir: &std::path::Path, tag: &str| {
        let text = format!("{tag}:{{% for m in messages %}}{{{{ m.content }}}}{{% endfor %}}");
        std::fs::write(dir.join("chat_template.jinja"), text).unwrap();
    };
    // One folder: chat_template.jinja before tokenizer_config.json's field.
    let chat = TempDir::copy_from("template-chat", &family_fixture("llama", "chat"));
    let from_config = render(&ChatTokenizer::from_dir(chat.path()).unwrap());
    jinja(chat.path(), "J");
    assert_eq!(render(&ChatTokenizer::from_dir(chat.path()).unwrap()), "J:hi");
    // An adapter's template (either file) before any of the base's.
    let base_with_config = family_fixture("llama", "chat");
    let adapter = TempDir::new("template-adapter");
    jinja(adapter.path(), "A");
    let t = ChatTokenizer::with_adapter(&base_with_config, Some(adapter.path())).unwrap();
    assert_eq!(render(&t), "A:hi");
    let adapter_config = TempDir::copy_from("template-lora", &family_fixture("llama", "lora"));
    let t = ChatTokenizer::with_adapter(chat.path(), Some(adapter_config.path())).unwrap();
    assert_ne!(render(&t), "J:hi", "the adapter's tokenizer_config.json template wins over the base's jinja");
    assert!(render(&t).contains("hi"));
    // An adapter with a tokenizer_config.json but no template: the base's template.
    let no_template = TempDir::new("template-none");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(family_fixture("llama", "lora").join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(no_template.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let t = ChatTokenizer::with_adapter(&base_with_config, Some(no_template.path())).unwrap();
    assert_eq!(render(&t), from_config);
}

#[test]
fn generation_config_eos_ids_are_stop_ids() {
    let plain = load("qwen2", "chat", &flex()).stop_ids();
    for (eos, added) in [(serde_json::json!([7, 9]), vec![7, 9]), (serde_json::json!(11), vec![11])] {
        let dir = TempDir::copy_from("gen-eos", &family_fixture("qwen2", "chat"));
        let text = serde_json::json!({ "eos_token_id": eos, "temperature": 0.7 }).to_string();
        std::fs::write(dir.path().join("generation_config.json"), text).unwrap();
        let stop = Model::load(dir.path(), &flex(), LoadOptions::default()).unwrap().stop_ids();
        for id in plain.iter().chain(&added) {
            assert!(stop.contains(id), "{id} missing from {stop:?}");
        }
    }
}

/// The config of a copy of `family`'s `name` snapshot with config.json edited.
fn edited_config(family: &str, name: &str, f: impl FnOnce(&mut serde_json::Value)) -> crossdiff::ModelConfig {
    let dir = TempDir::copy_from("edited-config", &family_fixture(family, name));
    let path = dir.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    crossdiff::ModelConfig::from_file(&path).unwrap()
}

#[test]
fn config_details_follow_transformers_5() {
    // Both spellings: `rope_scaling` wins (`rope_scaling or rope_parameters`).
    let llama = edited_config("llama", "chat", |_| {});
    let both = edited_config("llama", "chat", |v| {
        v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0});
    });
    assert_eq!(both.rope(0).unwrap(), llama.rope(0).unwrap());
    // Gemma 3's per-type entries without `rope_theta` take the top-level fields.
    let gemma3 = edited_config("gemma3", "base", |v| {
        for kind in ["full_attention", "sliding_attention"] {
            v["rope_parameters"][kind].as_object_mut().unwrap().remove("rope_theta");
        }
        v["rope_theta"] = 500_000.0.into();
        v["rope_local_base_freq"] = 20_000.0.into();
    });
    let original = edited_config("gemma3", "base", |_| {});
    for layer in 0..gemma3.num_hidden_layers {
        let (got, was) = (gemma3.rope(layer).unwrap(), original.rope(layer).unwrap());
        let want = if gemma3.is_sliding(layer) { 20_000.0 } else { 500_000.0 };
        assert_eq!((got.theta, got.scaling), (want, was.scaling), "layer {layer}");
    }
    // An absent `num_key_value_heads` is Llama's `num_attention_heads`; null is Qwen's too.
    let llama = edited_config("llama", "base", |v| {
        v.as_object_mut().unwrap().remove("num_key_value_heads");
    });
    assert_eq!(llama.num_key_value_heads, llama.num_attention_heads);
    let qwen2 = edited_config("qwen2", "base", |v| v["num_key_value_heads"] = serde_json::Value::Null);
    assert_eq!(qwen2.num_key_value_heads, qwen2.num_attention_heads);
    // Gemma without `sliding_window` takes transformers' 4096 (Gemma2Config, Gemma3TextConfig);
    // an explicit null keeps every layer global.
    let gemma3 = edited_config("gemma3", "base", |v| {
        v.as_object_mut().unwrap().remove("sliding_window");
    });
    assert_eq!(gemma3.effective_sliding_window(), Some(4096));
    let gemma3 = edited_config("gemma3", "base", |v| v["sliding_window"] = serde_json::Value::Null);
    assert_eq!(gemma3.effective_sliding_window(), None);
}

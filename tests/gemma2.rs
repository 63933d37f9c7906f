//! Gemma 2 against Hugging Face transformers on the committed tiny fixtures
//! (assets/tiny-gemma2, made by scripts/make_fixtures.py).

mod common;

use burn::tensor::{Device, Tensor};
use common::{
    Reference, TempDir, assert_close, convert_bf16, fixture, fixture_weights, wgpu_device, write_single_file,
};
use crossdiff::model::generate::{Sampling, generate};
use crossdiff::{LoadOptions, Message, Model};
use safetensors::Dtype;

const TOL: f64 = 1e-4;

fn read(t: Tensor<3>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap()
}

fn flex() -> Device {
    Device::flex()
}

#[test]
fn token_ids_equal_transformers() {
    for name in ["base", "chat"] {
        let model = Model::load(fixture(name), &flex(), LoadOptions::default()).unwrap();
        let reference = Reference::load(name);
        for (i, p) in reference.prompts().iter().enumerate() {
            let text = p["text"].as_str().unwrap();
            let ids = match p["kind"].as_str().unwrap() {
                "prompt" => model.tokenizer.encode(text, true).unwrap(),
                _ => model.tokenizer.encode(text, false).unwrap(),
            };
            assert_eq!(ids, reference.ids(i), "{name} prompt {i}: {text:?}");
        }
    }
}

#[test]
fn chat_template_equals_apply_chat_template() {
    let model = Model::load(fixture("chat"), &flex(), LoadOptions::default()).unwrap();
    let reference = Reference::load("chat");
    let chats = reference.meta["chats"].as_array().unwrap();
    assert!(!chats.is_empty());
    for c in chats {
        let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let rendered = model.tokenizer.render_chat(&messages, true).unwrap();
        assert_eq!(rendered, c["rendered"].as_str().unwrap());
        let ids: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(model.tokenizer.encode_chat(&messages, true).unwrap(), ids);
    }
    // The template's own checks run: a system turn is refused with the template's message.
    let err =
        model.tokenizer.render_chat(&[Message { role: "system".into(), content: "x".into() }], false).unwrap_err();
    assert!(format!("{err:#}").contains("System role not supported"), "{err:#}");
    // `--chat` on a single prompt is one user turn plus the generation prompt.
    let one = model.prompt_ids("  How do crosscoders work?  ", true).unwrap();
    assert_eq!(one, serde_json::from_value::<Vec<u32>>(chats[0]["ids"].clone()).unwrap());
}

/// Every block output and the logits of every reference prompt, on `device`.
fn check_blocks_and_logits(device: &Device, options: LoadOptions, tol: f64) {
    for name in ["base", "chat"] {
        let model = Model::load(fixture(name), device, options).unwrap();
        let reference = Reference::load(name);
        for i in 0..reference.prompts().len() {
            let result = crossdiff::model::inspect::inspect(&model, reference.ids(i)).unwrap();
            assert_eq!(result.blocks.len(), model.lm.config.num_hidden_layers);
            for (l, block) in result.blocks.iter().enumerate() {
                assert_close(
                    &format!("{name} p{i} block {l}"),
                    block,
                    &reference.get(&format!("p{i}.block.{l}")).1,
                    tol,
                );
            }
            assert_close(
                &format!("{name} p{i} logits"),
                &result.logits,
                &reference.get(&format!("p{i}.logits")).1,
                tol,
            );
        }
    }
}

#[test]
fn blocks_and_logits_match_transformers_on_flex() {
    check_blocks_and_logits(&flex(), LoadOptions::default(), TOL);
}

#[test]
fn blocks_and_logits_match_transformers_on_wgpu() {
    if let Some(device) = wgpu_device() {
        check_blocks_and_logits(&device, LoadOptions::default(), TOL);
    }
}

#[test]
fn f16_weight_storage_stays_close() {
    // f16 storage rounds weights (bf16 → f16 is exact for most values) and multiplies in f16.
    check_blocks_and_logits(&flex(), LoadOptions { f16_weights: true, ..Default::default() }, 2e-2);
}

#[test]
fn f16_weight_storage_stays_close_on_wgpu() {
    // f16 matmuls in WGSL (the adapter's shader-f16 feature); norms, softmax and the residual
    // stream stay f32.
    if let Some(device) = wgpu_device() {
        check_blocks_and_logits(&device, LoadOptions { f16_weights: true, ..Default::default() }, 2e-2);
    }
}

#[test]
fn embedding_in_vocabulary_blocks_gives_the_same_outputs() {
    // 676 rows in blocks of 100: lookups and logits cross block boundaries.
    check_blocks_and_logits(&flex(), LoadOptions { embed_block_rows: Some(100), ..Default::default() }, TOL);
    if let Some(device) = wgpu_device() {
        check_blocks_and_logits(&device, LoadOptions { embed_block_rows: Some(100), ..Default::default() }, TOL);
    }
}

#[test]
fn single_file_f32_and_f16_snapshots_give_the_same_outputs() {
    let reference = Reference::load("base");
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let dir = TempDir::copy_of("dtype", "base");
        let mut weights = fixture_weights("base");
        for (dt, _, bytes) in weights.values_mut() {
            *bytes = convert_bf16(bytes, dtype);
            *dt = dtype;
        }
        write_single_file(dir.path(), &weights);
        let model = Model::load(dir.path(), &flex(), LoadOptions::default()).unwrap();
        let result = crossdiff::model::inspect::inspect(&model, reference.ids(0)).unwrap();
        // bf16 → f32 is exact; bf16 → f16 loses the few values below f16's normal range.
        let tol = if dtype == Dtype::F16 { 1e-3 } else { TOL };
        assert_close(&format!("{dtype:?} logits"), &result.logits, &reference.get("p0.logits").1, tol);
    }
}

#[test]
fn padded_batch_equals_unpadded_runs() {
    let model = Model::load(fixture("base"), &flex(), LoadOptions::default()).unwrap();
    let reference = Reference::load("base");
    let seqs: Vec<Vec<u32>> = (0..reference.prompts().len()).map(|i| reference.ids(i)).collect();
    let t_max = seqs.iter().map(Vec::len).max().unwrap();
    let g = &model.lm;
    let v = g.config.vocab_size;
    let d = g.config.hidden_size;
    let batched_logits = read(g.forward(g.batch_ids(&seqs).unwrap()));
    let batched_mid = read(g.forward_to(g.batch_ids(&seqs).unwrap(), 1));
    for (b, s) in seqs.iter().enumerate() {
        let single_logits = read(g.forward(g.batch_ids(std::slice::from_ref(s)).unwrap()));
        let single_mid = read(g.forward_to(g.batch_ids(std::slice::from_ref(s)).unwrap(), 1));
        let t = s.len();
        let rows = |all: &[f32], width: usize| all[b * t_max * width..(b * t_max + t) * width].to_vec();
        let want: Vec<f64> = single_logits.iter().map(|&x| x as f64).collect();
        assert_close(&format!("row {b} logits"), &rows(&batched_logits, v), &want, 1e-5);
        let want: Vec<f64> = single_mid.iter().map(|&x| x as f64).collect();
        assert_close(&format!("row {b} block 1"), &rows(&batched_mid, d), &want, 1e-5);
    }
}

#[test]
fn forward_from_continues_forward_to() {
    let model = Model::load(fixture("chat"), &flex(), LoadOptions::default()).unwrap();
    let reference = Reference::load("chat");
    let g = &model.lm;
    let seqs = vec![reference.ids(0), reference.ids(4)];
    let full = read(g.forward(g.batch_ids(&seqs).unwrap()));
    let want: Vec<f64> = full.iter().map(|&x| x as f64).collect();
    for layer in 0..g.num_layers() {
        let mid = g.forward_to(g.batch_ids(&seqs).unwrap(), layer);
        let resumed = read(g.forward_from(layer, mid));
        assert_close(&format!("forward_from({layer})"), &resumed, &want, 1e-6);
    }
}

#[test]
fn greedy_generation_equals_transformers() {
    for name in ["base", "chat"] {
        let model = Model::load(fixture(name), &flex(), LoadOptions::default()).unwrap();
        let reference = Reference::load(name);
        let stop = model.stop_ids();
        for i in 0..reference.prompts().len() {
            let want: Vec<u32> = reference.get(&format!("p{i}.greedy")).1.iter().map(|&v| v as u32).collect();
            let got = generate(&model.lm, &reference.ids(i), want.len(), Sampling::default(), &stop, |_| true).unwrap();
            assert_eq!(got, want, "{name} prompt {i}");
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    // Decoding one token at a time past the sliding window must give the full forward's logits.
    let model = Model::load(fixture("base"), &flex(), LoadOptions::default()).unwrap();
    let reference = Reference::load("base");
    let g = &model.lm;
    let ids = reference.ids(2);
    assert!(ids.len() > g.config.sliding_window.unwrap() * 2);
    common::assert_kv_decoding_equals_forward(g, &ids, "gemma2 base");
}

#[test]
fn sampling_is_seeded_and_top_p_one_token_is_greedy() {
    let model = Model::load(fixture("base"), &flex(), LoadOptions::default()).unwrap();
    let ids = model.prompt_ids("The cat", false).unwrap();
    let run = |s: Sampling| generate(&model.lm, &ids, 8, s, &[], |_| true).unwrap();
    let hot = Sampling { temperature: 1.0, top_p: 0.9, seed: 5 };
    assert_eq!(run(hot), run(hot), "same seed, same text");
    // top_p → 0 keeps only the most likely token: sampling equals greedy.
    let nucleus = Sampling { temperature: 0.7, top_p: 1e-9, seed: 9 };
    assert_eq!(run(nucleus), run(Sampling::default()));
}

#[test]
fn inspect_file_has_the_interface_layout() {
    let model = Model::load(fixture("base"), &flex(), LoadOptions::default()).unwrap();
    let reference = Reference::load("base");
    let dir = TempDir::new("inspect");
    let out = dir.path().join("x.safetensors");
    let ids = model.prompt_ids(reference.prompts()[1]["text"].as_str().unwrap(), false).unwrap();
    crossdiff::model::inspect::inspect(&model, ids).unwrap().write(&out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = reference.ids(1).len();
    let ids = st.tensor("input_ids").unwrap();
    assert_eq!((ids.dtype(), ids.shape()), (Dtype::I64, &[t][..]));
    let got: Vec<u32> = ids.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    assert_eq!(got, reference.ids(1));
    for l in 0..4 {
        let b = st.tensor(&format!("block.{l}")).unwrap();
        assert_eq!((b.dtype(), b.shape()), (Dtype::F32, &[t, 72][..]));
    }
    let logits = st.tensor("logits").unwrap();
    assert_eq!(logits.shape(), &[t, model.lm.config.vocab_size]);
    let values: Vec<f32> = logits.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_close("written logits", &values, &reference.get("p1.logits").1, TOL);
}

#[test]
fn generation_stops_on_a_stop_token() {
    let model = Model::load(fixture("base"), &flex(), LoadOptions::default()).unwrap();
    let reference = Reference::load("base");
    let greedy: Vec<u32> = reference.get("p0.greedy").1.iter().map(|&v| v as u32).collect();
    // Declare the third greedy token a stop token: generation ends right after emitting it.
    let stop = [greedy[2]];
    let first = greedy.iter().position(|t| *t == greedy[2]).unwrap();
    let got = generate(&model.lm, &reference.ids(0), 10, Sampling::default(), &stop, |_| true).unwrap();
    assert_eq!(got, greedy[..=first].to_vec());
    // The model's own stop ids are <end_of_turn> and <eos>, read from the files.
    let tok = &model.tokenizer;
    let mut want = vec![tok.end_of_turn_id.unwrap(), tok.eos_id.unwrap()];
    want.sort();
    assert_eq!(model.stop_ids(), want);
}

#[test]
fn parameter_count_matches_the_stored_tensors() {
    let stored: usize =
        common::fixture_weights("base").values().map(|(_, shape, _)| shape.iter().product::<usize>()).sum();
    let config = crossdiff::ModelConfig::from_file(&fixture("base").join("config.json")).unwrap();
    assert_eq!(config.parameter_count(), stored);
}

fn tiny_config() -> crossdiff::ModelConfig {
    let mut c = crossdiff::ModelConfig::from_file(&fixture("base").join("config.json")).unwrap();
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 2;
    c.num_key_value_heads = 1;
    c.head_dim = 16;
    c.layer_types = None;
    c.dtype = None;
    c.torch_dtype = Some("float32".into());
    c
}

#[test]
fn random_gemma2_saves_as_a_snapshot_that_loads_to_the_same_outputs() {
    let dir = TempDir::new("random-gemma");
    let device = flex();
    let g = crossdiff::DecoderLm::random(tiny_config(), &device, 3);
    g.save_snapshot(dir.path()).unwrap();
    let snap = crossdiff::Snapshot::open(dir.path()).unwrap();
    let back = crossdiff::DecoderLm::load(&snap, &device, LoadOptions::default()).unwrap();
    let seqs = vec![vec![2u32, 40, 41, 42, 43, 44, 45, 46, 47, 48]];
    let a = read(g.forward(g.batch_ids(&seqs).unwrap()));
    let want: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    assert_close("reloaded logits", &read(back.forward(back.batch_ids(&seqs).unwrap())), &want, 1e-6);
}

#[test]
fn gemma2_trains_through_burn_autodiff() {
    // Memorise two short sequences: the loss must fall far below its starting value.
    let device = flex();
    let ad = device.clone().autodiff();
    let mut g = crossdiff::DecoderLm::random(tiny_config(), &ad, 5);
    let seqs = vec![vec![2u32, 10, 11, 12, 13, 14, 15, 16, 17], vec![2u32, 20, 21, 22, 23, 24, 25]];
    let mut adam = crossdiff::crosscoder::optim::Adam::new(&g.parameters());
    let mut losses = Vec::new();
    for _ in 0..60 {
        let params: Vec<Tensor<2>> = g.parameters().into_iter().map(|p| p.detach().require_grad()).collect();
        g = g.with_parameters(params.clone());
        let loss = g.lm_loss(&seqs).unwrap();
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = loss.backward();
        let gs: Vec<Tensor<2>> =
            params.iter().map(|p| p.grad(&grads).expect("every parameter gets a gradient").autodiff()).collect();
        let updated = adam.update(params.into_iter().map(|p| p.detach()).collect(), gs, 1e-2);
        g = g.with_parameters(updated);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!((first - (676f32).ln()).abs() < 0.5, "starts near log(vocab): {first}");
    assert!(last < 0.2 * first, "loss {first} → {last}");
}

#[test]
fn demo_pair_builds_trains_and_loads_as_snapshots() {
    let dir = TempDir::new("demo-build");
    let opts = crossdiff::demo::DemoBuild {
        out: dir.path().to_path_buf(),
        web_docs: 200,
        chats: 200,
        base_steps: 60,
        chat_steps: 60,
        batch: 8,
        context: 48,
        hidden: 32,
        layers: 2,
        ..Default::default()
    };
    let losses = crossdiff::demo::rebuild(&opts, &flex()).unwrap();
    assert!(losses.base.1 < 0.6 * losses.base.0, "base training: {:?}", losses.base);
    assert!(losses.chat.1 < losses.chat.0, "chat fine-tune: {:?}", losses.chat);
    let base = Model::load(dir.path().join("base"), &flex(), LoadOptions::default()).unwrap();
    let chat = Model::load(dir.path().join("chat"), &flex(), LoadOptions::default()).unwrap();
    crossdiff::model::check_models(&base, &chat).unwrap();
    // The chat template renders with the model's own files, and the data files are there.
    let ids = chat.prompt_ids("Who are you?", true).unwrap();
    assert_eq!(ids[0], chat.tokenizer.bos_id.unwrap());
    assert!(dir.path().join("data/web.txt").exists() && dir.path().join("data/chat.jsonl").exists());
    // The fine-tune changed the weights: base and chat disagree on the next token somewhere.
    let g = |m: &Model| read(m.lm.forward(m.lm.batch_ids(std::slice::from_ref(&ids)).unwrap()));
    assert_ne!(g(&base), g(&chat));
}

#[test]
fn identities_are_those_earlier_versions_recorded() {
    // Caches and runs record their models' identities; a Gemma 2 snapshot keeps the one crossdiff
    // computed before it read other families (b44ce20), so their caches and runs stay usable.
    for (name, id) in [("base", "00713405d0f795a7"), ("chat", "fbe0f44d2e643bd4")] {
        let snap = crossdiff::model::snapshot::Snapshot::open(fixture(name)).unwrap();
        assert_eq!(snap.identity().unwrap(), id, "{name}");
    }
}

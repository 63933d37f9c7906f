//! The causal KL check and steering on the committed fixtures.

mod common;

use std::path::Path;

use burn::tensor::{Device, Tensor};
use common::fixture;
use crossdiff::analysis::kl::{kl_table, reply_positions};
use crossdiff::analysis::latents::{LatentClass, LatentRow, delta_norm};
use crossdiff::crosscoder::{Crosscoder, CrosscoderConfig, Kind, Params, read_vec, tensor};
use crossdiff::{LoadOptions, Message, Model};

fn chats() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data/chat.jsonl")
}

fn rows_for(cc: &Crosscoder) -> Vec<LatentRow> {
    cc.params
        .decoder_norms()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(j, [b, c])| {
            let delta = delta_norm(*b as f64, *c as f64);
            LatentRow {
                latent: j,
                delta_norm: delta,
                dec_norm_base: *b as f64,
                dec_norm_chat: *c as f64,
                dec_cos: 0.0,
                class: LatentClass::of_delta(delta),
                freq: 0.1,
                max_act: 1.0,
                nu_error: Some(j as f64 / 10.0),
                nu_reconstruction: Some(0.1),
                beta_error_base: None,
                beta_error_chat: None,
                beta_recon_base: None,
                beta_recon_chat: None,
                template_share: None,
            }
        })
        .collect()
}

fn l1(params: Params) -> Crosscoder {
    let (d, dict) = params.dims();
    Crosscoder {
        config: CrosscoderConfig {
            kind: Kind::L1,
            d,
            dict_size: dict,
            k: 0,
            mu: 0.0,
            layer: Some(1),
            models: vec![],
            model_ids: vec![],
        },
        params,
        threshold: None,
        file_checksum: None,
    }
}

#[test]
fn reply_positions_predict_exactly_the_assistant_reply() {
    let model = Model::load(fixture("chat"), &Device::flex(), LoadOptions::default()).unwrap();
    let messages = vec![
        Message { role: "user".into(), content: "Hi there".into() },
        Message { role: "assistant".into(), content: "Hello, how can I help?".into() },
        Message { role: "user".into(), content: "Explain".into() },
        Message { role: "assistant".into(), content: "A sparse dictionary.".into() },
    ];
    let ids = model.tokenizer.encode_chat(&messages, false).unwrap();
    let pos = reply_positions(&model, &ids);
    let predicted: Vec<u32> = pos.iter().map(|(p, _)| ids[p + 1]).collect();
    assert_eq!(model.tokenizer.decode(&predicted).unwrap(), "Hello, how can I help?A sparse dictionary.");
    // The first 9 reply tokens of each turn are flagged.
    let first: Vec<u32> = pos.iter().filter(|(_, f)| *f).map(|(p, _)| ids[p + 1]).collect();
    let n_first_turn = pos.iter().take_while(|(p, _)| model.tokenizer.decode(&[ids[p + 1]]).unwrap() != "A").count();
    assert_eq!(first.len(), n_first_turn.min(9) + (pos.len() - n_first_turn).min(9));
}

#[test]
fn kl_between_identical_models_is_zero() {
    let device = Device::flex();
    let base = Model::load(fixture("base"), &device, LoadOptions::default()).unwrap();
    let same = Model::load(fixture("base"), &device, LoadOptions::default()).unwrap();
    // Decoder = encoder transpose for both models: d^chat = d^base, so no condition changes h_base.
    let cc = l1(Params::init(72, 16, 0.5, 1, &device));
    let stats = kl_table(&base, &same, &cc, &rows_for(&cc), 1, &chats(), 4, |_| true).unwrap();
    assert_eq!(stats.len(), 8);
    for s in &stats {
        assert!(s.tokens_all > 20);
        assert!(s.mean_all.abs() < 1e-6 && s.mean_first9.abs() < 1e-6, "{s:?}");
    }
}

#[test]
fn patching_all_latents_of_an_exact_crosscoder_closes_the_gap() {
    let device = Device::flex();
    let base = Model::load(fixture("base"), &device, LoadOptions::default()).unwrap();
    let chat = Model::load(fixture("chat"), &device, LoadOptions::default()).unwrap();
    // Two latents per dimension i read ±(h_chat − h_base)_i and write ±e_i to the chat decoder:
    // Σ_j f_j (d_j^chat − d_j^base) = h_chat − h_base exactly, so "all" patches h_base into h_chat.
    let d = 72;
    let dict = 2 * d;
    let mut enc = vec![0.0f32; 2 * d * dict];
    let mut dec = vec![0.0f32; dict * 2 * d];
    for i in 0..d {
        for (s, sign) in [(0, 1.0f32), (1, -1.0)] {
            let j = 2 * i + s;
            enc[(d + i) * dict + j] = sign; // chat
            enc[i * dict + j] = -sign; // base
            dec[j * 2 * d + d + i] = sign; // chat decoder
        }
    }
    let cc = l1(Params {
        w_enc: tensor(enc, [2 * d, dict], &device),
        b_enc: Tensor::zeros([1, dict], &device),
        w_dec: tensor(dec, [dict, 2 * d], &device),
        b_dec: Tensor::zeros([1, 2 * d], &device),
    });
    let rows = rows_for(&cc);
    assert!(rows.iter().all(|r| r.class == LatentClass::ChatOnly));
    // Cancelled after the first conversation: an error that says so, no table.
    let err = kl_table(&base, &chat, &cc, &rows, 1, &chats(), 4, |n| n < 1).unwrap_err().to_string();
    assert!(err.contains("cancelled after 1 conversations"), "{err}");
    let stats = kl_table(&base, &chat, &cc, &rows, 1, &chats(), 4, |_| true).unwrap();
    let get = |c: &str| stats.iter().find(|s| s.condition == c).unwrap();
    let gap = get("none").mean_all;
    assert!(gap > 1e-3, "the fixtures differ: gap {gap}");
    assert!(get("all").mean_all < 1e-5 * gap.max(1.0), "all latents: {:?}", get("all"));
    // The chat error alone is h_base again: the whole gap.
    assert!((get("chat_error_only").mean_all - gap).abs() < 1e-4 * gap);
    // Half of the latents close part of the gap.
    let half = get("best_delta_50");
    assert_eq!(half.latents, d);
    assert!(half.mean_all > get("all").mean_all);
}

#[test]
fn steering_with_strength_zero_is_plain_generation_and_the_edit_lands_at_layer_l() {
    let device = Device::flex();
    let model = Model::load(fixture("chat"), &device, LoadOptions::default()).unwrap();
    let cc = l1(Params::init(72, 16, 1.0, 4, &device));
    let ids = model.prompt_ids("Who are you?", true).unwrap();
    let zero = crossdiff::analysis::steer::steering_edit(&cc, 3, 0.0, 5.0, 1).unwrap();
    let (plain, steered) = crossdiff::analysis::steer::steer(&model, &ids, &zero, 12).unwrap();
    assert_eq!(plain, steered);
    let strong = crossdiff::analysis::steer::steering_edit(&cc, 3, 40.0, 5.0, 1).unwrap();
    let (_, pushed) = crossdiff::analysis::steer::steer(&model, &ids, &strong, 12).unwrap();
    assert_ne!(plain, pushed, "a strong push changes the text");
    // The edit equals adding the vector to block 1's output and continuing from there.
    let g = &model.gemma;
    let mut cache = g.new_cache();
    let edited =
        read_vec(g.step_edited(g.batch_ids(std::slice::from_ref(&ids)).unwrap(), &mut cache, Some(&strong))).unwrap();
    let t = ids.len();
    let h = g.forward_to(g.batch_ids(std::slice::from_ref(&ids)).unwrap(), 1) + strong.add.clone().reshape([1, 1, 72]);
    let logits = read_vec(g.forward_from(1, h).narrow(1, t - 1, 1)).unwrap();
    let want: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    common::assert_close("edited logits", &edited, &want, 1e-5);
    // The vector is strength × max f × d^chat with max f = max_act / (‖d^0‖ + ‖d^1‖).
    let row = read_vec(cc.params.w_dec.clone().narrow(0, 3, 1)).unwrap();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let scale = 40.0 * 5.0 / (n(&row[..72]) + n(&row[72..]));
    let got = read_vec(strong.add).unwrap();
    for (g, c) in got.iter().zip(&row[72..]) {
        assert!((g - c * scale).abs() < 1e-5);
    }
}

#[test]
fn prompt_lab_matches_independent_computations() {
    let device = Device::flex();
    let base = Model::load(fixture("base"), &device, LoadOptions::default()).unwrap();
    let chat = Model::load(fixture("chat"), &device, LoadOptions::default()).unwrap();
    let cc = l1(Params::init(72, 16, 0.5, 2, &device));
    let ids = chat.prompt_ids("Who are you?", true).unwrap();
    let lab = crossdiff::analysis::prompt_lab::analyze_prompt(&base, &chat, &cc, 1, &ids, &[3, 5], 4).unwrap();
    let t = ids.len();
    // KL from the inspect logits (a separate path), in f64.
    let lb = crossdiff::model::inspect::inspect(&base, ids.clone()).unwrap().logits;
    let lc = crossdiff::model::inspect::inspect(&chat, ids.clone()).unwrap().logits;
    let v = 676;
    for i in 0..t {
        let ls = |r: &[f32]| {
            let m = r.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let z: f64 = r.iter().map(|&x| (x as f64 - m).exp()).sum();
            r.iter().map(|&x| x as f64 - m - z.ln()).collect::<Vec<f64>>()
        };
        let (b, c) = (ls(&lb[i * v..(i + 1) * v]), ls(&lc[i * v..(i + 1) * v]));
        let want: f64 = c.iter().zip(&b).map(|(c, b)| c.exp() * (c - b)).sum();
        assert!((lab.kl[i] - want).abs() < 1e-4 * want.abs().max(1e-3), "position {i}: {} vs {want}", lab.kl[i]);
        assert_eq!(lab.next[i][1][0].0 as usize, common_argmax(&c));
    }
    // Activations: block 1 outputs of both models through the crosscoder, by hand.
    let hb = crossdiff::model::inspect::inspect(&base, ids.clone()).unwrap().blocks[1].clone();
    let hc = crossdiff::model::inspect::inspect(&chat, ids.clone()).unwrap().blocks[1].clone();
    let enc = read_vec(cc.params.w_enc.clone()).unwrap();
    let norms = cc.params.decoder_norms().unwrap();
    for i in 0..t {
        for (c, &j) in [3usize, 5].iter().enumerate() {
            let pre: f64 = (0..72)
                .map(|k| {
                    hb[i * 72 + k] as f64 * enc[k * 16 + j] as f64
                        + hc[i * 72 + k] as f64 * enc[(72 + k) * 16 + j] as f64
                })
                .sum();
            let want = pre.max(0.0) * (norms[j][0] + norms[j][1]) as f64;
            assert!((lab.chosen[c][i] as f64 - want).abs() < 1e-4 * want.abs().max(1e-2), "token {i} latent {j}");
        }
        assert!(lab.top_latents[i].windows(2).all(|w| w[0].1 >= w[1].1));
    }
}

fn common_argmax(v: &[f64]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a))).unwrap()
}

//! The causal KL check and steering on the committed fixtures.

mod common;

use std::path::Path;

use burn::tensor::{Device, Tensor};
use common::fixture;
use crossdiff::analysis::kl::{KlOptions, Latents, PatchOn, Turns, kl_table, reply_positions};
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
            target: None,
        },
        params,
        threshold: None,
        file_checksum: None,
    }
}

#[test]
fn reply_positions_predict_exactly_the_assistant_reply() {
    let model = Model::load(fixture("chat"), &Device::flex(), LoadOptions::default()).unwrap();
    let tok = &model.tokenizer;
    let (short, long) = ("Yes.", "A sparse dictionary learns a small set of directions that explain most activations.");
    let messages = vec![
        Message { role: "user".into(), content: "Hi there".into() },
        Message { role: "assistant".into(), content: short.into() },
        Message { role: "user".into(), content: "Explain".into() },
        Message { role: "assistant".into(), content: long.into() },
    ];
    let ids = tok.encode_chat(&messages, false).unwrap();
    // Each assistant turn generates its content and its <end_of_turn> (method.md §5).
    let eot = tok.end_of_turn_id.unwrap();
    let generated = |text: &str| {
        let mut v = tok.encode(text, false).unwrap();
        v.push(eot);
        v
    };
    let (g1, g2) = (generated(short), generated(long));
    assert!(g1.len() < 10 && g2.len() > 11, "a short and a long reply: {} and {} tokens", g1.len(), g2.len());
    let pos = reply_positions(&model, &ids);
    let predicted: Vec<u32> = pos.iter().map(|(p, _)| ids[p + 1]).collect();
    assert_eq!(predicted, [g1.clone(), g2.clone()].concat(), "all: every generated token, <end_of_turn> included");
    // "First 9": per turn the first 10 predicting positions minus the one reading the template's
    // `\n` after `model` — reply tokens 2–10 (the short reply's set ends at its <end_of_turn>).
    let first: Vec<u32> = pos.iter().filter(|(_, f)| *f).map(|(p, _)| ids[p + 1]).collect();
    assert_eq!(first, [&g1[1..], &g2[1..10]].concat());
    let newline_after_model = pos[0].0;
    assert!(tok.decode(&ids[..=newline_after_model]).unwrap().ends_with("<start_of_turn>model\n"));
}

#[test]
fn patch_masks_cover_template_tokens_and_the_first_k_predictions() {
    let model = Model::load(fixture("chat"), &Device::flex(), LoadOptions::default()).unwrap();
    let tok = &model.tokenizer;
    let messages = vec![
        Message { role: "user".into(), content: "Hi there".into() },
        Message { role: "assistant".into(), content: "Hello, how can I help?".into() },
    ];
    let ids = tok.encode_chat(&messages, false).unwrap();
    let turns = Turns::of(&model, &ids);
    assert!(turns.patch_mask(PatchOn::All, 5).is_none(), "all: no mask, every position");
    // Template tokens: <start_of_turn>, the role, its newline, <end_of_turn> and the newline after it.
    let template = turns.patch_mask(PatchOn::Template, 5).unwrap();
    let marked: Vec<u32> = (0..ids.len()).filter(|&i| template[i] == 1.0).map(|i| ids[i]).collect();
    assert_eq!(
        tok.decode(&marked).unwrap(),
        "<start_of_turn>user\n<end_of_turn>\n<start_of_turn>model\n<end_of_turn>\n"
    );
    // The first 3 predicting positions minus the template input (the `\n` after `model`): the
    // positions reading reply tokens 1 and 2.
    let first = turns.patch_mask(PatchOn::FirstK, 3).unwrap();
    let at: Vec<usize> = (0..ids.len()).filter(|&i| first[i] == 1.0).collect();
    let start = reply_positions(&model, &ids)[0].0;
    assert_eq!(at, vec![start + 1, start + 2]);
    // With the default k of 10 it is exactly the measured "first 9" set.
    let first = turns.patch_mask(PatchOn::FirstK, 10).unwrap();
    let nine: Vec<usize> = reply_positions(&model, &ids).iter().filter(|(_, f)| *f).map(|(p, _)| *p).collect();
    assert_eq!((0..ids.len()).filter(|&i| first[i] == 1.0).collect::<Vec<_>>(), nine);
    let both = turns.patch_mask(PatchOn::TemplateAndFirstK, 10).unwrap();
    assert!((0..ids.len()).all(|i| both[i] == template[i].max(first[i])));
}

#[test]
fn the_halves_are_the_authors_candidates_ranked_by_delta_and_signed_nu() {
    use crossdiff::analysis::kl::condition_sets;
    let row = |latent: usize, delta: f64, freq: f64, nu: (Option<f64>, Option<f64>)| LatentRow {
        latent,
        delta_norm: delta,
        dec_norm_base: 1.0 - delta,
        dec_norm_chat: 1.0,
        dec_cos: 0.0,
        class: LatentClass::of_delta(delta),
        freq,
        max_act: 1.0,
        nu_error: nu.0,
        nu_reconstruction: nu.1,
        beta_error_base: None,
        beta_error_chat: None,
        beta_recon_base: None,
        beta_recon_chat: None,
        template_share: None,
    };
    let rows = vec![
        row(0, 0.95, 0.1, (Some(0.5), Some(0.4))),
        row(1, 0.99, 0.1, (Some(-0.05), Some(0.3))), // signed: ranks lowest on ν^ε
        row(2, 0.97, 0.1, (Some(2.5), Some(0.1))),   // ν^ε out of [−0.1, 2]
        row(3, 0.98, 0.0, (Some(0.1), Some(0.1))),   // dead
        row(4, 0.50, 0.1, (Some(0.1), Some(0.1))),   // shared
        row(5, 0.92, 0.1, (None, Some(0.1))),        // ν not computed
        row(6, 0.93, 0.1, (Some(0.5), Some(1.0))),   // ties latent 0 on ν^ε (average ranks)
        row(7, 0.94, 0.1, (Some(1.5), Some(-0.1))),
    ];
    let sets = condition_sets(&rows);
    let get = |n: &str| sets.iter().find(|(c, _)| c == n).unwrap().1.clone().unwrap();
    // Candidates 0, 1, 6, 7 (n = 4). By Δ: 1 (0.99), 0 (0.95), 7 (0.94), 6 (0.93).
    assert_eq!(get("best_delta_50"), vec![1, 0]);
    assert_eq!(get("worst_delta_50"), vec![7, 6]);
    // Signed ranks: ν^ε −0.05 → 1, 0.5/0.5 → 2.5 each, 1.5 → 4; ν^r −0.1 → 1, 0.3 → 2, 0.4 → 3,
    // 1.0 → 4. Sums: 1 → 3, 7 → 5, 0 → 5.5, 6 → 6.5.
    assert_eq!(get("best_ls_50"), vec![1, 7]);
    assert_eq!(get("worst_ls_50"), vec![0, 6]);
    // n = 1: best is empty, worst the whole list (the authors' `[-num_latents:]` with 0).
    let one = condition_sets(&rows[..1]);
    let get = |n: &str| one.iter().find(|(c, _)| c == n).unwrap().1.clone().unwrap();
    assert!(get("best_delta_50").is_empty() && get("best_ls_50").is_empty());
    assert_eq!(get("worst_delta_50"), vec![0]);
    assert_eq!(get("worst_ls_50"), vec![0]);
    // n = 3 (candidates 0, 1, 6 of the first seven rows): ⌊3/2⌋ = 1 each, as `[-num_latents:]`.
    let three = condition_sets(&rows[..7]);
    let get = |n: &str| three.iter().find(|(c, _)| c == n).unwrap().1.clone().unwrap();
    assert_eq!(get("best_delta_50"), vec![1]);
    assert_eq!(get("worst_delta_50"), vec![6]);
}

#[test]
fn kl_between_identical_models_is_zero() {
    let device = Device::flex();
    let base = Model::load(fixture("base"), &device, LoadOptions::default()).unwrap();
    let same = Model::load(fixture("base"), &device, LoadOptions::default()).unwrap();
    // Decoder = encoder transpose for both models: d^chat = d^base, so no condition changes h_base.
    let cc = l1(Params::init(72, 16, 0.5, 1, &device));
    let stats =
        kl_table(&base, &same, &cc, Latents::Crosscoder(&rows_for(&cc)), 1, &chats(), 4, &KlOptions::default(), |_| {
            true
        })
        .unwrap()
        .table;
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
    let err = kl_table(&base, &chat, &cc, Latents::Crosscoder(&rows), 1, &chats(), 4, &KlOptions::default(), |n| n < 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cancelled after 1 conversations"), "{err}");
    let stats =
        kl_table(&base, &chat, &cc, Latents::Crosscoder(&rows), 1, &chats(), 4, &KlOptions::default(), |_| true)
            .unwrap()
            .table;
    let get = |c: &str| stats.iter().find(|s| s.condition == c).unwrap();
    let gap = get("none").mean_all;
    assert!(gap > 1e-3, "the fixtures differ: gap {gap}");
    assert!(get("all").mean_all < 1e-5 * gap.max(1.0), "all latents: {:?}", get("all"));
    // The chat error alone is h_base again: the whole gap.
    assert!((get("chat_error_only").mean_all - gap).abs() < 1e-4 * gap);
    // The best half of the authors' candidates (ν within [−0.1, 2]: latents 0..=20 of rows_for's
    // ν^ε = j/10) closes part of the gap.
    let half = get("best_delta_50");
    assert_eq!(half.latents, 21 / 2);
    assert_eq!(get("worst_delta_50").latents, 21 / 2);
    assert!(half.mean_all > get("all").mean_all);

    // Patching only the template tokens, with a sweep over blocks 0 and 1.
    let options = KlOptions { patch_on: PatchOn::Template, first_k: 5, sweep: vec![0, 1] };
    let r = kl_table(&base, &chat, &cc, Latents::Crosscoder(&rows), 1, &chats(), 4, &options, |_| true).unwrap();
    let on = |c: &str| r.table.iter().find(|s| s.condition == c).unwrap();
    assert!(r.table.iter().all(|s| s.patch_on == PatchOn::Template && s.layer.is_none()));
    assert_eq!(on("none").mean_all, gap, "nothing patched: the same gap");
    // The exact crosscoder's "all" writes h_chat on the template tokens: chat's own activations there.
    let carried = on("chat").mean_all;
    assert!((on("all").mean_all - carried).abs() < 1e-4 * gap, "{} vs {carried}", on("all").mean_all);
    assert!(carried > 0.0 && carried < gap, "template tokens carry part of the gap: {carried} of {gap}");
    let sweep = |c: &str, l: usize| r.sweep.iter().find(|s| s.condition == c && s.layer == Some(l)).unwrap();
    assert_eq!(r.sweep.len(), 4, "none and chat at blocks 0 and 1");
    assert_eq!(sweep("none", 1).mean_all, gap);
    assert_eq!(sweep("chat", 1).mean_all, carried);
    assert!(sweep("none", 0).mean_all > 0.0 && sweep("chat", 0).mean_all < sweep("none", 0).mean_all);
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
    let g = &model.lm;
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

#[test]
fn patching_with_an_exact_diff_sae_closes_the_gap() {
    use crossdiff::analysis::sae_latents::SaeLatentRow;
    use crossdiff::crosscoder::SaeTarget;
    let device = Device::flex();
    let base = Model::load(fixture("base"), &device, LoadOptions::default()).unwrap();
    let chat = Model::load(fixture("chat"), &device, LoadOptions::default()).unwrap();
    // Latents 2i and 2i+1 read ±x_i of x = chat − base and write ±e_i: SAE(x) = x exactly (b_dec = 0
    // and no threshold), so its reconstruction patches h_base into h_chat.
    let d = 72;
    let dict = 2 * d;
    let mut enc = vec![0.0f32; d * dict];
    let mut dec = vec![0.0f32; dict * d];
    for i in 0..d {
        for (s, sign) in [(0, 1.0f32), (1, -1.0)] {
            enc[i * dict + 2 * i + s] = sign;
            dec[(2 * i + s) * d + i] = sign;
        }
    }
    let (d_, dict_) = (d, dict);
    let sae = Crosscoder {
        config: CrosscoderConfig {
            kind: Kind::Sae,
            d: d_,
            dict_size: dict_,
            k: 1,
            mu: 0.0,
            layer: Some(1),
            models: vec![],
            model_ids: vec![],
            target: Some(SaeTarget::ChatMinusBase),
        },
        params: Params {
            w_enc: tensor(enc, [d, dict], &device),
            b_enc: Tensor::zeros([1, dict], &device),
            w_dec: tensor(dec, [dict, d], &device),
            b_dec: Tensor::zeros([1, d], &device),
        },
        threshold: None,
        file_checksum: None,
    };
    // |β_base/β_chat| made up per latent: 0.05 for the first 10, 0.2 for the next 10, 5 after.
    let rows: Vec<SaeLatentRow> = (0..dict)
        .map(|j| SaeLatentRow {
            latent: j,
            freq: 0.1,
            max_act: 1.0,
            dec_norm: 1.0,
            beta_base: None,
            beta_chat: None,
            beta_ratio: Some(if j < 10 {
                0.05
            } else if j < 20 {
                -0.2
            } else {
                5.0
            }),
            template_share: None,
        })
        .collect();
    let r = kl_table(&base, &chat, &sae, Latents::Sae(&rows), 1, &chats(), 4, &KlOptions::default(), |_| true).unwrap();
    let get = |c: &str| r.table.iter().find(|s| s.condition == c).unwrap_or_else(|| panic!("{c}: {:?}", r.table));
    let names: Vec<&str> = r.table.iter().map(|s| s.condition.as_str()).collect();
    assert_eq!(
        names,
        ["none", "sae_recon", "sae_error", "sae_bias", "all_latents", "ratio_le_0.1", "ratio_le_0.3", "ratio_le_0.6"]
    );
    let gap = get("none").mean_all;
    assert!(gap > 1e-3, "the fixtures differ: gap {gap}");
    assert!(get("sae_recon").mean_all < 1e-5 * gap.max(1.0), "{:?}", get("sae_recon"));
    assert!(get("all_latents").mean_all < 1e-5 * gap.max(1.0));
    // The error of an exact SAE is 0 and b_dec is 0: both leave h_base, the whole gap.
    assert!((get("sae_error").mean_all - gap).abs() < 1e-4 * gap);
    assert_eq!(get("sae_bias").mean_all, gap);
    assert_eq!((get("ratio_le_0.1").latents, get("ratio_le_0.3").latents, get("ratio_le_0.6").latents), (10, 20, 20));
    assert!(get("ratio_le_0.3").mean_all < gap && get("ratio_le_0.3").mean_all > get("sae_recon").mean_all);
    // A base − chat SAE patches with the opposite sign: the same result from the negated dictionary.
    let flipped = Crosscoder {
        config: CrosscoderConfig { target: Some(SaeTarget::BaseMinusChat), ..sae.config.clone() },
        params: sae.params.clone(),
        threshold: None,
        file_checksum: None,
    };
    let f =
        kl_table(&base, &chat, &flipped, Latents::Sae(&rows), 1, &chats(), 4, &KlOptions::default(), |_| true).unwrap();
    assert!(f.table.iter().find(|s| s.condition == "sae_recon").unwrap().mean_all < 1e-5 * gap.max(1.0));
    // An SAE on one model's activations cannot patch.
    let plain = Crosscoder {
        config: CrosscoderConfig { target: Some(SaeTarget::Chat), ..sae.config.clone() },
        params: sae.params.clone(),
        threshold: None,
        file_checksum: None,
    };
    let err = kl_table(&base, &chat, &plain, Latents::Sae(&rows), 1, &chats(), 4, &KlOptions::default(), |_| true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a diff-SAE"), "{err}");
}

//! `analyze` against an independent f64 recomputation of every latents.csv column.

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::{TempDir, fixture};
use crossdiff::LoadOptions;
use crossdiff::analysis::analyze::{AnalyzeOptions, analyze};
use crossdiff::analysis::latents::{CSV_HEADER, LatentClass, delta_norm};
use crossdiff::run_dir::RunDir;

fn class_of(delta: f64) -> &'static str {
    LatentClass::of_delta(delta).as_str()
}
use crossdiff::activations::cache::ActDtype;
use crossdiff::activations::writer::{CacheJob, run_cache};
use crossdiff::crosscoder::{Crosscoder, CrosscoderConfig, Kind, Params, read_vec, tensor};
use crossdiff::data::TokenizeOptions;
use safetensors::SafeTensors;

#[test]
fn class_boundaries_follow_the_spec() {
    assert_eq!(class_of(0.0999), "base_only");
    assert_eq!(class_of(0.1), "other");
    assert_eq!(class_of(0.3999), "other");
    assert_eq!(class_of(0.4), "shared");
    assert_eq!(class_of(0.5999), "shared");
    assert_eq!(class_of(0.6), "other");
    assert_eq!(class_of(0.8999), "other");
    assert_eq!(class_of(0.9), "chat_only");
    assert_eq!(class_of(1.0), "chat_only");
    assert_eq!(delta_norm(0.0, 2.0), 1.0);
    assert_eq!(delta_norm(2.0, 0.0), 0.0);
    assert_eq!(delta_norm(1.0, 1.0), 0.5);
    assert!((delta_norm(0.2, 1.0) - 0.9).abs() < 1e-12);
}

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f64>) {
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect())
}

#[test]
fn latents_csv_equals_an_independent_recomputation() {
    let cache = TempDir::new("analyze-cache");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data");
    let job = CacheJob {
        base: fixture("base"),
        chat: fixture("chat"),
        chat_adapter: None,
        data: vec![data.join("web.txt"), data.join("chat.jsonl")],
        layer: 1,
        tokens: 600,
        out: cache.path().to_path_buf(),
        dtype: ActDtype::F32,
        tokenize: TokenizeOptions { context: 48, ..Default::default() },
        mix: true,
        shard_tokens: 256,
        batch_tokens: 256,
        low_memory: false,
        load: LoadOptions::default(),
        devices: Vec::new(),
    };
    run_cache(&job, &Device::flex(), |_| {}, || true).unwrap();

    // A crosscoder with latents of every class: base decoders of some latents shrunk, some chat
    // decoders shrunk, and a threshold that leaves some latents dead.
    let (d, dict) = (72, 40);
    let device = Device::flex();
    let p = Params::init(d, dict, 0.3, 7, &device);
    let mut w_dec = read_vec(p.w_dec.clone()).unwrap();
    for j in 0..dict {
        let (sb, sc) = match j % 8 {
            0 => (0.02, 1.0), // chat-only
            1 => (0.15, 1.0), // chat-only (Δ ≈ 0.925)
            2 => (1.0, 0.05), // base-only
            3 => (0.5, 1.0),  // other (Δ = 0.75)
            _ => (1.0, 1.0),  // shared
        };
        for i in 0..d {
            w_dec[j * 2 * d + i] *= sb;
            w_dec[j * 2 * d + d + i] *= sc;
        }
    }
    let mut b_enc = vec![0.0f32; dict];
    b_enc[5] = -1e6; // never fires: dead
    let run = TempDir::new("analyze-run");
    let theta = 0.05f32;
    let cc = Crosscoder {
        config: CrosscoderConfig {
            kind: Kind::BatchTopK,
            d,
            dict_size: dict,
            k: 4,
            mu: 0.0,
            layer: Some(1),
            models: vec![],
            model_ids: vec![],
            target: None,
        },
        params: Params { w_dec: tensor(w_dec, [dict, 2 * d], &device), b_enc: tensor(b_enc, [1, dict], &device), ..p },
        threshold: Some(theta),
        file_checksum: None,
    };
    cc.save(run.path()).unwrap();

    let opts = AnalyzeOptions { tokens: None, batch: 100, error_top_n: Some(12), seed: 3 };
    let (rows, summary) =
        analyze(&RunDir::new(run.path()), &cc, cache.path(), &device, &opts, |_, _| {}, || true).unwrap();
    // Interrupted after the first shard and resumed: the same rows, bit for bit.
    let calls = std::cell::Cell::new(0);
    let err = analyze(
        &RunDir::new(run.path()),
        &cc,
        cache.path(),
        &device,
        &opts,
        |_, _| {},
        || {
            calls.set(calls.get() + 1);
            calls.get() < 2
        },
    )
    .unwrap_err();
    assert!(format!("{err}").contains("re-run"), "{err}");
    assert!(run.path().join("analyze-state.json").exists());
    let (resumed, _) =
        analyze(&RunDir::new(run.path()), &cc, cache.path(), &device, &opts, |_, _| {}, || true).unwrap();
    assert_eq!(resumed, rows);
    // With a θ that leaves about one active latent per token, the CPU takes its host route (loops
    // over the active entries); the dense tensor route (here on wgpu, else the CPU's own dense
    // route through θ = 0.05's dense codes above) gives the same table.
    let sparse_run = TempDir::new("analyze-run-sparse");
    let sparse =
        Crosscoder { config: cc.config.clone(), params: cc.params.clone(), threshold: Some(4.0), file_checksum: None };
    sparse.save(sparse_run.path()).unwrap();
    crossdiff::phases::enable();
    let (host_rows, host_summary) =
        analyze(&RunDir::new(sparse_run.path()), &sparse, cache.path(), &device, &opts, |_, _| {}, || true).unwrap();
    let took_host = crossdiff::phases::take().iter().any(|p| p.name == "statistics over the active entries (host)");
    crossdiff::phases::disable();
    assert!(took_host, "a sparse θ takes the host route (l0 {})", host_summary.l0);
    assert!(host_summary.l0 > 0.1, "some latents fire (l0 {})", host_summary.l0);
    let dense_device = common::wgpu_device();
    if let Some(gpu) = &dense_device {
        let on_gpu = Crosscoder::load(sparse_run.path(), gpu).unwrap();
        let _ = std::fs::remove_file(sparse_run.path().join("analyze-state.json"));
        let (gpu_rows, _) =
            analyze(&RunDir::new(sparse_run.path()), &on_gpu, cache.path(), gpu, &opts, |_, _| {}, || true).unwrap();
        assert_same_table(&gpu_rows, &host_rows, "sparse θ: wgpu vs the CPU's host route");
    }
    // The dense route on the CPU against the device route on wgpu, on θ = 0.05.
    if let Some(gpu) = dense_device {
        let on_gpu = Crosscoder::load(run.path(), &gpu).unwrap();
        let gpu = &gpu;
        let _ = std::fs::remove_file(run.path().join("analyze-state.json"));
        let (gpu_rows, _) =
            analyze(&RunDir::new(run.path()), &on_gpu, cache.path(), gpu, &opts, |_, _| {}, || true).unwrap();
        assert_same_table(&gpu_rows, &rows, "θ 0.05: wgpu vs the CPU's dense route");
    }
    assert!(!run.path().join("analyze-state.json").exists());
    RunDir::new(run.path()).write_latents(&rows, &summary).unwrap();
    let csv = std::fs::read_to_string(run.path().join("latents.csv")).unwrap();
    assert_eq!(csv.lines().next().unwrap(), CSV_HEADER);
    assert_eq!(csv.lines().count(), dict + 1);

    // Independent recomputation: weights from the saved file (authors' layout), tokens from the
    // shards, everything in f64 with explicit per-token vectors.
    let wbytes = std::fs::read(run.path().join("crosscoder.safetensors")).unwrap();
    let w = SafeTensors::deserialize(&wbytes).unwrap();
    let (_, enc) = f32s(&w, "encoder.weight"); // (2, d, D)
    let (_, benc) = f32s(&w, "encoder.bias");
    let (_, dec) = f32s(&w, "decoder.weight"); // (2, D, d)
    let (_, bdec) = f32s(&w, "decoder.bias"); // (2, d)
    let dvec = |m: usize, j: usize| &dec[(m * dict + j) * d..(m * dict + j + 1) * d];
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let norm = |m: usize, j: usize| dot(dvec(m, j), dvec(m, j)).sqrt();
    let index = crossdiff::activations::cache::CacheIndex::open(cache.path()).unwrap();
    let mut tokens: Vec<(Vec<f64>, bool)> = Vec::new();
    for s in &index.shards {
        let bytes = std::fs::read(cache.path().join(&s.file)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, acts) = f32s(&st, "acts");
        let template = st.tensor("template").unwrap().data().to_vec();
        for (r, t) in acts.chunks_exact(2 * d).zip(template) {
            tokens.push((r.to_vec(), t != 0));
        }
    }
    let n = tokens.len() as f64;
    let mut active = vec![0.0; dict];
    let mut tmpl = vec![0.0; dict];
    let mut max_act = vec![0.0f64; dict];
    // β numerators and Σ f² for every latent and target.
    let (mut f2, mut num_r, mut num_e) = (vec![0.0; dict], vec![[0.0; 2]; dict], vec![[0.0; 2]; dict]);
    for (x, is_t) in &tokens {
        let mut f = vec![0.0; dict];
        for j in 0..dict {
            let mut pre = benc[j];
            for m in 0..2 {
                for i in 0..d {
                    pre += x[m * d + i] * enc[(m * d + i) * dict + j];
                }
            }
            let fj = pre.max(0.0);
            let score = fj * (norm(0, j) + norm(1, j));
            f[j] = if score > theta as f64 { fj } else { 0.0 };
            if f[j] > 0.0 {
                active[j] += 1.0;
                tmpl[j] += f64::from(u8::from(*is_t));
                max_act[j] = max_act[j].max(score);
            }
        }
        let recon: Vec<Vec<f64>> = (0..2)
            .map(|m| (0..d).map(|i| bdec[m * d + i] + (0..dict).map(|j| f[j] * dvec(m, j)[i]).sum::<f64>()).collect())
            .collect();
        for j in (0..dict).filter(|&j| f[j] > 0.0) {
            let dj = dvec(1, j);
            f2[j] += f[j] * f[j];
            for m in 0..2 {
                // Least squares of y on f·d_j: Σ <f d_j, y> / Σ ‖f d_j‖² (denominator shared below).
                num_r[j][m] += f[j] * dot(dj, &recon[m]);
                let y: Vec<f64> = (0..d).map(|i| x[m * d + i] - recon[m][i] + f[j] * dvec(m, j)[i]).collect();
                num_e[j][m] += f[j] * dot(dj, &y);
            }
        }
    }
    let close = |what: &str, got: Option<f64>, want: f64| {
        let got = got.unwrap_or_else(|| panic!("{what}: missing"));
        assert!((got - want).abs() <= 1e-4 * want.abs().max(1e-3), "{what}: {got} vs {want}");
    };
    let mut classes = std::collections::BTreeSet::new();
    for r in &rows {
        let j = r.latent;
        let (nb, nc) = (norm(0, j), norm(1, j));
        let delta = delta_norm(nb, nc);
        close(&format!("{j} delta"), Some(r.delta_norm), delta);
        close(&format!("{j} norms"), Some(r.dec_norm_base), nb);
        close(&format!("{j} norms"), Some(r.dec_norm_chat), nc);
        close(&format!("{j} cos"), Some(r.dec_cos), dot(dvec(0, j), dvec(1, j)) / (nb * nc));
        let want_class = if active[j] == 0.0 { "dead" } else { class_of(delta) };
        assert_eq!(r.class.as_str(), want_class, "latent {j}");
        classes.insert(r.class.as_str());
        close(&format!("{j} freq"), Some(r.freq), active[j] / n);
        close(&format!("{j} max_act"), Some(r.max_act), max_act[j]);
        if active[j] == 0.0 {
            assert!(r.beta_recon_base.is_none() && r.template_share.is_none() && r.nu_reconstruction.is_none());
            continue;
        }
        close(&format!("{j} template"), r.template_share, tmpl[j] / active[j]);
        let denom = nc * nc * f2[j];
        close(&format!("{j} beta_recon_base"), r.beta_recon_base, num_r[j][0] / denom);
        close(&format!("{j} beta_recon_chat"), r.beta_recon_chat, num_r[j][1] / denom);
        close(&format!("{j} nu_r"), r.nu_reconstruction, num_r[j][0] / num_r[j][1]);
        if let Some(be) = r.beta_error_base {
            close(&format!("{j} beta_error_base"), Some(be), num_e[j][0] / denom);
            close(&format!("{j} beta_error_chat"), r.beta_error_chat, num_e[j][1] / denom);
            close(&format!("{j} nu_e"), r.nu_error, num_e[j][0] / num_e[j][1]);
        }
    }
    assert_eq!(classes.into_iter().collect::<Vec<_>>(), vec!["base_only", "chat_only", "dead", "other", "shared"]);
    // Error betas: the 12 top-Δ live latents plus an equal number of shared ones.
    let mut live: Vec<_> = rows.iter().filter(|r| r.class != LatentClass::Dead).collect();
    live.sort_by(|a, b| b.delta_norm.total_cmp(&a.delta_norm).then(a.latent.cmp(&b.latent)));
    assert!(live[..12].iter().all(|r| r.beta_error_base.is_some()));
    let with_error = rows.iter().filter(|r| r.beta_error_base.is_some()).count();
    assert_eq!(with_error, 24);
    assert_eq!((summary.error_betas_top_n, summary.error_betas_random_shared), (12, 12));
    let specific = rows
        .iter()
        .filter(|r| {
            r.class == LatentClass::ChatOnly
                && r.nu_error.is_some_and(|v| v < 0.2)
                && r.nu_reconstruction.is_some_and(|v| v < 0.5)
        })
        .count();
    assert_eq!(summary.chat_specific, specific);
    assert_eq!(summary.tokens, 600);
}

/// Two analyses' tables agree to 1e-4 relative in every summed column (frequency, maxima, betas,
/// template share).
fn assert_same_table(
    got: &[crossdiff::analysis::latents::LatentRow],
    want: &[crossdiff::analysis::latents::LatentRow],
    what: &str,
) {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1e-3);
    let opt_close = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => close(a, b),
        (a, b) => a.is_none() == b.is_none(),
    };
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, c) in got.iter().zip(want) {
        assert!(
            close(g.freq, c.freq)
                && close(g.max_act, c.max_act)
                && opt_close(g.beta_recon_base, c.beta_recon_base)
                && opt_close(g.beta_recon_chat, c.beta_recon_chat)
                && opt_close(g.beta_error_base, c.beta_error_base)
                && opt_close(g.beta_error_chat, c.beta_error_chat)
                && opt_close(g.template_share, c.template_share),
            "{what}, latent {}: {g:?} vs {c:?}",
            c.latent
        );
    }
}

#[test]
fn examples_store_returns_the_true_top_contexts() {
    use crossdiff::analysis::examples::{BINS, ExamplesOptions, ExamplesStore, HIST_BINS, build_examples};
    let cache = TempDir::new("examples-cache");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data");
    let job = CacheJob {
        base: fixture("base"),
        chat: fixture("chat"),
        chat_adapter: None,
        data: vec![data.join("web.txt"), data.join("chat.jsonl")],
        layer: 2,
        tokens: 500,
        out: cache.path().to_path_buf(),
        dtype: ActDtype::F32,
        tokenize: TokenizeOptions { context: 40, ..Default::default() },
        mix: true,
        shard_tokens: 128,
        batch_tokens: 256,
        low_memory: false,
        load: LoadOptions::default(),
        devices: Vec::new(),
    };
    run_cache(&job, &Device::flex(), |_| {}, || true).unwrap();
    let device = Device::flex();
    let (d, dict) = (72, 12);
    let cc = Crosscoder {
        config: CrosscoderConfig {
            kind: Kind::L1,
            d,
            dict_size: dict,
            k: 0,
            mu: 0.0,
            layer: Some(2),
            models: vec![],
            model_ids: vec![],
            target: None,
        },
        params: Params::init(d, dict, 0.2, 11, &device),
        threshold: None,
        file_checksum: None,
    };
    let run = TempDir::new("examples-run");
    cc.save(run.path()).unwrap();
    let (rows, summary) =
        analyze(&RunDir::new(run.path()), &cc, cache.path(), &device, &AnalyzeOptions::default(), |_, _| {}, || true)
            .unwrap();
    RunDir::new(run.path()).write_latents(&rows, &summary).unwrap();
    let embed = |m: &str| {
        crossdiff::Snapshot::open(fixture(m)).unwrap().read_f32("model.embed_tokens.weight", &[676, d]).unwrap()
    };
    let opts = ExamplesOptions { top_n: 5, per_bin: 2, context: 3, batch: 64, seed: 1, top_tokens: 4 };
    let max_act: Vec<f64> = rows.iter().map(|r| r.max_act).collect();
    build_examples(
        &RunDir::new(run.path()),
        &cc,
        cache.path(),
        &device,
        &max_act,
        Some([embed("base"), embed("chat")]),
        &opts,
        None,
    )
    .unwrap();

    // Brute force: every token's norm-scaled activation of every latent, token ids and documents.
    let index = crossdiff::activations::cache::CacheIndex::open(cache.path()).unwrap();
    let (mut acts, mut ids, mut docs) = (Vec::new(), Vec::new(), Vec::new());
    for s in &index.shards {
        let bytes = std::fs::read(cache.path().join(&s.file)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, x) = f32s(&st, "acts");
        let xt = tensor(x.iter().map(|&v| v as f32).collect(), [s.tokens as usize, 2 * d], &device);
        acts.extend(read_vec(cc.codes(xt) * cc.params.norm_sum()).unwrap());
        let u = |n: &str| {
            st.tensor(n)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        ids.extend(u("token_ids"));
        docs.extend(u("doc_index"));
    }
    let n = ids.len();
    let store = ExamplesStore::open(run.path()).unwrap();
    let (eb, ec) = (embed("base"), embed("chat"));
    let w_dec = read_vec(cc.params.w_dec.clone()).unwrap();
    for j in 0..dict {
        let got = store.latent(j).unwrap();
        let mut all: Vec<(f32, usize)> = (0..n).map(|t| (acts[t * dict + j], t)).filter(|(a, _)| *a > 0.0).collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let top: Vec<_> = got.examples.iter().filter(|e| e.kind == 0).collect();
        assert_eq!(top.len(), all.len().min(5), "latent {j}");
        for (e, (a, t)) in top.iter().zip(&all) {
            assert_eq!((e.token as usize, e.act), (*t, *a), "latent {j}: top examples in order");
        }
        for e in &got.examples {
            let c = e.token as usize;
            if e.kind > 0 {
                let frac = e.act as f64 / rows[j].max_act;
                let lo = if e.kind == 1 { 0.0 } else { BINS[e.kind as usize - 2] };
                assert!(
                    frac > lo && frac <= BINS[e.kind as usize - 1] + 1e-9,
                    "latent {j}: bin {} holds {frac}",
                    e.kind
                );
            }
            for (o, (&id, &a)) in e.window_ids.iter().zip(&e.window_acts).enumerate() {
                let t = c as i64 + o as i64 - 3;
                if t < 0 || t >= n as i64 || docs[t as usize] != docs[c] {
                    assert_eq!(a, -1.0, "outside the document");
                } else {
                    assert_eq!(
                        (id, a),
                        (ids[t as usize], acts[t as usize * dict + j]),
                        "latent {j}, window offset {o}"
                    );
                }
            }
        }
        assert_eq!(got.histogram.len(), HIST_BINS);
        assert_eq!(got.histogram.iter().sum::<u32>() as usize, all.len(), "histogram counts every activation");
        // Promoted tokens: the largest d_j^m · e_v over the vocabulary.
        for (m, e) in [(0, &eb), (1, &ec)] {
            let dir = &w_dec[j * 2 * d + m * d..j * 2 * d + (m + 1) * d];
            let mut logits: Vec<(f64, u32)> = (0..676)
                .map(|v| (dir.iter().zip(&e[v * d..(v + 1) * d]).map(|(a, b)| *a as f64 * *b as f64).sum(), v as u32))
                .collect();
            logits.sort_by(|a, b| b.0.total_cmp(&a.0));
            let name = if m == 0 { "promoted_base" } else { "promoted_chat" };
            let got_ids: Vec<u32> = got.tokens[name].iter().map(|(i, _)| *i).collect();
            assert_eq!(got_ids, logits[..4].iter().map(|(_, v)| *v).collect::<Vec<_>>(), "latent {j} {name}");
            let low: Vec<u32> = got.tokens[if m == 0 { "suppressed_base" } else { "suppressed_chat" }]
                .iter()
                .map(|(i, _)| *i)
                .collect();
            assert_eq!(low, logits[logits.len() - 4..].iter().rev().map(|(_, v)| *v).collect::<Vec<_>>());
        }
    }
    assert!(store.latent(dict).is_err());
}

#[test]
fn figure_data_counts_by_hand() {
    use crossdiff::analysis::figures::{below_threshold_curve, delta_histogram, histogram, histogram_csv, nu_points};
    let row = |latent: usize, delta: f64, nu: Option<(f64, f64)>| crossdiff::analysis::latents::LatentRow {
        latent,
        delta_norm: delta,
        dec_norm_base: 1.0,
        dec_norm_chat: 1.0,
        dec_cos: 0.0,
        class: LatentClass::of_delta(delta),
        freq: 0.1,
        max_act: 1.0,
        nu_error: nu.map(|n| n.0),
        nu_reconstruction: nu.map(|n| n.1),
        beta_error_base: None,
        beta_error_chat: None,
        beta_recon_base: None,
        beta_recon_chat: None,
        template_share: None,
    };
    let rows = vec![
        row(0, 0.95, Some((0.1, 0.2))),
        row(1, 0.99, Some((0.6, 0.1))),
        row(2, 1.0, None),
        row(3, 0.5, Some((0.9, 0.95))),
        row(4, 0.05, None),
        row(5, 0.7, None),
    ];
    assert_eq!(histogram([0.0, 0.5, 0.99, 1.0, 1.5].into_iter(), 0.0, 1.0, 4), vec![1, 0, 1, 2]);
    let h = delta_histogram(&rows, 0.0, 1.0, 10);
    let get = |c: &str| h.iter().find(|s| s.0.as_str() == c).unwrap().1.clone();
    assert_eq!(get("chat_only")[9], 3);
    assert_eq!(get("shared")[5], 1);
    assert_eq!(get("base_only")[0], 1);
    assert_eq!(get("other")[7], 1);
    assert_eq!(nu_points(&rows, LatentClass::ChatOnly), vec![(0, 0.1, 0.2), (1, 0.6, 0.1)]);
    assert_eq!(below_threshold_curve(&rows, &[0.15, 0.3, 0.7]), vec![(0.15, 0), (0.3, 1), (0.7, 2)]);
    let csv = histogram_csv(&h, 0.0, 1.0);
    assert!(csv.starts_with("bin_lo,bin_hi,base_only,other,shared,chat_only\n0,0.1,1,0,0,0\n"), "{csv}");
}

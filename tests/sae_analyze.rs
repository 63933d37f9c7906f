//! `analyze` on an SAE run: sae-latents.csv against an f64 recomputation on the host from the
//! cache's shards and the SAE's weights file (plain loops, no burn).

mod common;

use burn::tensor::Device;
use common::TempDir;
use crossdiff::activations::cache::ActDtype;
use crossdiff::analysis::sae_latents::SaeLatentRow;
use crossdiff::crosscoder::Kind;
use crossdiff::run_dir::RunDir;
use crossdiff::workflow::Handle;
use crossdiff::workflow::analyze::{Analysed, AnalyzeJob};
use crossdiff::workflow::train::TrainJob;
use safetensors::SafeTensors;

fn f32s(bytes: &[u8]) -> Vec<f64> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
}

#[test]
fn sae_latents_equal_a_host_recomputation() {
    let dir = TempDir::new("sae-analyze");
    let (cache, run) = (dir.path().join("cache"), dir.path().join("run"));
    common::cache_outcome(&crossdiff::workflow::cache::CacheJob {
        dtype: ActDtype::F32,
        ..common::small_cache_job(&cache)
    })
    .unwrap();
    let train = TrainJob {
        kind: Kind::Sae,
        steps: Some(12),
        threshold_start: Some(2),
        ..common::small_train_job(&cache, &run)
    };
    train.run(&Device::flex(), Handle::silent()).unwrap();
    let job = AnalyzeJob { run: run.clone(), cache: cache.clone(), batch: 100, ..Default::default() };
    let Analysed::Sae(done) = job.run_any(&Device::flex(), Handle::silent()).unwrap() else { panic!("an SAE run") };
    let from_file: Vec<SaeLatentRow> = RunDir::new(&run).read_sae_latents().unwrap();
    assert_eq!(from_file, done.rows, "sae-latents.csv holds what the job returned");

    // The SAE, from its file in the authors' layout.
    let bytes = std::fs::read(run.join("sae.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let get = |n: &str| f32s(st.tensor(n).unwrap().data());
    let (enc, b_enc, dec, b_dec, theta) =
        (get("encoder.weight"), get("encoder.bias"), get("decoder.weight"), get("b_dec"), get("threshold")[0]);
    let (dict, d) = (b_enc.len(), b_dec.len());
    assert!(theta > 0.0, "θ was learned");
    // Every cached pair, in order.
    let mut pairs = Vec::new();
    let mut template = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&cache).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "safetensors")) {
        let b = std::fs::read(f).unwrap();
        let st = SafeTensors::deserialize(&b).unwrap();
        pairs.extend(f32s(st.tensor("acts").unwrap().data()));
        template.extend(st.tensor("template").unwrap().data().iter().map(|&v| v != 0));
    }
    let n = pairs.len() / (2 * d);
    assert_eq!(n as u64, done.summary.tokens);
    let (mut active, mut tmpl, mut maxf, mut f2) =
        (vec![0.0; dict], vec![0.0; dict], vec![0.0f64; dict], vec![0.0; dict]);
    let mut proj = [vec![0.0; dict], vec![0.0; dict]];
    let mut codes = vec![0.0f64; n * dict];
    for t in 0..n {
        let row = &pairs[t * 2 * d..(t + 1) * 2 * d];
        let x: Vec<f64> = (0..d).map(|i| row[d + i] - row[i]).collect(); // chat − base
        for j in 0..dict {
            let pre: f64 = b_enc[j] + (0..d).map(|i| (x[i] - b_dec[i]) * enc[j * d + i]).sum::<f64>();
            let f = if pre > theta { pre } else { 0.0 };
            if f > 0.0 {
                active[j] += 1.0;
                if template[t] {
                    tmpl[j] += 1.0;
                }
                maxf[j] = maxf[j].max(f);
                codes[t * dict + j] = f;
                f2[j] += f * f;
                for m in 0..2 {
                    let dot: f64 = (0..d).map(|i| dec[i * dict + j] * row[m * d + i]).sum();
                    proj[m][j] += f * dot;
                }
            }
        }
    }
    let mut checked = 0;
    for (j, r) in done.rows.iter().enumerate() {
        let norm2: f64 = (0..d).map(|i| dec[i * dict + j].powi(2)).sum();
        assert!(
            (r.freq - active[j] / n as f64).abs() < 1e-9,
            "latent {j}: freq {} vs {}",
            r.freq,
            active[j] / n as f64
        );
        assert!((r.dec_norm - norm2.sqrt()).abs() < 1e-5);
        if active[j] == 0.0 {
            assert!(r.beta_ratio.is_none() && r.template_share.is_none(), "latent {j} never fires: {r:?}");
            continue;
        }
        let close = |got: f64, want: f64, what: &str| {
            assert!((got - want).abs() <= 1e-3 * want.abs().max(1e-3), "latent {j}: {what} {got} vs {want}");
        };
        close(r.max_act, maxf[j], "max");
        close(r.template_share.unwrap(), tmpl[j] / active[j], "template share");
        let beta = |m: usize| proj[m][j] / (norm2 * f2[j]);
        close(r.beta_base.unwrap(), beta(0), "β_base");
        close(r.beta_chat.unwrap(), beta(1), "β_chat");
        if let Some(ratio) = r.beta_ratio {
            close(ratio, beta(0) / beta(1), "ν");
            checked += 1;
        }
    }
    assert!(checked >= 5, "ν checked on {checked} latents");
    // The examples store: each active latent's top example is its largest code, at that token.
    let store = crossdiff::analysis::examples::ExamplesStore::open(&run).unwrap();
    for j in (0..dict).filter(|&j| active[j] > 0.0) {
        let ex = store.latent(j).unwrap();
        let top = ex.examples.iter().filter(|e| e.kind == 0).max_by(|a, b| a.act.total_cmp(&b.act)).unwrap();
        assert!(
            (top.act as f64 - maxf[j]).abs() <= 1e-3 * maxf[j],
            "latent {j}: top example {} vs {}",
            top.act,
            maxf[j]
        );
        // At its token the latent's code is that value (several tokens may tie: identical BOS rows).
        let at = codes[top.token as usize * dict + j];
        assert!((at - maxf[j]).abs() <= 1e-3 * maxf[j], "latent {j}: code {at} at the top example's token");
        assert!(ex.tokens.is_empty(), "no models given: no token lists");
    }
    // The summary counts the authors' |ν| thresholds from the rows.
    for (t, count) in &done.summary.ratio_below {
        let want = done.rows.iter().filter(|r| r.beta_ratio.is_some_and(|v| v.abs() <= *t)).count();
        assert_eq!(*count, want, "|ν| ≤ {t}");
    }
    let first = done.summary.most_chat_specific[0];
    let min = done.rows.iter().filter_map(|r| r.beta_ratio).map(f64::abs).fold(f64::INFINITY, f64::min);
    assert_eq!(done.rows[first].beta_ratio.map(f64::abs), Some(min));

    // With the models: every latent's direction through each model's tied unembedding in the
    // examples store, as E·d_j computed here.
    let with_models = AnalyzeJob { base: Some(common::fixture("base")), chat: Some(common::fixture("chat")), ..job };
    with_models.run_any(&Device::flex(), Handle::silent()).unwrap();
    let store = crossdiff::analysis::examples::ExamplesStore::open(&run).unwrap();
    for (m, name) in ["base", "chat"].iter().enumerate() {
        let snap = crossdiff::Snapshot::open(&common::fixture(name)).unwrap();
        let vocab = snap.config.vocab_size;
        let e = snap.read_f32("model.embed_tokens.weight", &[vocab, d]).unwrap();
        for j in [first, 0, dict - 1] {
            let logits: Vec<f64> =
                (0..vocab).map(|v| (0..d).map(|i| e[v * d + i] as f64 * dec[i * dict + j]).sum()).collect();
            let listed = &store.latent(j).unwrap().tokens[&format!("promoted_{name}")];
            for (id, logit) in listed {
                let want = logits[*id as usize];
                assert!((*logit as f64 - want).abs() < 1e-3 * want.abs().max(1.0), "latent {j}, model {m}: token {id}");
            }
            // Nothing outside the list beats its last entry.
            let floor = listed.last().unwrap().1 as f64;
            let beaten = logits.iter().filter(|&&l| l > floor + 1e-4).count();
            assert!(beaten < listed.len(), "latent {j}, model {m}: {beaten} tokens above the list's last");
        }
    }
}

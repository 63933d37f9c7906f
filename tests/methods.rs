//! `crossdiff compare`: a crosscoder run and a diff-SAE run on the same cache and conversations,
//! side by side; every column recomputed here from the files the jobs wrote.

mod common;

use burn::tensor::Device;
use common::TempDir;
use crossdiff::analysis::kl::KlStat;
use crossdiff::crosscoder::Kind;
use crossdiff::run_dir::RunDir;
use crossdiff::workflow::Handle;
use crossdiff::workflow::analyze::AnalyzeJob;
use crossdiff::workflow::compare::CompareJob;
use crossdiff::workflow::kl::KlJob;
use crossdiff::workflow::models::ModelStore;
use crossdiff::workflow::train::TrainJob;

#[test]
fn compare_reads_each_methods_results() {
    let dir = TempDir::new("methods");
    let cache = dir.path().join("cache");
    common::cache_outcome(&common::small_cache_job(&cache)).unwrap();
    let store = ModelStore::new();
    let mut runs = Vec::new();
    for (name, kind) in [("cc", Kind::BatchTopK), ("sae", Kind::Sae)] {
        let run = dir.path().join(name);
        let train = TrainJob { kind, steps: Some(12), ..common::small_train_job(&cache, &run) };
        train.run(&Device::flex(), Handle::silent()).unwrap();
        AnalyzeJob { run: run.clone(), cache: cache.clone(), examples: 2, ..Default::default() }
            .run_any(&Device::flex(), Handle::silent())
            .unwrap();
        KlJob {
            run: run.clone(),
            base: common::fixture("base"),
            chat: common::fixture("chat"),
            data: common::data("chat.jsonl"),
            conversations: 2,
            ..Default::default()
        }
        .run(&Device::flex(), &store, Handle::silent())
        .unwrap();
        runs.push(run);
    }
    let out = dir.path().join("methods.json");
    let rows = CompareJob { runs: runs.clone(), adl: vec![], out: Some(out.clone()) }.run().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].method.as_str(), rows[1].method.as_str()),
        ("crosscoder (batchtopk)", "diff-SAE (chat-minus-base)")
    );
    let kl = |run: &std::path::Path, c: &str| -> KlStat {
        let all: Vec<KlStat> = serde_json::from_str(&std::fs::read_to_string(run.join("kl.json")).unwrap()).unwrap();
        all.into_iter().find(|s| s.condition == c).unwrap()
    };
    for (row, (run, whole)) in rows.iter().zip([(&runs[0], "all"), (&runs[1], "sae_recon")]) {
        let (none, w) = (kl(run, "none"), kl(run, whole));
        assert_eq!(row.kl_condition.as_deref(), Some(whole));
        let want = 1.0 - w.mean_all / none.mean_all;
        assert!(
            (row.gap_closed_all.unwrap() - want).abs() < 1e-9,
            "{}: {:?} vs {want}",
            row.method,
            row.gap_closed_all
        );
        let want9 = 1.0 - w.mean_first9 / none.mean_first9;
        assert!((row.gap_closed_first9.unwrap() - want9).abs() < 1e-9);
    }
    let cc_rows = RunDir::new(&runs[0]).read_latents().unwrap();
    assert_eq!(rows[0].chat_specific, Some(cc_rows.iter().filter(|r| r.is_chat_specific()).count()));
    let sae_rows = RunDir::new(&runs[1]).read_sae_latents().unwrap();
    let below = sae_rows.iter().filter(|r| r.beta_ratio.is_some_and(|v| v.abs() <= 0.3)).count();
    assert_eq!(rows[1].chat_specific, Some(below));
    assert!(rows[1].top.len() <= 5 && rows[1].top.iter().all(|t| t.starts_with('#')));
    // The CLI's table: one line per method with its shares as percentages.
    let text = crossdiff::analysis::methods::table(&rows);
    for r in &rows {
        let line = text.lines().find(|l| l.starts_with(&r.method)).unwrap_or_else(|| panic!("{}: {text}", r.method));
        let pct = format!("{:.0}%", 100.0 * r.gap_closed_all.unwrap());
        assert!(line.contains(&pct) && line.contains(&r.top.join(" ")), "{line} lacks {pct} / {:?}", r.top);
    }
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(written.as_array().unwrap().len(), 2);
    // An unanalysed run is named with what to do.
    let bare = dir.path().join("bare");
    TrainJob { steps: Some(4), ..common::small_train_job(&cache, &bare) }
        .run(&Device::flex(), Handle::silent())
        .unwrap();
    let msg = common::one_line_err(CompareJob { runs: vec![bare], ..Default::default() }.run());
    common::has(&msg, &["--runs", "has no summary.json: run `crossdiff analyze` on it first"]);
    let msg =
        common::one_line_err(CompareJob { out: Some(dir.path().to_path_buf()), runs, ..Default::default() }.run());
    common::has(&msg, &["--out", "is a folder"]);
}

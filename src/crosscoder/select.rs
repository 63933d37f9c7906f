//! The selection rules as plain host code: BatchTopK's batch-global top k·B and AuxK's per-token
//! top k_aux among dead latents. The references every device route (host loops, WGSL) must match.

/// Which entries of a `[B, D]` score matrix BatchTopK keeps: the `keep` largest over the whole
/// batch (ties broken by position, so exactly `keep` entries when that many are positive; zero
/// scores are never kept). Returns the 0/1 mask and the smallest kept score.
pub fn select_batch_topk(scores: &[f32], keep: usize) -> (Vec<f32>, Option<f32>) {
    let mut mask = vec![0.0f32; scores.len()];
    let mut positive: Vec<f32> = scores.iter().copied().filter(|&s| s > 0.0).collect();
    if positive.is_empty() || keep == 0 {
        return (mask, None);
    }
    if positive.len() <= keep {
        for (m, &s) in mask.iter_mut().zip(scores) {
            *m = f32::from(s > 0.0);
        }
        return (mask, positive.iter().copied().reduce(f32::min));
    }
    // The keep-th largest value by an O(n) selection on the values alone, then one pass that
    // keeps everything above it and the first tied entries (by position) up to exactly `keep`.
    let at = positive.len() - keep;
    let (_, &mut threshold, _) = positive.select_nth_unstable_by(at, f32::total_cmp);
    let above = scores.iter().filter(|&&s| s > threshold).count();
    let mut ties = keep - above;
    for (m, &s) in mask.iter_mut().zip(scores) {
        if s > threshold {
            *m = 1.0;
        } else if s == threshold && ties > 0 {
            *m = 1.0;
            ties -= 1;
        }
    }
    (mask, Some(threshold))
}

/// AuxK selection: per token, the top `k_aux` dead latents by score (positive scores only).
pub fn select_aux(scores: &[f32], dict: usize, dead: &[bool], k_aux: usize) -> Vec<f32> {
    let mut mask = vec![0.0f32; scores.len()];
    let dead_ix: Vec<usize> = (0..dict).filter(|&j| dead[j]).collect();
    for (row, out) in scores.chunks_exact(dict).zip(mask.chunks_exact_mut(dict)) {
        let mut cand: Vec<usize> = dead_ix.iter().copied().filter(|&j| row[j] > 0.0).collect();
        if k_aux == 0 {
            // A width-1 input: k_aux = min(d/2, #dead) = 0 picks nothing.
            cand.clear();
        } else if cand.len() > k_aux {
            cand.select_nth_unstable_by(k_aux - 1, |a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
            cand.truncate(k_aux);
        }
        for j in cand {
            out[j] = 1.0;
        }
    }
    mask
}

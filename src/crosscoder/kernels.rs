//! Hand-written WGSL kernels (in `shaders/`) inside burn tensors, through burn's backend-extension
//! route (shared/spec/burn-notes.md). Each has a plain reference it is tested against.
//!
//! `score_histogram` is the building block of BatchTopK's batch-global top-k·B selection on the
//! device: three histogram passes over the scores' bit patterns find the k-th largest score without
//! sorting (or reading back) the B×D scores; [`crate::crosscoder::select_batch_topk`] is the reference.
//! `batch_topk_picks` runs the whole selection on the device — the passes, a one-thread scan
//! between them choosing the next prefix, then per-row counts, offsets and an order-keeping
//! compaction — so a training step reads nothing back.

use burn::backend::Dispatch;
use burn::backend::{
    Backend, backend_extension,
    tensor::{FloatTensor, IntTensor},
};
use burn::tensor::Tensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::template::{KernelSource, SourceKernel, SourceTemplate};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::KernelId;
use cubecl::server::KernelArguments;
use cubecl::{CubeCount, CubeDim};

const WORKGROUP: u32 = 256;
/// Bits per pass, from the top: 11 + 11 + 10 = all 32.
const PASSES: [(u32, u32); 3] = [(21, 11), (10, 11), (0, 10)];

/// The number of histogram bins a pass with `bits` bits fills (the output's length).
pub fn hist_len(bits: u32) -> usize {
    1usize << bits
}

#[backend_extension(Cube, Fusion)]
pub trait KernelOps: Backend {
    /// `out[r] = Σ_{p ∈ [offsets[r], offsets[r+1])} coef[p] · table[index[p]]`, `[rows, width]`
    /// (`offsets` has rows + 1 entries; `table` is `[M, width]`).
    #[fusion(dtype = table, shape = burn::tensor::Shape::new([offsets[0] - 1, table[1]]))]
    fn segment_rows(
        offsets: IntTensor<Self>,
        index: IntTensor<Self>,
        coef: FloatTensor<Self>,
        table: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// `out[p] = a[ia[p]] · b[ib[p]]` (row dot products), `[n]`.
    #[fusion(dtype = a, shape = burn::tensor::Shape::new([ia[0]]))]
    fn pick_dot(
        ia: IntTensor<Self>,
        ib: IntTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Counts of positive scores per `bits`-bit field at `shift`, among scores whose bits under
    /// `mask` equal `prefix`. The output holds u32 counts in an f32-typed buffer of
    /// `2^bits` elements: read it as raw bytes.
    #[fusion(dtype = scores, shape = burn::tensor::Shape::new([hist_len(*bits)]))]
    fn score_histogram(scores: FloatTensor<Self>, prefix: u32, mask: u32, shift: u32, bits: u32) -> FloatTensor<Self>;

    /// BatchTopK's selection of the `keep` largest positive scores of a row-major `[b, d]` batch
    /// (ties at the threshold kept in position order; every positive one when fewer are positive),
    /// compacted: i32 `[b + 1 + 2·keep + d]` = row offsets, tokens, latents (position order; empty
    /// slots token b − 1, latent d: out of range), per-latent counts. No readback.
    #[fusion(dtype = burn::tensor::DType::I32, shape = burn::tensor::Shape::new([picks_len(*keep, *b, *d)]))]
    fn batch_topk_picks(scores: FloatTensor<Self>, keep: u32, b: u32, d: u32) -> IntTensor<Self>;

    /// A pick set's latent segments by counting sort on the device (burn's argsort sorts on the
    /// host): i32 `[d + 1 + n]` = segment offsets, then the pick indices ordered by latent (by pick
    /// index within a latent). Picks whose latent is outside `0..d` are left out.
    #[fusion(dtype = burn::tensor::DType::I32, shape = burn::tensor::Shape::new([*d as usize + 1 + latents[0]]))]
    fn latent_segments(latents: IntTensor<Self>, d: u32) -> IntTensor<Self>;

    /// Per row of `[b, d]` scores, the `k` largest positive ones' columns in index order (ties by
    /// lower index), unused slots `d`: i32 `[b · k]` (AuxK's per-token picks; no readback).
    #[fusion(dtype = burn::tensor::DType::I32, shape = burn::tensor::Shape::new([scores[0] * *k as usize]))]
    fn row_topk(scores: FloatTensor<Self>, k: u32) -> IntTensor<Self>;
}

/// The length of [`KernelOps::batch_topk_picks`]'s packed output.
pub fn picks_len(keep: u32, b: u32, d: u32) -> usize {
    b as usize + 1 + 2 * keep as usize + d as usize
}

/// A WGSL file from `shaders/`, its `{{ workgroup }}` filled in.
struct Wgsl {
    name: &'static str,
    source: &'static str,
}

const HISTOGRAM: Wgsl = Wgsl { name: "score_histogram", source: include_str!("../../shaders/score_histogram.wgsl") };
const SEGMENT_ROWS: Wgsl = Wgsl { name: "segment_rows", source: include_str!("../../shaders/segment_rows.wgsl") };
const PICK_DOT: Wgsl = Wgsl { name: "pick_dot", source: include_str!("../../shaders/pick_dot.wgsl") };
const RADIX_SCAN: Wgsl = Wgsl { name: "radix_scan", source: include_str!("../../shaders/radix_scan.wgsl") };
const ROW_COUNTS: Wgsl = Wgsl { name: "row_counts", source: include_str!("../../shaders/row_counts.wgsl") };
const ROW_OFFSETS: Wgsl = Wgsl { name: "row_offsets", source: include_str!("../../shaders/row_offsets.wgsl") };
const LATENT_COUNT: Wgsl = Wgsl { name: "latent_count", source: include_str!("../../shaders/latent_count.wgsl") };
const EXCLUSIVE_SCAN: Wgsl = Wgsl { name: "exclusive_scan", source: include_str!("../../shaders/exclusive_scan.wgsl") };
const LATENT_SCATTER: Wgsl = Wgsl { name: "latent_scatter", source: include_str!("../../shaders/latent_scatter.wgsl") };
const SEGMENT_SORT: Wgsl = Wgsl { name: "segment_sort", source: include_str!("../../shaders/segment_sort.wgsl") };
const ROW_TOPK: Wgsl = Wgsl { name: "row_topk", source: include_str!("../../shaders/row_topk.wgsl") };
const COMPACT_PICKS: Wgsl = Wgsl { name: "compact_picks", source: include_str!("../../shaders/compact_picks.wgsl") };

impl KernelSource for Wgsl {
    fn source(&self) -> SourceTemplate {
        SourceTemplate::new(self.source).register("workgroup", WORKGROUP.to_string())
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.name, WORKGROUP))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// Launches one of the `shaders/` kernels over `items` work items (its grid-stride loop covers any
/// rest): `inputs`, then `out`, then the u32 `params` are bound in that order, as every kernel
/// declares them; returns `out` as an f32 tensor of `shape` on `like`'s device.
fn launch(
    kernel: Wgsl,
    items: usize,
    inputs: &[&CubeTensor],
    out: cubecl::server::Handle,
    params: &[u32],
    like: &CubeTensor,
    shape: burn::tensor::Shape,
) -> CubeTensor {
    let client = like.client.clone();
    let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
    let params = client.create_from_slice(&bytes);
    let mut bindings: Vec<_> = inputs.iter().map(|t| t.handle.clone().binding()).collect();
    bindings.push(out.clone().binding());
    bindings.push(params.binding());
    let groups = (items as u32).div_ceil(WORKGROUP).clamp(1, 4096);
    client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(WORKGROUP))),
        CubeCount::Static(groups, 1, 1),
        KernelArguments::new().with_buffers(bindings),
    );
    CubeTensor::new_contiguous(client, like.device.clone(), shape, out, burn::tensor::DType::F32)
}

/// Launches `kernel` on `groups` workgroups with `buffers` bound in order, then the u32 `params`
/// (for kernels that read and write several buffers).
fn run(like: &CubeTensor, kernel: Wgsl, groups: u32, buffers: &[&cubecl::server::Handle], params: &[u32]) {
    let client = &like.client;
    let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
    let params = client.create_from_slice(&bytes);
    let mut bindings: Vec<_> = buffers.iter().map(|h| (*h).clone().binding()).collect();
    bindings.push(params.binding());
    client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(WORKGROUP))),
        CubeCount::Static(groups.max(1), 1, 1),
        KernelArguments::new().with_buffers(bindings),
    );
}

/// Workgroups for a grid-stride pass over `items`.
fn stride_groups(items: usize) -> u32 {
    (items as u32).div_ceil(WORKGROUP).clamp(1, 4096)
}

impl KernelOps for CubeBackend {
    fn segment_rows(
        offsets: IntTensor<Self>,
        index: IntTensor<Self>,
        coef: FloatTensor<Self>,
        table: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (offsets, index, coef, table) =
            (into_contiguous(offsets), into_contiguous(index), into_contiguous(coef), into_contiguous(table));
        let (rows, width) = (offsets.meta.shape()[0] - 1, table.meta.shape()[1]);
        let out = table.client.empty(rows * width * 4);
        let shape = burn::tensor::Shape::new([rows, width]);
        let params = [rows as u32, width as u32];
        launch(SEGMENT_ROWS, rows * width, &[&offsets, &index, &coef, &table], out, &params, &table, shape)
    }

    fn pick_dot(
        ia: IntTensor<Self>,
        ib: IntTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (ia, ib, a, b) = (into_contiguous(ia), into_contiguous(ib), into_contiguous(a), into_contiguous(b));
        let (n, width) = (ia.meta.shape()[0], a.meta.shape()[1]);
        let out = a.client.empty(n.max(1) * 4);
        launch(PICK_DOT, n, &[&ia, &ib, &a, &b], out, &[n as u32, width as u32], &a, burn::tensor::Shape::new([n]))
    }

    fn score_histogram(scores: FloatTensor<Self>, prefix: u32, mask: u32, shift: u32, bits: u32) -> FloatTensor<Self> {
        let scores: CubeTensor = into_contiguous(scores);
        let n = scores.meta.shape().num_elements();
        let bins = hist_len(bits);
        let hist = scores.client.create_from_slice(&vec![0u8; bins * 4]);
        let state: Vec<u8> = [prefix, mask].iter().flat_map(|v| v.to_le_bytes()).collect();
        let state = scores.client.create_from_slice(&state);
        let params = [n as u32, shift, (bins - 1) as u32];
        run(&scores, HISTOGRAM, stride_groups(n), &[&scores.handle, &state, &hist], &params);
        let shape = burn::tensor::Shape::new([bins]);
        CubeTensor::new_contiguous(scores.client.clone(), scores.device.clone(), shape, hist, burn::tensor::DType::F32)
    }

    fn batch_topk_picks(scores: FloatTensor<Self>, keep: u32, b: u32, d: u32) -> IntTensor<Self> {
        let scores: CubeTensor = into_contiguous(scores);
        let client = scores.client.clone();
        let n = b as usize * d as usize;
        // The radix state (see shaders/radix_scan.wgsl), chosen pass by pass on the device.
        let state = client.create_from_slice(&[0u8; 32]);
        for (i, &(shift, bits)) in PASSES.iter().enumerate() {
            let bins = hist_len(bits);
            let hist = client.create_from_slice(&vec![0u8; bins * 4]);
            run(
                &scores,
                HISTOGRAM,
                stride_groups(n),
                &[&scores.handle, &state, &hist],
                &[n as u32, shift, (bins - 1) as u32],
            );
            let scan = [bins as u32, shift, bits, u32::from(i == 0), keep, u32::from(i + 1 == PASSES.len())];
            run(&scores, RADIX_SCAN, 1, &[&hist, &state], &scan);
        }
        let rows = b.min(65_535);
        let counts = client.empty(2 * b as usize * 4);
        run(&scores, ROW_COUNTS, rows, &[&scores.handle, &state, &counts], &[b, d]);
        let len = picks_len(keep, b, d);
        let out = client.create_from_slice(&vec![0u8; len * 4]);
        let eq_take = client.empty(b as usize * 4);
        run(&scores, ROW_OFFSETS, 1, &[&counts, &state, &out, &eq_take], &[b]);
        run(&scores, COMPACT_PICKS, rows, &[&scores.handle, &state, &out, &eq_take], &[b, d, keep]);
        let shape = burn::tensor::Shape::new([len]);
        CubeTensor::new_contiguous(client, scores.device.clone(), shape, out, burn::tensor::DType::I32)
    }

    fn row_topk(scores: FloatTensor<Self>, k: u32) -> IntTensor<Self> {
        let scores: CubeTensor = into_contiguous(scores);
        let (b, d) = (scores.meta.shape()[0], scores.meta.shape()[1]);
        let out = scores.client.empty(b * k as usize * 4);
        run(&scores, ROW_TOPK, (b as u32).min(65_535), &[&scores.handle, &out], &[b as u32, d as u32, k]);
        let shape = burn::tensor::Shape::new([b * k as usize]);
        CubeTensor::new_contiguous(scores.client.clone(), scores.device.clone(), shape, out, burn::tensor::DType::I32)
    }

    fn latent_segments(latents: IntTensor<Self>, d: u32) -> IntTensor<Self> {
        let latents: CubeTensor = into_contiguous(latents);
        let client = latents.client.clone();
        let n = latents.meta.shape().num_elements();
        let counts = client.create_from_slice(&vec![0u8; d as usize * 4]);
        run(&latents, LATENT_COUNT, stride_groups(n), &[&latents.handle, &counts], &[n as u32, d]);
        let len = d as usize + 1 + n;
        let out = client.empty(len * 4);
        run(&latents, EXCLUSIVE_SCAN, 1, &[&counts, &out], &[d]);
        let cursor = client.create_from_slice(&vec![0u8; d as usize * 4]);
        run(&latents, LATENT_SCATTER, stride_groups(n), &[&latents.handle, &out, &cursor], &[n as u32, d]);
        run(&latents, SEGMENT_SORT, stride_groups(d as usize), &[&out], &[d]);
        let shape = burn::tensor::Shape::new([len]);
        CubeTensor::new_contiguous(client, latents.device.clone(), shape, out, burn::tensor::DType::I32)
    }
}

/// [`KernelOps::row_topk`] from user code: `[b · k]` column indices (unused slots `d`).
pub fn row_topk(scores: &Tensor<2>, k: usize) -> Ints {
    Tensor::from_dispatch(<Dispatch as KernelOps>::row_topk(scores.clone().into_dispatch(), k as u32))
}

/// [`KernelOps::latent_segments`], unpacked: (offsets `[d + 1]`, order `[n]`; entries of the order
/// past `offsets[d]` are 0 and belong to no segment).
pub fn latent_segments(latents: &Ints, d: usize) -> (Ints, Ints) {
    let n = latents.dims()[0];
    let packed: Ints =
        Tensor::from_dispatch(<Dispatch as KernelOps>::latent_segments(latents.clone().into_dispatch(), d as u32));
    (packed.clone().narrow(0, 0, d + 1), packed.narrow(0, d + 1, n))
}

/// BatchTopK's selection on the device ([`KernelOps::batch_topk_picks`], unpacked).
pub struct DevicePicks {
    /// `[b + 1]`: row r's picks are `offsets[r]..offsets[r + 1]`; `offsets[b]` is how many there are.
    pub token_offsets: Ints,
    /// `[keep]` each, in position order (empty slots: token b − 1, latent d, out of range).
    pub tokens: Ints,
    pub latents: Ints,
    /// `[d]`: how many tokens picked each latent.
    pub per_latent: Ints,
}

/// The `keep` largest positive of the row-major `[b, d]` `scores` (flat), picked on the device:
/// the same entries as [`crate::crosscoder::select_batch_topk`], nothing read back.
pub fn batch_topk_picks(scores: &Tensor<1>, keep: usize, b: usize, d: usize) -> DevicePicks {
    let packed: Ints = Tensor::from_dispatch(<Dispatch as KernelOps>::batch_topk_picks(
        scores.clone().into_dispatch(),
        keep as u32,
        b as u32,
        d as u32,
    ));
    DevicePicks {
        token_offsets: packed.clone().narrow(0, 0, b + 1),
        tokens: packed.clone().narrow(0, b + 1, keep),
        latents: packed.clone().narrow(0, b + 1 + keep, keep),
        per_latent: packed.narrow(0, b + 1 + 2 * keep, d),
    }
}

pub use crate::backend::{is_flex, is_wgpu};

fn histogram(scores: &Tensor<1>, prefix: u32, mask: u32, shift: u32, bits: u32) -> anyhow::Result<Vec<u32>> {
    let out = Tensor::<1>::from_dispatch(<burn::backend::Dispatch as KernelOps>::score_histogram(
        scores.clone().into_dispatch(),
        prefix,
        mask,
        shift,
        bits,
    ));
    let data = crate::counters::read_data(out)?;
    Ok(crate::io::decode_u32(safetensors::Dtype::U32, data.as_bytes())?)
}

/// The `keep`-th largest positive score (exactly, as f32) and how many scores are strictly above it,
/// or `None` when at most `keep` scores are positive. Three histogram passes on the device.
pub fn kth_largest(scores: &Tensor<1>, keep: usize) -> anyhow::Result<Option<(f32, usize)>> {
    let (mut prefix, mut mask) = (0u32, 0u32);
    let mut remaining = keep as u64; // how many of the largest are still to be located
    let mut above = 0u64;
    for (i, &(shift, bits)) in PASSES.iter().enumerate() {
        let hist = histogram(scores, prefix, mask, shift, bits)?;
        if i == 0 && hist.iter().map(|&c| c as u64).sum::<u64>() <= keep as u64 {
            return Ok(None);
        }
        // Walk from the largest bin down until the k-th largest falls inside.
        let mut bin = hist.len();
        while bin > 0 {
            bin -= 1;
            let c = hist[bin] as u64;
            if c >= remaining {
                break;
            }
            remaining -= c;
            above += c;
        }
        prefix |= (bin as u32) << shift;
        mask |= ((1u32 << bits) - 1) << shift;
    }
    Ok(Some((f32::from_bits(prefix), above as usize)))
}

type Ints = Tensor<1, burn::tensor::Int>;

/// [`KernelOps::segment_rows`] from user code: `out[r] = Σ_{p in segment r} coef[p] · table[index[p]]`.
pub fn segment_rows(offsets: &Ints, index: &Ints, coef: &Tensor<1>, table: &Tensor<2>) -> Tensor<2> {
    let (o, i) = (offsets.clone().into_dispatch(), index.clone().into_dispatch());
    let out = <Dispatch as KernelOps>::segment_rows(o, i, coef.clone().into_dispatch(), table.clone().into_dispatch());
    Tensor::from_dispatch(out)
}

/// [`KernelOps::pick_dot`] from user code: `out[p] = a[ia[p]] · b[ib[p]]`.
pub fn pick_dot(ia: &Ints, ib: &Ints, a: &Tensor<2>, b: &Tensor<2>) -> Tensor<1> {
    let (ia, ib) = (ia.clone().into_dispatch(), ib.clone().into_dispatch());
    Tensor::from_dispatch(<Dispatch as KernelOps>::pick_dot(
        ia,
        ib,
        a.clone().into_dispatch(),
        b.clone().into_dispatch(),
    ))
}

/// Plain-op reference of [`segment_rows`] (any backend): gather, scale, scatter-add by segment.
pub fn segment_rows_reference(
    segment_of: &Tensor<1, burn::tensor::Int>,
    rows: usize,
    index: &Tensor<1, burn::tensor::Int>,
    coef: &Tensor<1>,
    table: &Tensor<2>,
) -> Tensor<2> {
    let n = coef.dims()[0];
    let width = table.dims()[1];
    let gathered = table.clone().select(0, index.clone()) * coef.clone().reshape([n, 1]);
    Tensor::<2>::zeros([rows, width], &table.device()).select_assign(
        0,
        segment_of.clone(),
        gathered,
        burn::tensor::IndexingUpdateOp::Add,
    )
}

/// Plain-op reference of [`pick_dot`].
pub fn pick_dot_reference(
    ia: &Tensor<1, burn::tensor::Int>,
    ib: &Tensor<1, burn::tensor::Int>,
    a: &Tensor<2>,
    b: &Tensor<2>,
) -> Tensor<1> {
    let n = ia.dims()[0];
    (a.clone().select(0, ia.clone()) * b.clone().select(0, ib.clone())).sum_dim(1).reshape([n])
}

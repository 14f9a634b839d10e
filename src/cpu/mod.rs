//! The CPU backend: linears on the stored bytes of their weights (`quant::dot` for
//! block-quantized ones, `quant::float_dot` for F32 / F16 / BF16), candle-core for the
//! activation-by-activation matmuls of attention over many rows, hand-written loops for the rest.
use crate::ground::error::{Error, Result};
use crate::model::backend::{with_f32, with_host, Backend, KvType};
use crate::model::weights::{self as weights, RopeMode, WeightSource};
use crate::quant::dot as quant_dot;
use crate::quant::dot::Isa;
use crate::quant::float_dot::{self, gemm_serial, Right};
use crate::quant::{GgmlType, QuantError};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

mod exp;

/// The CPU backend (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

/// Whether linears on block-quantized weights use `quant::dot` (llama.cpp's road: 8-bit
/// activations, integer products on the stored bytes, no f32 copy of the weight): yes, unless
/// `MMFUSER_QUANT_DOT=0` asks for the f32 road (weights dequantized in slices of rows; the
/// reference the quantized road is measured against: scripts/quant_dot_verify_figures.sh).
/// verify's two sides take the same road, so its exactness does not depend on the choice.
fn quant_dot_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MMFUSER_QUANT_DOT").is_none_or(|v| v != "0"))
}

/// A product x [n, k] @ w^T on a weight [out, k] as stored: (type, bytes, out, k, x, n) -> y.
type StoredProduct =
    fn(GgmlType, &[u8], usize, usize, &[f32], usize) -> std::result::Result<Vec<f32>, QuantError>;

fn bad(msg: impl Into<String>) -> Error {
    Error::other(format!("cpu backend: {}", msg.into()))
}

fn mat(v: Vec<f32>, rows: usize, cols: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
}

/// A weight of shape [out, d1, ...] as the matrix [out, d1*...].
fn as_matrix(ws: &dyn WeightSource, name: &str, t: Tensor) -> Result<Tensor> {
    if t.rank() < 2 {
        return Err(Error::tensor(
            ws.origin_of(name),
            name,
            format!("expected a matrix, found shape {:?}", t.dims()),
        ));
    }
    let (r, c) = dims2(&t);
    Ok(t.reshape((r, c))?)
}

/// At most this many f32 values of a weight exist at once on the f32 road: a 7B output head is
/// 524 MB as f32, and verify's peak memory is that copy; in slices of rows it stays at 64 MiB.
const F32_ROAD_MAX_VALUES: usize = 16 << 20;

/// x [n, k] @ w^T for a stored weight of more than `max_values`, dequantizing a slice of
/// its rows at a time into one [n, out] result. The slices depend only on the weight's shape, so
/// verify's two sides slice alike. None when the weight fits in one slice or is malformed (the
/// whole-matrix road then runs, or reports why not).
fn linear_by_row_slices(
    ws: &dyn WeightSource,
    name: &str,
    raw: &weights::RawTensor<'_>,
    x: &Tensor,
    max_values: usize,
) -> Result<Option<Tensor>> {
    let Some((&out, rest)) = raw.shape.split_first() else {
        return Ok(None);
    };
    let k: usize = rest.iter().product();
    let (n, cin) = dims2(x);
    let Some(row_bytes) = raw.ty.bytes_for(k as u64).map(|b| b as usize) else {
        return Ok(None);
    };
    if rest.is_empty() || out * k <= max_values || raw.data.len() != row_bytes * out {
        return Ok(None);
    }
    if cin != k {
        return Err(Error::tensor(
            ws.origin_of(name),
            name,
            format!("input has {cin} columns, weight expects {k}"),
        ));
    }
    let step = (max_values / k).max(1);
    let mut y = vec![0f32; n * out];
    for r0 in (0..out).step_by(step) {
        let r1 = (r0 + step).min(out);
        let w = weights::dequantize(
            raw.ty,
            &raw.data[r0 * row_bytes..r1 * row_bytes],
            (r1 - r0) * k,
        )
        .map_err(|m| Error::tensor(ws.origin_of(name), name, m))?;
        let part = x.matmul(&mat(w, r1 - r0, k)?.t()?)?;
        with_f32(&part, |p| {
            y.par_chunks_mut(out)
                .zip(p.par_chunks(r1 - r0))
                .for_each(|(row, part)| row[r0..r1].copy_from_slice(part))
        })?;
    }
    Ok(Some(mat(y, n, out)?))
}

/// Below this many query rows (decode), attention streams each key and value row once per query
/// row (`attention_few`); from it on, tiles of query rows share each head's keys and values
/// (`attention_many`), which a lone row would pay to pack.
const FEW_QUERIES: usize = 16;

/// Σ a·b in 8 interleaved partial sums (vectorizable), added pairwise at the end.
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail
}

/// [`dot8`] on 8-lane vectors (the same lanes, multiplied then added without fusing, and the
/// same final additions: the same bits), b's values f32 or f16 (widened exactly by F16C as they
/// are loaded).
#[cfg(target_arch = "x86_64")]
mod avx_dots {
    use std::arch::x86_64::*;

    /// A stored value type the dots read: 8 of them as f32 lanes, one as f32.
    pub(super) trait Lanes: Copy {
        /// # Safety
        /// AVX (and F16C for f16) present; 8 values readable at `p`.
        unsafe fn load8(p: *const Self) -> __m256;
        fn widen(self) -> f32;
    }
    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        fn widen(self) -> f32 {
            self
        }
    }
    impl Lanes for half::f16 {
        #[inline(always)]
        unsafe fn load8(p: *const half::f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    /// # Safety
    /// AVX and F16C present (called from `#[target_feature]` code, into which it inlines).
    #[inline(always)]
    pub(super) unsafe fn dot8<T: Lanes>(a: &[f32], b: &[T]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_loadu_ps(a.as_ptr().add(i));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(x, T::load8(b.as_ptr().add(i))));
            i += 8;
        }
        let tail: f32 = a[i..n]
            .iter()
            .zip(&b[i..n])
            .map(|(x, y)| x * y.widen())
            .sum();
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), acc);
        ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])) + tail
    }
}

/// [`Backend::attention`] for a few query rows (decode), K and V read where they are, in row
/// order. A task is one query row and a run of adjacent heads, so it streams each key/value row's
/// contiguous slice of those heads once: reading one head at a time strode 16 KB between 512-byte
/// reads, a TLB miss per key (at 773 cached positions most of a decode step's attention time).
/// Per (row, head) the arithmetic and its order are unchanged: score j = dot8(q, k_j) * scale,
/// softmax, then the output summed over j in increasing order.
fn attention_few(
    q: &[f32],
    k: Kv<'_>,
    v: Kv<'_>,
    ((n, m), (n_head, n_head_kv, hd), causal): ((usize, usize), (usize, usize, usize), bool),
) -> Vec<f32> {
    let (qc, kc) = (n_head * hd, n_head_kv * hd);
    let mut out = vec![0f32; n * qc];
    if out.is_empty() {
        return out;
    }
    // Enough tasks for the threads, in runs of heads that divide the row (so a task's output is
    // one contiguous chunk of it).
    let want = rayon::current_num_threads().div_ceil(n).clamp(1, n_head);
    let run = (1..=n_head / want)
        .rev()
        .find(|d| n_head % d == 0)
        .unwrap_or(1);
    let shape = FewShape {
        m,
        n,
        n_head,
        rep: n_head / n_head_kv,
        hd,
        qc,
        kc,
        run,
        causal,
    };
    out.par_chunks_mut(run * hd)
        .enumerate()
        .for_each(|(idx, o)| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
                // SAFETY: AVX2 and F16C are present (checked just above).
                return unsafe { attention_run_avx2(q, k, v, &shape, idx, o) };
            }
            attention_run(q, k, v, &shape, idx, o, false)
        });
    out
}

/// Query rows per task of [`attention_many`] (a multiple of float_dot's 6-row tiles).
const QUERY_TILE: usize = 36;

/// [`Backend::attention`] for many query rows (prefill, CLIP's 577 positions). A task is a tile
/// of `QUERY_TILE` query rows, head after head: the tile's scores against only the keys its
/// rows see (causal: up to its last row's position), scaled and softmaxed per row over that
/// row's keys (zero beyond), then times the values, with `float_dot::gemm_serial`'s tiles
/// reading q, k and v where they are. So nothing bigger than one tile's scores exists (36 x 773
/// floats at verify's probe): no per-head copies of q, k, v, no [heads, n, m] score matrix, and
/// no work on the masked half of a causal product.
fn attention_many(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ((n, m), (n_head, n_head_kv, hd), causal): ((usize, usize), (usize, usize, usize), bool),
) -> Vec<f32> {
    let (qc, kc, rep) = (n_head * hd, n_head_kv * hd, n_head / n_head_kv);
    let isa = Isa::current();
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; n * qc];
    // No keys: every output is the empty sum.
    if out.is_empty() || m == 0 {
        return out;
    }
    out.par_chunks_mut(QUERY_TILE * qc)
        .enumerate()
        .for_each(|(t, o)| {
            let (i0, rows) = (t * QUERY_TILE, o.len() / qc);
            // Row i (of n) sees keys 0..seen(i).
            let seen = |i: usize| if causal { m - n + i + 1 } else { m };
            let keys = seen(i0 + rows - 1);
            let mut s = vec![0f32; rows * keys];
            for h in 0..n_head {
                let g = h / rep;
                let kg = Right::Rows {
                    data: &k[g * hd..],
                    stride: kc,
                };
                let qh = &q[i0 * qc + h * hd..];
                gemm_serial(isa, qh, qc, rows, hd, kg, keys, &mut s, keys);
                for (r, row) in s.chunks_exact_mut(keys).enumerate() {
                    let valid = seen(i0 + r);
                    row[..valid].iter_mut().for_each(|a| *a *= scale);
                    softmax_in_place(&mut row[..valid]);
                    row[valid..].fill(0.0);
                }
                let vg = Right::Cols {
                    data: &v[g * hd..],
                    stride: kc,
                };
                gemm_serial(isa, &s, keys, rows, keys, vg, hd, &mut o[h * hd..], qc);
            }
        });
    out
}

/// Keys or values of a KV cache: f32 rows, or f16 rows (an f16 cache) widened as they are read.
#[derive(Clone, Copy)]
enum Kv<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl Kv<'_> {
    /// [`dot8`] of `q` with the values at `at..at + q.len()`; f16 values are widened exactly as
    /// they are read (F16C when `simd`), so the result has the bits of the f32 case on the
    /// widened values. `scratch` (q.len() values) serves the portable f16 case.
    #[inline(always)]
    fn dot(&self, q: &[f32], at: usize, scratch: &mut [f32], simd: bool) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the caller saw AVX, AVX2 and F16C detected.
            return unsafe {
                match self {
                    Kv::F32(x) => avx_dots::dot8(q, &x[at..][..q.len()]),
                    Kv::F16(x) => avx_dots::dot8(q, &x[at..][..q.len()]),
                }
            };
        }
        let _ = simd;
        match self {
            Kv::F32(x) => dot8(q, &x[at..][..q.len()]),
            Kv::F16(x) => {
                for (w, h) in scratch.iter_mut().zip(&x[at..][..q.len()]) {
                    *w = h.to_f32();
                }
                dot8(q, &scratch[..q.len()])
            }
        }
    }

    /// o[d] += p * value[at + d] for every d (multiplied, then added: no fused rounding).
    #[inline(always)]
    fn axpy(&self, o: &mut [f32], p: f32, at: usize, simd: bool) {
        match self {
            Kv::F32(x) => {
                let x = &x[at..][..o.len()];
                for (od, &vd) in o.iter_mut().zip(x) {
                    *od += p * vd;
                }
            }
            Kv::F16(x) => {
                let x = &x[at..][..o.len()];
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: the caller saw AVX, AVX2 and F16C detected.
                    return unsafe { axpy_f16_avx(o, p, x) };
                }
                for (od, vd) in o.iter_mut().zip(x) {
                    *od += p * vd.to_f32();
                }
            }
        }
    }
}

/// o += p * b, b widened by F16C as it is loaded (multiplied, then added, as the f32 case).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn axpy_f16_avx(o: &mut [f32], p: f32, b: &[half::f16]) {
    use std::arch::x86_64::*;
    let n = o.len().min(b.len());
    let pv = _mm256_set1_ps(p);
    let mut i = 0;
    while i + 8 <= n {
        let w = _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().add(i) as *const __m128i));
        let y = _mm256_add_ps(_mm256_loadu_ps(o.as_ptr().add(i)), _mm256_mul_ps(pv, w));
        _mm256_storeu_ps(o.as_mut_ptr().add(i), y);
        i += 8;
    }
    for d in i..n {
        o[d] += p * b[d].to_f32();
    }
}

/// The geometry of [`attention_few`]'s tasks.
struct FewShape {
    m: usize,
    n: usize,
    n_head: usize,
    rep: usize,
    hd: usize,
    qc: usize,
    kc: usize,
    run: usize,
    causal: bool,
}

/// The same code compiled for 8 f32 lanes and F16C widening; no FMA, so every result equals
/// the portable build's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn attention_run_avx2(
    q: &[f32],
    k: Kv<'_>,
    v: Kv<'_>,
    s: &FewShape,
    idx: usize,
    o: &mut [f32],
) {
    attention_run(q, k, v, s, idx, o, true)
}

/// Task `idx` of [`attention_few`]: query row i = idx / (n_head / run), heads h0..h0+run.
/// An f16 cache's values are widened (exactly) as they are read, before the same f32 arithmetic.
#[inline(always)]
fn attention_run(
    q: &[f32],
    k: Kv<'_>,
    v: Kv<'_>,
    s: &FewShape,
    idx: usize,
    o: &mut [f32],
    f16c: bool,
) {
    let FewShape {
        m,
        n,
        rep,
        hd,
        qc,
        kc,
        run,
        ..
    } = *s;
    let per_row = s.n_head / run;
    let (i, h0) = (idx / per_row, (idx % per_row) * run);
    let valid = if s.causal { m - n + i + 1 } else { m };
    let scale = 1.0 / (hd as f32).sqrt();
    let qi = &q[i * qc..][..qc];
    let mut scratch = vec![0f32; hd];
    // p[r * valid + j]: head h0 + r's score, then probability, of key j.
    let mut p = vec![0f32; run * valid];
    for j in 0..valid {
        for r in 0..run {
            let (h, g) = (h0 + r, (h0 + r) / rep);
            let qh = &qi[h * hd..][..hd];
            p[r * valid + j] = k.dot(qh, j * kc + g * hd, &mut scratch, f16c) * scale;
        }
    }
    p.chunks_mut(valid.max(1)).for_each(softmax_in_place);
    for j in 0..valid {
        for (r, or) in o.chunks_mut(hd).enumerate() {
            let (pj, g) = (p[r * valid + j], (h0 + r) / rep);
            v.axpy(or, pj, j * kc + g * hd, f16c);
        }
    }
}

/// y [n, out] + bias [1, out], if any.
fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let out = dims2(&y).1;
    match bias {
        None => Ok(y),
        Some(b) if dims2(b) == (1, out) => Ok(y.broadcast_add(b)?),
        Some(b) => Err(bad(format!(
            "linear: bias {:?} for {out} outputs",
            b.dims()
        ))),
    }
}

fn dims2(t: &Tensor) -> (usize, usize) {
    match t.dims() {
        [r, c] => (*r, *c),
        [n] => (1, *n),
        d => (d[0], d[1..].iter().product()),
    }
}

/// Element-wise map over a tensor, in parallel.
fn map(x: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> Result<Tensor> {
    let (r, c) = dims2(x);
    let v = with_f32(x, |s| s.par_iter().map(|&a| f(a)).collect::<Vec<f32>>())?;
    mat(v, r, c)
}

/// Apply `f(row_in, row_out)` to every row, in parallel.
fn map_rows(x: &Tensor, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Result<Tensor> {
    let (r, c) = dims2(x);
    let mut out = vec![0f32; r * c];
    if c > 0 {
        with_f32(x, |s| {
            out.par_chunks_mut(c)
                .zip(s.par_chunks(c))
                .for_each(|(o, i)| f(i, o))
        })?;
    }
    mat(out, r, c)
}

fn softmax_in_place(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // libm's exp, not `exp::exp`: both are as accurate, but a softmax's values feed the f16 KV
    // cache, whose roundings the two paths of tests/generate.rs's f16 test then flip apart.
    let mut sum = 0f64;
    for a in v.iter_mut() {
        *a = (*a - max).exp();
        sum += *a as f64;
    }
    let inv = (1.0 / sum) as f32;
    for a in v.iter_mut() {
        *a *= inv;
    }
}

/// Layer norm of one row (f64 statistics).
pub(crate) fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&a| a as f64).sum::<f64>() / n;
    let var = x.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps as f64).sqrt();
    for i in 0..x.len() {
        out[i] = (((x[i] as f64 - mean) * inv) as f32) * w[i] + b[i];
    }
}

/// RMS norm of one row (f64 statistics).
pub(crate) fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
    for i in 0..x.len() {
        out[i] = w[i] * (x[i] * inv);
    }
}

/// Multi-scale deformable attention core on plain slices (the CPU op; also the reference for
/// other backends). Deformable-DETR `ms_deform_attn_core` / the CUDA `ms_deform_attn_im2col`:
///
/// - value: [sum_l H_l*W_l, C], C = n_heads * D, head m owns columns m*D..(m+1)*D;
/// - offsets: [Nq, M, L, P, 2] flattened, (x, y) last; weights: [Nq, M, L*P] (softmaxed);
/// - query t = (i, j) of the ref grid has reference point ((j+0.5)/ref_w, (i+0.5)/ref_h);
/// - loc = ref + off / (W_l, H_l); pixel coords x = loc_x*W_l - 0.5, y = loc_y*H_l - 0.5;
/// - bilinear sample of level l, head m, with corners outside the map contributing zero
///   (grid_sample, align_corners=False, padding_mode="zeros");
/// - out[t, m*D..] = sum_{l,p} w * sample. f32 accumulation, no [Nq,M,L,P,D] intermediate.
#[allow(clippy::too_many_arguments)]
pub fn msda_core(
    value: &[f32],
    c: usize,
    levels: &[(usize, usize)],
    offsets: &[f32],
    weights: &[f32],
    ref_grid: (usize, usize),
    n_heads: usize,
    n_points: usize,
    out: &mut [f32],
) {
    let n_levels = levels.len();
    let d = c / n_heads;
    let (ref_h, ref_w) = ref_grid;
    let nq = ref_h * ref_w;
    let per_q = n_heads * n_levels * n_points;
    let mut starts = Vec::with_capacity(n_levels);
    let mut acc = 0;
    for &(h, w) in levels {
        starts.push(acc);
        acc += h * w;
    }
    debug_assert_eq!(value.len(), acc * c);
    debug_assert_eq!(offsets.len(), nq * per_q * 2);
    debug_assert_eq!(weights.len(), nq * per_q);
    debug_assert_eq!(out.len(), nq * c);
    out.par_chunks_mut(c).enumerate().for_each(|(t, orow)| {
        orow.fill(0.0);
        let rx = (t % ref_w) as f32 + 0.5;
        let ry = (t / ref_w) as f32 + 0.5;
        let (rx, ry) = (rx / ref_w as f32, ry / ref_h as f32);
        let off = &offsets[t * per_q * 2..(t + 1) * per_q * 2];
        let wts = &weights[t * per_q..(t + 1) * per_q];
        for m in 0..n_heads {
            let acc = &mut orow[m * d..(m + 1) * d];
            for (l, &(h, w)) in levels.iter().enumerate() {
                let (hf, wf) = (h as f32, w as f32);
                for p in 0..n_points {
                    let k = (m * n_levels + l) * n_points + p;
                    let a = wts[k];
                    let x = (rx + off[2 * k] / wf) * wf - 0.5;
                    let y = (ry + off[2 * k + 1] / hf) * hf - 0.5;
                    // Also rejects NaN.
                    if !(x > -1.0 && y > -1.0 && x < wf && y < hf) {
                        continue;
                    }
                    let (x0, y0) = (x.floor(), y.floor());
                    let (fx, fy) = (x - x0, y - y0);
                    let (x0, y0) = (x0 as i64, y0 as i64);
                    for (yy, wy) in [(y0, 1.0 - fy), (y0 + 1, fy)] {
                        if yy < 0 || yy >= h as i64 {
                            continue;
                        }
                        for (xx, wx) in [(x0, 1.0 - fx), (x0 + 1, fx)] {
                            if xx < 0 || xx >= w as i64 {
                                continue;
                            }
                            let coef = a * wy * wx;
                            let row = starts[l] + yy as usize * w + xx as usize;
                            let v = &value[row * c + m * d..row * c + (m + 1) * d];
                            for (o, &vv) in acc.iter_mut().zip(v) {
                                *o += coef * vv;
                            }
                        }
                    }
                }
            }
        }
    });
}

impl CpuBackend {
    /// a op b, b of a's shape or one row broadcast over a's rows.
    fn elementwise(
        &self,
        a: &Tensor,
        b: &Tensor,
        f: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let (ra, ca) = dims2(a);
        let (rb, cb) = dims2(b);
        let a2 = a.reshape((ra, ca))?;
        let b2 = b.reshape((rb, cb))?;
        Ok(if ra == rb {
            f(&a2, &b2)?
        } else {
            f(&a2, &b2.broadcast_as((ra, ca))?)?
        })
    }
}

/// Both rope forms on the CPU: the same angles, only which two columns of a head form a pair
/// differs (2i and 2i+1 interleaved; i and i + hd/2 in rotate_half form).
fn rope_cpu(x: &Tensor, n_head: usize, pos0: usize, theta: f32, mode: RopeMode) -> Result<Tensor> {
    let (n, c) = dims2(x);
    let hd = c / n_head;
    let half = hd / 2;
    // cos/sin table [n, hd/2], angles in f64.
    let mut cs = Vec::with_capacity(n * half);
    for t in 0..n {
        let pos = (pos0 + t) as f64;
        for i in 0..half {
            let ang = pos * (theta as f64).powf(-2.0 * i as f64 / hd as f64);
            cs.push((ang.cos() as f32, ang.sin() as f32));
        }
    }
    let (r, cc) = (n, c);
    let mut out = vec![0f32; r * cc];
    with_f32(x, |s| {
        out.par_chunks_mut(c)
            .zip(s.par_chunks(c))
            .enumerate()
            .for_each(|(t, (o, xr))| {
                let tab = &cs[t * half..(t + 1) * half];
                for h in 0..n_head {
                    let b = h * hd;
                    for (i, &(co, si)) in tab.iter().enumerate() {
                        // Read the pair where the mode keeps it; write it side by side (see
                        // `Backend::rope_neox` for why the Neox road writes pairs there too).
                        let (j0, j1) = match mode {
                            RopeMode::Interleaved => (b + 2 * i, b + 2 * i + 1),
                            RopeMode::Neox => (b + i, b + i + half),
                        };
                        let (x0, x1) = (xr[j0], xr[j1]);
                        o[b + 2 * i] = x0 * co - x1 * si;
                        o[b + 2 * i + 1] = x0 * si + x1 * co;
                    }
                }
            })
    })?;
    mat(out, r, cc)
}

/// Operand shapes are checked by the model's front (`model::backend::Checked`), not here: a
/// wrong shape from a direct call fails in candle or panics on a slice bound, never reads wild.
impl Backend for CpuBackend {
    type T = Tensor;
    type W = Tensor;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, x: &Tensor) -> Result<Tensor> {
        let (r, c) = dims2(x);
        Ok(x.to_dtype(candle_core::DType::F32)?.reshape((r, c))?)
    }
    fn download(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn dims(&self, x: &Tensor) -> (usize, usize) {
        dims2(x)
    }
    fn weight(&self, ws: &dyn WeightSource, name: &str) -> Result<Tensor> {
        as_matrix(ws, name, ws.tensor_f32(name)?)
    }
    fn weight_dims(&self, w: &Tensor) -> (usize, usize) {
        dims2(w)
    }
    fn param(&self, ws: &dyn WeightSource, name: &str) -> Result<Tensor> {
        let t = ws.tensor_f32(name)?;
        let (r, c) = dims2(&t);
        Ok(t.reshape((r, c))?)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        add_bias(x.matmul(&w.t()?)?, bias)
    }

    /// On the weight's stored bytes: block-quantized weights (Q4_K, Q6_K, Q8_0, ...) by
    /// `quant::dot` (activations rounded to 8 bits per block, as llama.cpp does), F32 / F16 /
    /// BF16 ones by `quant::float_dot` (f32 arithmetic). The other types (Q4_1, Q5_1), and the
    /// block-quantized ones with `MMFUSER_QUANT_DOT=0` (see [`quant_dot_enabled`]), are
    /// dequantized to f32, in slices of rows for big matrices.
    fn linear_from(
        &self,
        ws: &dyn WeightSource,
        name: &str,
        x: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let raw = ws.raw(name)?;
        let on_bytes = if quant_dot::supported(raw.ty) && quant_dot_enabled() {
            Some(quant_dot::matmul as StoredProduct)
        } else if float_dot::supported(raw.ty) {
            Some(float_dot::matmul as StoredProduct)
        } else {
            None
        };
        let Some(product) = on_bytes.filter(|_| raw.shape.len() >= 2) else {
            if let Some(y) = linear_by_row_slices(ws, name, &raw, x, F32_ROAD_MAX_VALUES)? {
                drop(raw);
                ws.release(name);
                return add_bias(y, bias);
            }
            let w = as_matrix(ws, name, weights::raw_to_f32(ws, name, raw)?)?;
            if dims2(x).1 != dims2(&w).1 {
                return Err(Error::tensor(
                    ws.origin_of(name),
                    name,
                    format!(
                        "input has {} columns, weight expects {}",
                        dims2(x).1,
                        dims2(&w).1
                    ),
                ));
            }
            return self.linear(x, &w, bias);
        };
        let (out, k) = (raw.shape[0], raw.shape[1..].iter().product::<usize>());
        let (n, cin) = dims2(x);
        if cin != k {
            return Err(Error::tensor(
                ws.origin_of(name),
                name,
                format!("input has {cin} columns, weight expects {k}"),
            ));
        }
        let y = with_f32(x, |xs| product(raw.ty, &raw.data, out, k, xs, n))?
            .map_err(|e| Error::tensor(ws.origin_of(name), name, e.to_string()))?;
        drop(raw);
        ws.release(name);
        add_bias(mat(y, n, out)?, bias)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        n_head: usize,
        n_head_kv: usize,
        causal: bool,
    ) -> Result<Tensor> {
        let (n, qc) = dims2(q);
        let m = dims2(k).0;
        let hd = qc / n_head;
        let shape = ((n, m), (n_head, n_head_kv, hd), causal);
        if n < FEW_QUERIES {
            let out = match (k.dtype(), v.dtype()) {
                (DType::F16, DType::F16) => with_f32(q, |q| {
                    with_host(k, |k: &[half::f16]| {
                        with_host(v, |v: &[half::f16]| {
                            attention_few(q, Kv::F16(k), Kv::F16(v), shape)
                        })
                    })
                })???,
                _ => with_f32(q, |q| {
                    with_f32(k, |k| {
                        with_f32(v, |v| attention_few(q, Kv::F32(k), Kv::F32(v), shape))
                    })
                })???,
            };
            return mat(out, n, qc);
        }
        // An f16 KV cache, widened (exactly) for the products.
        let (k, v) = (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
        let out = with_f32(q, |q| {
            with_f32(&k, |k| with_f32(&v, |v| attention_many(q, k, v, shape)))
        })???;
        mat(out, n, qc)
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        let w = with_f32(w, |s| s.to_vec())?;
        let b = with_f32(b, |s| s.to_vec())?;
        map_rows(x, |i, o| layer_norm_row(i, &w, &b, eps, o))
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        let w = with_f32(w, |s| s.to_vec())?;
        map_rows(x, |i, o| rms_norm_row(i, &w, eps, o))
    }

    fn softmax_groups(&self, x: &Tensor, group: usize) -> Result<Tensor> {
        map_rows(x, |i, o| {
            o.copy_from_slice(i);
            o.chunks_mut(group).for_each(softmax_in_place);
        })
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.elementwise(a, b, |a, b| a + b)
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.elementwise(a, b, |a, b| a * b)
    }
    fn quick_gelu(&self, x: &Tensor) -> Result<Tensor> {
        map(x, |a| a / (1.0 + (-1.702 * a).exp()))
    }
    fn gelu_erf(&self, x: &Tensor) -> Result<Tensor> {
        map(x, |a| {
            let a = a as f64;
            (0.5 * a * (1.0 + candle_core::cpu::erf::erf_f64(a * std::f64::consts::FRAC_1_SQRT_2)))
                as f32
        })
    }
    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let (r, c) = dims2(gate);
        // Runs of 16 KB per rayon task.
        const RUN: usize = 4096;
        let mut out = vec![0f32; r * c];
        with_f32(gate, |g| {
            with_f32(up, |u| {
                out.par_chunks_mut(RUN)
                    .zip(g.par_chunks(RUN).zip(u.par_chunks(RUN)))
                    .for_each(|(o, (g, u))| exp::silu_mul(g, u, o))
            })
        })??;
        mat(out, r, c)
    }

    fn rope_interleaved(
        &self,
        x: &Tensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<Tensor> {
        rope_cpu(x, n_head, pos0, theta, RopeMode::Interleaved)
    }

    fn rope_neox(&self, x: &Tensor, n_head: usize, pos0: usize, theta: f32) -> Result<Tensor> {
        rope_cpu(x, n_head, pos0, theta, RopeMode::Neox)
    }

    fn msda(
        &self,
        value: &Tensor,
        levels: &[(usize, usize)],
        offsets: &Tensor,
        weights: &Tensor,
        ref_grid: (usize, usize),
        n_heads: usize,
        n_points: usize,
    ) -> Result<Tensor> {
        let c = dims2(value).1;
        let nq = ref_grid.0 * ref_grid.1;
        let mut out = vec![0f32; nq * c];
        with_f32(value, |v| {
            with_f32(offsets, |o| {
                with_f32(weights, |w| {
                    msda_core(v, c, levels, o, w, ref_grid, n_heads, n_points, &mut out)
                })
            })
        })???;
        mat(out, nq, c)
    }

    fn rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        Ok(x.narrow(0, start, len)?)
    }
    fn concat_rows(&self, xs: &[&Tensor]) -> Result<Tensor> {
        Ok(Tensor::cat(xs, 0)?)
    }
    /// New rows written in place into spare rows; when none are left, a buffer a quarter larger
    /// than needed (geometric growth: a generation of N tokens copies the cache O(log N) times,
    /// not N times, and a 773-position prompt holds 966 rows, not twice its length).
    /// An f16 cache is an f16 tensor (candle's conversion rounds to nearest, ties to even), which
    /// `attention` reads as it is.
    fn kv_append(
        &self,
        cache: Option<(Tensor, usize)>,
        new: &Tensor,
        ty: KvType,
    ) -> Result<Tensor> {
        let (n, c) = dims2(new);
        let dtype = match ty {
            KvType::F32 => DType::F32,
            KvType::F16 => DType::F16,
        };
        let new = new.to_dtype(dtype)?.contiguous()?;
        if let Some((buf, used)) = &cache {
            if dims2(buf).1 == c && dims2(buf).0 >= used + n && buf.dtype() == dtype {
                buf.slice_set(&new, 0, *used)?;
                return Ok(buf.clone());
            }
        }
        let used = cache.as_ref().map_or(0, |(_, u)| *u);
        let rows = (used + n + (used + n) / 4).max(64);
        let buf = Tensor::zeros((rows, c), dtype, &Device::Cpu)?;
        if let Some((old, used)) = &cache {
            let old = old.narrow(0, 0, *used)?.to_dtype(dtype)?.contiguous()?;
            buf.slice_set(&old, 0, 0)?;
        }
        buf.slice_set(&new, 0, used)?;
        Ok(buf)
    }
}

/// The CPU backend with every linear on f32 weights (block-quantized ones dequantized, f32
/// activations): the arithmetic of the CUDA backend, so the reference its tests compare with.
/// Everything else is [`CpuBackend`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuF32Linear;

impl Backend for CpuF32Linear {
    type T = Tensor;
    type W = Tensor;
    fn name(&self) -> &'static str {
        "cpu (f32 linear)"
    }
    fn upload(&self, x: &Tensor) -> Result<Tensor> {
        CpuBackend.upload(x)
    }
    fn download(&self, x: &Tensor) -> Result<Tensor> {
        CpuBackend.download(x)
    }
    fn dims(&self, x: &Tensor) -> (usize, usize) {
        dims2(x)
    }
    fn weight(&self, ws: &dyn WeightSource, name: &str) -> Result<Tensor> {
        CpuBackend.weight(ws, name)
    }
    fn weight_dims(&self, w: &Tensor) -> (usize, usize) {
        dims2(w)
    }
    fn param(&self, ws: &dyn WeightSource, name: &str) -> Result<Tensor> {
        CpuBackend.param(ws, name)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        CpuBackend.linear(x, w, bias)
    }
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        n_head: usize,
        n_head_kv: usize,
        causal: bool,
    ) -> Result<Tensor> {
        CpuBackend.attention(q, k, v, n_head, n_head_kv, causal)
    }
    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        CpuBackend.layer_norm(x, w, b, eps)
    }
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        CpuBackend.rms_norm(x, w, eps)
    }
    fn softmax_groups(&self, x: &Tensor, group: usize) -> Result<Tensor> {
        CpuBackend.softmax_groups(x, group)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        CpuBackend.add(a, b)
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        CpuBackend.mul(a, b)
    }
    fn quick_gelu(&self, x: &Tensor) -> Result<Tensor> {
        CpuBackend.quick_gelu(x)
    }
    fn gelu_erf(&self, x: &Tensor) -> Result<Tensor> {
        CpuBackend.gelu_erf(x)
    }
    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        CpuBackend.silu_mul(gate, up)
    }
    fn rope_interleaved(
        &self,
        x: &Tensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<Tensor> {
        CpuBackend.rope_interleaved(x, n_head, pos0, theta)
    }
    fn rope_neox(&self, x: &Tensor, n_head: usize, pos0: usize, theta: f32) -> Result<Tensor> {
        CpuBackend.rope_neox(x, n_head, pos0, theta)
    }
    fn msda(
        &self,
        value: &Tensor,
        levels: &[(usize, usize)],
        offsets: &Tensor,
        weights: &Tensor,
        ref_grid: (usize, usize),
        n_heads: usize,
        n_points: usize,
    ) -> Result<Tensor> {
        CpuBackend.msda(value, levels, offsets, weights, ref_grid, n_heads, n_points)
    }
    fn rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        CpuBackend.rows(x, start, len)
    }
    fn concat_rows(&self, xs: &[&Tensor]) -> Result<Tensor> {
        CpuBackend.concat_rows(xs)
    }
    fn kv_append(
        &self,
        cache: Option<(Tensor, usize)>,
        new: &Tensor,
        ty: KvType,
    ) -> Result<Tensor> {
        CpuBackend.kv_append(cache, new, ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ground::dtype::GgmlType;
    use crate::model::backend::linear_via_weight;
    use crate::model::testutil::Rng;

    /// Block-quantized weights go through quant::dot on their stored bytes (bit-equal to it, and
    /// not equal to the f32 road, so that road was not taken), float ones through float_dot
    /// (bit-equal to it, and within f32 rounding of the f32 road); the bias is added; a width
    /// mismatch names the tensor.
    #[test]
    fn linear_from_uses_quantized_products() {
        use crate::model::weights::MemWeights;
        let (n, out, k) = (3, 8, 512);
        let mut rng = Rng::new(7);
        let x = rng.vec(n * k, 1.0);
        let wv = rng.vec(out * k, 0.5);
        let bias = rng.vec(out, 1.0);
        let mut ws = MemWeights::new();
        let be = CpuBackend;
        let xt = mat(x.clone(), n, k).unwrap();
        let bt = mat(bias.clone(), 1, out).unwrap();
        for ty in [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q8_0, GgmlType::F16] {
            let bytes = crate::quant::quantize(ty, &wv).unwrap();
            ws.tensors
                .insert("w".into(), (ty, vec![out, k], bytes.clone()));
            let got = be.linear_from(&ws, "w", &xt, Some(&bt)).unwrap();
            let got = with_f32(&got, |s| s.to_vec()).unwrap();
            let f32_road = linear_via_weight(&be, &ws, "w", &xt, Some(&bt)).unwrap();
            let other = CpuF32Linear.linear_from(&ws, "w", &xt, Some(&bt)).unwrap();
            assert_eq!(
                other.to_vec2::<f32>().unwrap(),
                f32_road.to_vec2::<f32>().unwrap()
            );
            let f32_road = with_f32(&f32_road, |s| s.to_vec()).unwrap();
            if quant_dot::supported(ty) {
                let want = quant_dot::matmul(ty, &bytes, out, k, &x, n).unwrap();
                for j in 0..n {
                    for o in 0..out {
                        assert_eq!(got[j * out + o], want[j * out + o] + bias[o], "{ty}");
                    }
                }
                assert_ne!(got, f32_road, "{ty}: took the f32 road");
            } else {
                let want = float_dot::matmul(ty, &bytes, out, k, &x, n).unwrap();
                for j in 0..n {
                    for o in 0..out {
                        assert_eq!(got[j * out + o], want[j * out + o] + bias[o], "{ty}");
                    }
                }
            }
            // The 8-bit activations move outputs by about 1% of their scale, not more.
            let scale =
                (f32_road.iter().map(|v| v * v).sum::<f32>() / f32_road.len() as f32).sqrt();
            let worst = got
                .iter()
                .zip(&f32_road)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 0.02 * scale, "{ty}: {worst} vs rms {scale}");
        }
        let narrow = mat(vec![0.0; n * 256], n, 256).unwrap();
        let e = be
            .linear_from(&ws, "w", &narrow, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("w") && e.contains("512"), "{e}");
        ws.tensors
            .insert("w".into(), (GgmlType::Q4K, vec![out, k], vec![0u8; 10]));
        let e = be.linear_from(&ws, "w", &xt, None).unwrap_err().to_string();
        assert!(e.contains("w"), "{e}");
    }

    /// The CPU's KV cache appends in place and regrows: its first `used` rows always equal the
    /// concatenation of everything appended, through several regrowths.
    /// An f16 cache holds exactly the f16 rounding of everything appended (half's, ties to even).
    #[test]
    fn kv_append_in_place_equals_concatenation() {
        let be = CpuBackend;
        for ty in [KvType::F32, KvType::F16] {
            let mut rng = Rng::new(9);
            let (mut buf, mut used, mut all): (Option<Tensor>, usize, Vec<f32>) = (None, 0, vec![]);
            for n in [3usize, 1, 1, 70, 1, 1, 200, 5, 1] {
                let v = rng.vec(n * 8, 1.0);
                all.extend(v.iter().map(|&x| match ty {
                    KvType::F32 => x,
                    KvType::F16 => half::f16::from_f32(x).to_f32(),
                }));
                let b = be
                    .kv_append(buf.take().map(|b| (b, used)), &mat(v, n, 8).unwrap(), ty)
                    .unwrap();
                used += n;
                assert!(dims2(&b).0 >= used);
                let view = be.kv_view(&b, used).unwrap().to_dtype(DType::F32).unwrap();
                assert_eq!(
                    with_f32(&view, |s| s.to_vec()).unwrap(),
                    all,
                    "{ty:?} after {used} rows"
                );
                buf = Some(b);
            }
        }
    }

    /// Whether the 8-lane (AVX2 + F16C) roads of the attention can run here.
    fn avx2_f16c_here() -> bool {
        #[cfg(target_arch = "x86_64")]
        return is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The AVX dot product is `dot8` bit for bit (whole vectors, tails, empty).
    #[test]
    fn dot8_vector_equals_dot8() {
        let mut rng = Rng::new(21);
        let simd = avx2_f16c_here();
        for n in [0usize, 1, 7, 8, 9, 16, 37, 128, 131] {
            let (a, b) = (rng.vec(n, 3.0), rng.vec(n, 3.0));
            for s in [false, simd] {
                assert_eq!(
                    Kv::F32(&b).dot(&a, 0, &mut [], s).to_bits(),
                    dot8(&a, &b).to_bits(),
                    "n {n} simd {s}"
                );
            }
        }
    }

    /// Attention reading an f16 KV cache (few query rows: widened as read; many: widened first)
    /// gives, bit for bit, attention on f32 keys and values holding the same rounded values.
    #[test]
    fn attention_on_f16_kv_equals_f32_on_the_rounded_values() {
        let mut rng = Rng::new(15);
        for (n, m, nh, nkv, hd) in [
            (1, 37, 8, 2, 64),
            (3, 20, 4, 4, 32),
            (1, 9, 6, 3, 20),
            (20, 20, 4, 1, 24),
        ] {
            let q = mat(rng.vec(n * nh * hd, 1.0), n, nh * hd).unwrap();
            let k = mat(rng.vec(m * nkv * hd, 1.0), m, nkv * hd).unwrap();
            let v = mat(rng.vec(m * nkv * hd, 1.0), m, nkv * hd).unwrap();
            let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
            let rounded = |t: &Tensor| half(t).to_dtype(DType::F32).unwrap();
            let got = CpuBackend
                .attention(&q, &half(&k), &half(&v), nh, nkv, true)
                .unwrap();
            let want = CpuBackend
                .attention(&q, &rounded(&k), &rounded(&v), nh, nkv, true)
                .unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap(),
                "n{n} m{m} nh{nh} nkv{nkv} hd{hd}"
            );
            assert_ne!(
                rounded(&k).to_vec2::<f32>().unwrap(),
                k.to_vec2::<f32>().unwrap()
            );
        }
    }

    /// An f16 cache's values are widened as they are read: its dot and axpy have the bits of the
    /// f32 ones on the widened values, with F16C and without, for every length's tail.
    #[test]
    fn f16_kv_reads_equal_f32_reads_of_the_widened_values() {
        let mut rng = Rng::new(21);
        let simd = avx2_f16c_here();
        for len in [1, 7, 8, 9, 64, 131] {
            let q = rng.vec(len, 1.0);
            let h: Vec<half::f16> = rng
                .vec(len + 3, 1.0)
                .into_iter()
                .map(half::f16::from_f32)
                .collect();
            let w: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
            let mut scratch = vec![0f32; len];
            let want = Kv::F32(&w).dot(&q, 3, &mut scratch, false);
            let o0 = rng.vec(len, 1.0);
            let mut want_o = o0.clone();
            Kv::F32(&w).axpy(&mut want_o, 0.37, 3, false);
            for s in [false, simd] {
                assert_eq!(
                    Kv::F16(&h).dot(&q, 3, &mut scratch, s).to_bits(),
                    want.to_bits(),
                    "{len} {s}"
                );
                let mut o = o0.clone();
                Kv::F16(&h).axpy(&mut o, 0.37, 3, s);
                assert_eq!(o, want_o, "{len} {s}");
            }
        }
    }

    /// Attention for a few query rows (the decode road) and for many (query tiles) both equal an
    /// f64 computation of softmax(q.k / sqrt(hd)) v with GQA, with and without the causal mask
    /// (also over a cached prefix: m > n).
    #[test]
    fn attention_few_and_many_rows_equal_f64() {
        let mut rng = Rng::new(5);
        for (n, m, nh, nkv, hd, causal) in [
            (1, 1, 4, 2, 16, true),
            (1, 37, 8, 2, 64, true),
            (5, 9, 4, 4, 32, true),
            (3, 3, 2, 1, 8, false),
            (15, 40, 4, 2, 16, true),
            (16, 40, 4, 2, 16, true),
            (20, 20, 4, 1, 24, false),
            // several query tiles, a partial one, keys past one 256-key run, odd head sizes
            (80, 300, 4, 2, 20, true),
            (77, 77, 2, 2, 72, false),
            (40, 41, 3, 1, 8, true),
            (20, 0, 2, 2, 8, false),
        ] {
            let (q, k, v) = (
                rng.vec(n * nh * hd, 1.0),
                rng.vec(m * nkv * hd, 1.0),
                rng.vec(m * nkv * hd, 1.0),
            );
            let got = CpuBackend
                .attention(
                    &mat(q.clone(), n, nh * hd).unwrap(),
                    &mat(k.clone(), m, nkv * hd).unwrap(),
                    &mat(v.clone(), m, nkv * hd).unwrap(),
                    nh,
                    nkv,
                    causal,
                )
                .unwrap();
            let got = with_f32(&got, |s| s.to_vec()).unwrap();
            for i in 0..n {
                for h in 0..nh {
                    let g = h / (nh / nkv);
                    let valid = if causal { m - n + i + 1 } else { m };
                    let sc: Vec<f64> = (0..valid)
                        .map(|j| {
                            (0..hd)
                                .map(|d| {
                                    q[i * nh * hd + h * hd + d] as f64
                                        * k[j * nkv * hd + g * hd + d] as f64
                                })
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..valid)
                            .map(|j| e[j] / z * v[j * nkv * hd + g * hd + d] as f64)
                            .sum();
                        let have = got[i * nh * hd + h * hd + d] as f64;
                        assert!(
                            (have - want).abs() < 1e-5,
                            "n{n} m{m} h{h} i{i} d{d}: {have} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The f32 road in slices of rows (a weight larger than the slice limit) gives, column for
    /// column, an f64 product of the dequantized weight; slices that do not divide the rows and a
    /// slice of one row both work; a width mismatch names the tensor.
    #[test]
    fn f32_road_in_row_slices_computes_the_product() {
        use crate::model::weights::{MemWeights, RawTensor};
        let (n, out, k) = (3, 37, 64);
        let mut rng = Rng::new(11);
        let x = rng.vec(n * k, 1.0);
        let wv = rng.vec(out * k, 0.5);
        let xt = mat(x.clone(), n, k).unwrap();
        let mut ws = MemWeights::new();
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4K] {
            let k = if ty == GgmlType::Q4K { 256 } else { k };
            let (x, xt) = if k == 64 {
                (x.clone(), xt.clone())
            } else {
                let x = rng.vec(n * k, 1.0);
                (x.clone(), mat(x, n, k).unwrap())
            };
            let wv = if k == 64 {
                wv.clone()
            } else {
                rng.vec(out * k, 0.5)
            };
            let bytes = crate::quant::quantize(ty, &wv).unwrap();
            let wd = crate::model::weights::dequantize(ty, &bytes, out * k).unwrap();
            let raw = RawTensor {
                ty,
                shape: vec![out, k],
                data: std::borrow::Cow::Owned(bytes.clone()),
            };
            ws.tensors.insert("w".into(), (ty, vec![out, k], bytes));
            for max in [k, 5 * k, 10 * k + 3] {
                let y = linear_by_row_slices(&ws, "w", &raw, &xt, max)
                    .unwrap()
                    .expect("sliced");
                let y = y.to_vec2::<f32>().unwrap();
                for (j, row) in y.iter().enumerate() {
                    for (o, &got) in row.iter().enumerate() {
                        let want: f64 = (0..k)
                            .map(|c| x[j * k + c] as f64 * wd[o * k + c] as f64)
                            .sum();
                        assert!(
                            (got as f64 - want).abs() < 1e-4,
                            "{ty} {max}: {got} vs {want}"
                        );
                    }
                }
            }
            assert!(linear_by_row_slices(&ws, "w", &raw, &xt, out * k)
                .unwrap()
                .is_none());
            let narrow = mat(vec![0.0; n * (k / 2)], n, k / 2).unwrap();
            let e = linear_by_row_slices(&ws, "w", &raw, &narrow, k)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("weight expects {k}")), "{e}");
        }
    }

    /// One head, one level, one point, D = 1, a 1x1 query grid (reference point = map centre):
    /// the offset is in pixels, x = W/2 - 0.5 + off_x.
    fn sample_1(map: &[f32], h: usize, w: usize, off: (f32, f32)) -> f32 {
        let mut out = [0f32];
        msda_core(
            map,
            1,
            &[(h, w)],
            &[off.0, off.1],
            &[1.0],
            (1, 1),
            1,
            1,
            &mut out,
        );
        out[0]
    }

    fn map4() -> Vec<f32> {
        (0..16).map(|i| (i + 1) as f32).collect() // 4x4, value(y, x) = 4y + x + 1
    }

    #[test]
    fn msda_centre_and_pixel_centres() {
        let m = map4();
        // Centre of a 4x4 map: x = y = 1.5, the mean of pixels (1,1), (1,2), (2,1), (2,2).
        assert!((sample_1(&m, 4, 4, (0.0, 0.0)) - (6.0 + 7.0 + 10.0 + 11.0) / 4.0).abs() < 1e-6);
        // Exactly on pixel centres: offset (0.5 + dx, 0.5 + dy) lands on (x, y) = (2 + dx, 2 + dy).
        for y in 0..4i32 {
            for x in 0..4i32 {
                let off = (x as f32 - 1.5, y as f32 - 1.5);
                let want = (4 * y + x + 1) as f32;
                assert!((sample_1(&m, 4, 4, off) - want).abs() < 1e-5, "({x},{y})");
            }
        }
        // Between two pixels horizontally: x = 0.25 on row 0 -> 0.75*1 + 0.25*2.
        assert!((sample_1(&m, 4, 4, (-1.25, -1.5)) - 1.25).abs() < 1e-5);
    }

    #[test]
    fn msda_borders_and_outside() {
        let m = map4();
        // x = -0.5 on row 0: half of pixel (0,0), the other half is outside (zero).
        assert!((sample_1(&m, 4, 4, (-2.0, -1.5)) - 0.5).abs() < 1e-6);
        // x = W - 0.5 = 3.5 on row 3: half of pixel (3,3) = 16.
        assert!((sample_1(&m, 4, 4, (2.0, 1.5)) - 8.0).abs() < 1e-5);
        // Corner (-0.5, -0.5): a quarter of pixel (0,0).
        assert!((sample_1(&m, 4, 4, (-2.0, -2.0)) - 0.25).abs() < 1e-6);
        // x = -1 exactly, x < -1, x = W, x > W, same for y: nothing.
        for off in [
            (-2.5, 0.0),
            (-3.7, 0.0),
            (2.5, 0.0),
            (9.0, 0.0),
            (0.0, -2.5),
            (0.0, 2.5),
            (0.0, -100.0),
            (f32::NAN, 0.0),
        ] {
            assert_eq!(sample_1(&m, 4, 4, off), 0.0, "{off:?}");
        }
        // Just inside x = -1: a tiny share of pixel column 0.
        let v = sample_1(&m, 4, 4, (-2.4, 0.0)); // x = -0.9, y = 1.5 -> 0.1 * mean(5, 9)
        assert!((v - 0.1 * 7.0).abs() < 1e-5, "{v}");
    }

    /// Independent formula: bilinear with zero padding = sum over pixels of tent weights.
    #[allow(clippy::too_many_arguments)]
    fn msda_naive(
        value: &[f32],
        c: usize,
        levels: &[(usize, usize)],
        off: &[f32],
        wts: &[f32],
        grid: (usize, usize),
        nh: usize,
        np: usize,
    ) -> Vec<f32> {
        let nl = levels.len();
        let d = c / nh;
        let nq = grid.0 * grid.1;
        let mut out = vec![0f64; nq * c];
        for t in 0..nq {
            let rx = ((t % grid.1) as f64 + 0.5) / grid.1 as f64;
            let ry = ((t / grid.1) as f64 + 0.5) / grid.0 as f64;
            for m in 0..nh {
                let mut start = 0;
                for (l, &(h, w)) in levels.iter().enumerate() {
                    for p in 0..np {
                        let k = t * nh * nl * np + (m * nl + l) * np + p;
                        let gx = 2.0 * (rx + off[2 * k] as f64 / w as f64) - 1.0;
                        let gy = 2.0 * (ry + off[2 * k + 1] as f64 / h as f64) - 1.0;
                        // grid_sample unnormalisation, align_corners=False.
                        let x = ((gx + 1.0) * w as f64 - 1.0) / 2.0;
                        let y = ((gy + 1.0) * h as f64 - 1.0) / 2.0;
                        for py in 0..h {
                            for px in 0..w {
                                let tw = (1.0 - (x - px as f64).abs()).max(0.0)
                                    * (1.0 - (y - py as f64).abs()).max(0.0);
                                for dd in 0..d {
                                    out[t * c + m * d + dd] += wts[k] as f64
                                        * tw
                                        * value[(start + py * w + px) * c + m * d + dd] as f64;
                                }
                            }
                        }
                    }
                    start += h * w;
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn msda_matches_naive_multi_level() {
        let mut rng = Rng::new(7);
        let levels = [(3, 3), (3, 3), (2, 5)];
        let (nh, np, c) = (2, 3, 6);
        let grid = (3, 3);
        let nv: usize = levels.iter().map(|(h, w)| h * w).sum();
        let nq = 9;
        let per_q = nh * levels.len() * np;
        let value = rng.vec(nv * c, 1.0);
        let off = rng.vec(nq * per_q * 2, 3.0);
        let mut wts = rng.vec(nq * per_q, 2.0);
        wts.chunks_mut(levels.len() * np).for_each(softmax_in_place);
        let mut out = vec![0f32; nq * c];
        msda_core(&value, c, &levels, &off, &wts, grid, nh, np, &mut out);
        let want = msda_naive(&value, c, &levels, &off, &wts, grid, nh, np);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Through the backend op.
        let b = CpuBackend;
        let t = |v: &[f32], r, c| mat(v.to_vec(), r, c).unwrap();
        let got = b
            .msda(
                &t(&value, nv, c),
                &levels,
                &t(&off, nq, per_q * 2),
                &t(&wts, nq, per_q),
                grid,
                nh,
                np,
            )
            .unwrap();
        assert_eq!(with_f32(&got, |s| s.to_vec()).unwrap(), out);
    }

    #[test]
    fn norms_match_formulas() {
        let mut rng = Rng::new(3);
        let (r, c) = (5, 37);
        let x = rng.vec(r * c, 3.0);
        let w = rng.vec(c, 1.0);
        let bias = rng.vec(c, 1.0);
        let b = CpuBackend;
        let xt = mat(x.clone(), r, c).unwrap();
        let wt = mat(w.clone(), 1, c).unwrap();
        let bt = mat(bias.clone(), 1, c).unwrap();
        let ln = with_f32(&b.layer_norm(&xt, &wt, &bt, 1e-5).unwrap(), |s| s.to_vec()).unwrap();
        let rms = with_f32(&b.rms_norm(&xt, &wt, 1e-6).unwrap(), |s| s.to_vec()).unwrap();
        for i in 0..r {
            let row: Vec<f64> = x[i * c..(i + 1) * c].iter().map(|&v| v as f64).collect();
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
            let ms = row.iter().map(|v| v * v).sum::<f64>() / c as f64;
            for j in 0..c {
                let want = (row[j] - mean) / (var + 1e-5).sqrt() * w[j] as f64 + bias[j] as f64;
                assert!((ln[i * c + j] as f64 - want).abs() < 1e-5);
                let want = row[j] / (ms + 1e-6).sqrt() * w[j] as f64;
                assert!((rms[i * c + j] as f64 - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn activations_and_softmax() {
        let b = CpuBackend;
        let x = mat(vec![-3.0, -0.5, 0.0, 0.7, 2.0, 5.0], 2, 3).unwrap();
        let qg = with_f32(&b.quick_gelu(&x).unwrap(), |s| s.to_vec()).unwrap();
        let ge = with_f32(&b.gelu_erf(&x).unwrap(), |s| s.to_vec()).unwrap();
        for (i, v) in [-3.0f64, -0.5, 0.0, 0.7, 2.0, 5.0].into_iter().enumerate() {
            assert!((qg[i] as f64 - v / (1.0 + (-1.702 * v).exp())).abs() < 1e-6);
            // erf values from tables: 0.5*x*(1+erf(x/sqrt2)) = x * Phi(x).
            let phi = [
                0.0013498980316301,
                0.3085375387259869,
                0.5,
                0.758_036_347_776_927,
                0.9772498680518208,
                0.9999997133484281,
            ][i];
            assert!(
                (ge[i] as f64 - v * phi).abs() < 1e-6,
                "{} vs {}",
                ge[i],
                v * phi
            );
        }
        let s = with_f32(&b.softmax_groups(&x, 3).unwrap(), |s| s.to_vec()).unwrap();
        let e: Vec<f64> = [-3.0f64, -0.5, 0.0].iter().map(|v| v.exp()).collect();
        let z: f64 = e.iter().sum();
        for i in 0..3 {
            assert!((s[i] as f64 - e[i] / z).abs() < 1e-6);
        }
    }

    /// Interleaved rope on llama.cpp-permuted Q/K weights gives the same q.k scores as HF's
    /// rotate_half rope on the unpermuted weights.
    #[test]
    fn rope_interleaved_on_permuted_equals_rotate_half() {
        let mut rng = Rng::new(5);
        let (n, hidden, nh, nkv, hd) = (9, 16, 4, 2, 8);
        let theta = 10000f32;
        let x = rng.vec(n * hidden, 1.0);
        let wq = rng.vec(nh * hd * hidden, 0.5);
        let wk = rng.vec(nkv * hd * hidden, 0.5);
        // llama.cpp convert_hf_to_gguf permute: row h*hd + 2i + a <- row h*hd + a*hd/2 + i.
        let permute = |w: &[f32], heads: usize| {
            let mut o = vec![0f32; w.len()];
            for h in 0..heads {
                for i in 0..hd / 2 {
                    for a in 0..2 {
                        let dst = h * hd + 2 * i + a;
                        let src = h * hd + a * hd / 2 + i;
                        o[dst * hidden..(dst + 1) * hidden]
                            .copy_from_slice(&w[src * hidden..(src + 1) * hidden]);
                    }
                }
            }
            o
        };
        let matmul = |w: &[f32], rows: usize| -> Vec<f64> {
            let mut o = vec![0f64; n * rows];
            for t in 0..n {
                for r in 0..rows {
                    o[t * rows + r] = (0..hidden)
                        .map(|j| x[t * hidden + j] as f64 * w[r * hidden + j] as f64)
                        .sum();
                }
            }
            o
        };
        // HF: q_embed = q * cos + rotate_half(q) * sin, cos/sin = cat(freqs, freqs).
        let hf_rope = |q: &[f64], heads: usize| -> Vec<f64> {
            let mut o = vec![0f64; q.len()];
            for t in 0..n {
                for h in 0..heads {
                    let b = t * heads * hd + h * hd;
                    for j in 0..hd {
                        let i = j % (hd / 2);
                        let ang = t as f64 / (theta as f64).powf(2.0 * i as f64 / hd as f64);
                        let rot = if j < hd / 2 {
                            -q[b + j + hd / 2]
                        } else {
                            q[b + j - hd / 2]
                        };
                        o[b + j] = q[b + j] * ang.cos() + rot * ang.sin();
                    }
                }
            }
            o
        };
        let q_hf = hf_rope(&matmul(&wq, nh * hd), nh);
        let k_hf = hf_rope(&matmul(&wk, nkv * hd), nkv);

        let be = CpuBackend;
        let xt = mat(x.clone(), n, hidden).unwrap();
        let wqp = mat(permute(&wq, nh), nh * hd, hidden).unwrap();
        let wkp = mat(permute(&wk, nkv), nkv * hd, hidden).unwrap();
        let q = be
            .rope_interleaved(&be.linear(&xt, &wqp, None).unwrap(), nh, 0, theta)
            .unwrap();
        let k = be
            .rope_interleaved(&be.linear(&xt, &wkp, None).unwrap(), nkv, 0, theta)
            .unwrap();
        let q = with_f32(&q, |s| s.to_vec()).unwrap();
        let k = with_f32(&k, |s| s.to_vec()).unwrap();
        for h in 0..nh {
            let g = h / (nh / nkv);
            for i in 0..n {
                for j in 0..n {
                    let s_hf: f64 = (0..hd)
                        .map(|d| q_hf[i * nh * hd + h * hd + d] * k_hf[j * nkv * hd + g * hd + d])
                        .sum();
                    let s: f64 = (0..hd)
                        .map(|d| {
                            q[i * nh * hd + h * hd + d] as f64 * k[j * nkv * hd + g * hd + d] as f64
                        })
                        .sum();
                    assert!(
                        (s - s_hf).abs() < 1e-4 * (1.0 + s_hf.abs()),
                        "h{h} {i},{j}: {s} vs {s_hf}"
                    );
                }
            }
        }
        // And the rotated vectors themselves are the permutation of HF's.
        for t in 0..n {
            for h in 0..nh {
                for i in 0..hd / 2 {
                    for a in 0..2 {
                        let ours = q[t * nh * hd + h * hd + 2 * i + a] as f64;
                        let hf = q_hf[t * nh * hd + h * hd + a * hd / 2 + i];
                        assert!((ours - hf).abs() < 1e-5, "{ours} vs {hf}");
                    }
                }
            }
        }
        // The rotate_half form on the rows as HF stores them (no permutation) is HF's rope, its
        // pair i (HF columns i and i + hd/2) written at columns 2i, 2i+1 of the head.
        for (w, heads, want) in [(&wq, nh, &q_hf), (&wk, nkv, &k_hf)] {
            let w = mat(w.clone(), heads * hd, hidden).unwrap();
            let r = be
                .rope_neox(&be.linear(&xt, &w, None).unwrap(), heads, 0, theta)
                .unwrap();
            let r = with_f32(&r, |s| s.to_vec()).unwrap();
            for t in 0..n {
                for h in 0..heads {
                    for i in 0..hd / 2 {
                        for a in 0..2 {
                            let ours = r[t * heads * hd + h * hd + 2 * i + a] as f64;
                            let hf = want[t * heads * hd + h * hd + a * hd / 2 + i];
                            assert!(
                                (ours - hf).abs() < 1e-5,
                                "t{t} h{h} {i}/{a}: {ours} vs {hf}"
                            );
                        }
                    }
                }
            }
        }
    }
}

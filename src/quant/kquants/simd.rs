//! The K-quant scale searches (`math::make_qkx2_quants`, `math::make_qx_quants`) run on
//! several sub-blocks at once: one SIMD lane per sub-block (structure of arrays), so every lane
//! performs exactly the scalar sequence of f32 operations of its sub-block — the same sums in
//! the same index order, the same `(w*l)*l` products, ggml's `nearest_int` bit trick, the same
//! strict comparisons — with per-lane selects in place of branches. No FMA is ever used, so
//! the results are bit-identical to the scalar reference (and to ggml's x86-64 build). One
//! shortcut, value for value: in the Q4_K/Q5_K search passes, where a cheap bound shows every
//! lane's `iscale * (x - min)` is far inside the range where ggml's bit trick equals rounding to
//! nearest even (`short_road`), the levels are rounded and clamped as floats (3 ops, not 6).
//!
//! Lanes whose scalar code would return early (a flat sub-block in `make_qkx2_quants`, an
//! all-below-`GROUP_MAX_EPS` one in `make_qx_quants`) run the search on garbage (inf/NaN,
//! harmless: lanes never mix) and are overridden by a final select.
//!
//! Instead of copying the level array whenever a lane finds a better fit, the kernels keep the
//! inputs that produced the best levels (the inverse scale and, for Q4_K/Q5_K, the `min` used
//! in that pass); the caller recomputes those levels only where it needs them (a sub-block
//! whose stored scale is zero), with the same formula, hence the same levels.
//!
//! Q4_K/Q5_K: the 8 sub-blocks of one super-block are the 8 lanes of an AVX2 vector (two
//! super-blocks: two AVX2 vectors, or one AVX-512 vector).
//! Q6_K: the 16 sub-blocks are the 16 lanes of an AVX-512 vector, or two AVX2 vectors.

#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// ggml's `nearest_int` magic (1.5 * 2^23).
const MAGIC: f32 = 12582912.0;

/// An f32 vector with the handful of lane-wise operations the searches need. Every method is
/// the exact IEEE operation of its scalar counterpart (add/sub/mul/div/sqrt are correctly
/// rounded in both; abs and neg flip or clear the sign bit; comparisons are ordered and quiet,
/// i.e. false on NaN, like Rust's `<`, `>`, `==`).
///
/// Safety: the methods use instructions of the implementing type's ISA; they may only run
/// where that ISA is available (the kernels are called from `#[target_feature]` functions
/// after run-time detection). They are `#[inline(always)]` so that they are compiled inside
/// those functions.
pub(super) trait Vf: Copy {
    type M: Copy;
    /// Lanes.
    const N: usize;
    unsafe fn splat(v: f32) -> Self;
    /// Stores `N` values to `p` (no alignment needed).
    unsafe fn store(self, p: *mut f32);
    /// Lane k = `*p.add(k * stride)`.
    unsafe fn gather(p: *const f32, stride: i32) -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    unsafe fn sqrt(self) -> Self;
    /// `f32::abs`: clears the sign bit.
    unsafe fn abs(self) -> Self;
    /// Unary minus: flips the sign bit (not `0 - x`, which differs for zeros).
    unsafe fn neg(self) -> Self;
    /// `self < o` (false where either is NaN).
    unsafe fn lt(self, o: Self) -> Self::M;
    /// `self > o` (false where either is NaN).
    unsafe fn gt(self, o: Self) -> Self::M;
    /// `self == o` (false where either is NaN).
    unsafe fn eq(self, o: Self) -> Self::M;
    unsafe fn and(a: Self::M, b: Self::M) -> Self::M;
    /// Per lane `if m { a } else { b }`.
    unsafe fn select(m: Self::M, a: Self, b: Self) -> Self;
    /// Bit k set where lane k of `m` is true.
    unsafe fn bits(m: Self::M) -> u32;
    /// `nearest_int(self).clamp(lo, hi) as f32` (ggml's bit trick, then an exact conversion).
    unsafe fn level(self, lo: i32, hi: i32) -> Self;
    /// [`level`](Vf::level) with `lo` = 0, in three float ops (round to nearest even, max, min)
    /// instead of six. Equal to it wherever |self| <= 2^22 - 1 (the bit trick is exact there:
    /// self + 1.5·2^23 stays below 2^24; a -0 rounds to -0 and `max(-0, +0)` gives the second
    /// operand, +0). The caller checks a narrower range, 2^21 (`short_road`).
    unsafe fn level0_in_range(self, hi: f32) -> Self;
}

#[derive(Clone, Copy)]
pub(super) struct F32x8(__m256);

impl Vf for F32x8 {
    type M = __m256;
    const N: usize = 8;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        F32x8(_mm256_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self.0)
    }
    #[inline(always)]
    unsafe fn gather(p: *const f32, stride: i32) -> Self {
        let idx = _mm256_mullo_epi32(
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            _mm256_set1_epi32(stride),
        );
        F32x8(_mm256_i32gather_ps::<4>(p, idx))
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        F32x8(_mm256_add_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        F32x8(_mm256_sub_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        F32x8(_mm256_mul_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        F32x8(_mm256_div_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn sqrt(self) -> Self {
        F32x8(_mm256_sqrt_ps(self.0))
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        F32x8(_mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0))
    }
    #[inline(always)]
    unsafe fn neg(self) -> Self {
        F32x8(_mm256_xor_ps(_mm256_set1_ps(-0.0), self.0))
    }
    #[inline(always)]
    unsafe fn lt(self, o: Self) -> __m256 {
        _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, o.0)
    }
    #[inline(always)]
    unsafe fn gt(self, o: Self) -> __m256 {
        _mm256_cmp_ps::<_CMP_GT_OQ>(self.0, o.0)
    }
    #[inline(always)]
    unsafe fn eq(self, o: Self) -> __m256 {
        _mm256_cmp_ps::<_CMP_EQ_OQ>(self.0, o.0)
    }
    #[inline(always)]
    unsafe fn and(a: __m256, b: __m256) -> __m256 {
        _mm256_and_ps(a, b)
    }
    #[inline(always)]
    unsafe fn select(m: __m256, a: Self, b: Self) -> Self {
        F32x8(_mm256_blendv_ps(b.0, a.0, m))
    }
    #[inline(always)]
    unsafe fn bits(m: __m256) -> u32 {
        _mm256_movemask_ps(m) as u32
    }
    #[inline(always)]
    unsafe fn level(self, lo: i32, hi: i32) -> Self {
        let v = _mm256_castps_si256(_mm256_add_ps(self.0, _mm256_set1_ps(MAGIC)));
        let i = _mm256_sub_epi32(
            _mm256_and_si256(v, _mm256_set1_epi32(0x007f_ffff)),
            _mm256_set1_epi32(0x0040_0000),
        );
        let i = _mm256_min_epi32(
            _mm256_max_epi32(i, _mm256_set1_epi32(lo)),
            _mm256_set1_epi32(hi),
        );
        F32x8(_mm256_cvtepi32_ps(i))
    }
    #[inline(always)]
    unsafe fn level0_in_range(self, hi: f32) -> Self {
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0);
        F32x8(_mm256_min_ps(
            _mm256_max_ps(r, _mm256_setzero_ps()),
            _mm256_set1_ps(hi),
        ))
    }
}

/// Two AVX2 vectors as one of 16 lanes: lanes 0..8 in the first, 8..16 in the second. Each
/// operation is done on both halves, which gives the out-of-order core two independent chains
/// (the searches' sums are serial per lane, so one 8-lane chain leaves the adders mostly idle).
#[derive(Clone, Copy)]
pub(super) struct F32x8x2(F32x8, F32x8);

impl Vf for F32x8x2 {
    type M = (__m256, __m256);
    const N: usize = 16;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        F32x8x2(F32x8::splat(v), F32x8::splat(v))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        self.0.store(p);
        self.1.store(p.add(8));
    }
    #[inline(always)]
    unsafe fn gather(p: *const f32, stride: i32) -> Self {
        F32x8x2(
            F32x8::gather(p, stride),
            F32x8::gather(p.offset(8 * stride as isize), stride),
        )
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        F32x8x2(self.0.add(o.0), self.1.add(o.1))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        F32x8x2(self.0.sub(o.0), self.1.sub(o.1))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        F32x8x2(self.0.mul(o.0), self.1.mul(o.1))
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        F32x8x2(self.0.div(o.0), self.1.div(o.1))
    }
    #[inline(always)]
    unsafe fn sqrt(self) -> Self {
        F32x8x2(self.0.sqrt(), self.1.sqrt())
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        F32x8x2(self.0.abs(), self.1.abs())
    }
    #[inline(always)]
    unsafe fn neg(self) -> Self {
        F32x8x2(self.0.neg(), self.1.neg())
    }
    #[inline(always)]
    unsafe fn lt(self, o: Self) -> Self::M {
        (self.0.lt(o.0), self.1.lt(o.1))
    }
    #[inline(always)]
    unsafe fn gt(self, o: Self) -> Self::M {
        (self.0.gt(o.0), self.1.gt(o.1))
    }
    #[inline(always)]
    unsafe fn eq(self, o: Self) -> Self::M {
        (self.0.eq(o.0), self.1.eq(o.1))
    }
    #[inline(always)]
    unsafe fn and(a: Self::M, b: Self::M) -> Self::M {
        (F32x8::and(a.0, b.0), F32x8::and(a.1, b.1))
    }
    #[inline(always)]
    unsafe fn select(m: Self::M, a: Self, b: Self) -> Self {
        F32x8x2(F32x8::select(m.0, a.0, b.0), F32x8::select(m.1, a.1, b.1))
    }
    #[inline(always)]
    unsafe fn bits(m: Self::M) -> u32 {
        F32x8::bits(m.0) | F32x8::bits(m.1) << 8
    }
    #[inline(always)]
    unsafe fn level(self, lo: i32, hi: i32) -> Self {
        F32x8x2(self.0.level(lo, hi), self.1.level(lo, hi))
    }
    #[inline(always)]
    unsafe fn level0_in_range(self, hi: f32) -> Self {
        F32x8x2(self.0.level0_in_range(hi), self.1.level0_in_range(hi))
    }
}

#[derive(Clone, Copy)]
pub(super) struct F32x16(__m512);

impl Vf for F32x16 {
    type M = __mmask16;
    const N: usize = 16;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        F32x16(_mm512_set1_ps(v))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self.0)
    }
    #[inline(always)]
    unsafe fn gather(p: *const f32, stride: i32) -> Self {
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(stride),
        );
        F32x16(_mm512_i32gather_ps::<4>(idx, p))
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        F32x16(_mm512_add_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        F32x16(_mm512_sub_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        F32x16(_mm512_mul_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        F32x16(_mm512_div_ps(self.0, o.0))
    }
    #[inline(always)]
    unsafe fn sqrt(self) -> Self {
        F32x16(_mm512_sqrt_ps(self.0))
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        F32x16(_mm512_castsi512_ps(_mm512_and_si512(
            _mm512_castps_si512(self.0),
            _mm512_set1_epi32(0x7fff_ffff),
        )))
    }
    #[inline(always)]
    unsafe fn neg(self) -> Self {
        F32x16(_mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(self.0),
            _mm512_set1_epi32(i32::MIN),
        )))
    }
    #[inline(always)]
    unsafe fn lt(self, o: Self) -> __mmask16 {
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, o.0)
    }
    #[inline(always)]
    unsafe fn gt(self, o: Self) -> __mmask16 {
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, o.0)
    }
    #[inline(always)]
    unsafe fn eq(self, o: Self) -> __mmask16 {
        _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(self.0, o.0)
    }
    #[inline(always)]
    unsafe fn and(a: __mmask16, b: __mmask16) -> __mmask16 {
        a & b
    }
    #[inline(always)]
    unsafe fn select(m: __mmask16, a: Self, b: Self) -> Self {
        F32x16(_mm512_mask_blend_ps(m, b.0, a.0))
    }
    #[inline(always)]
    unsafe fn bits(m: __mmask16) -> u32 {
        m as u32
    }
    #[inline(always)]
    unsafe fn level(self, lo: i32, hi: i32) -> Self {
        let v = _mm512_castps_si512(_mm512_add_ps(self.0, _mm512_set1_ps(MAGIC)));
        let i = _mm512_sub_epi32(
            _mm512_and_si512(v, _mm512_set1_epi32(0x007f_ffff)),
            _mm512_set1_epi32(0x0040_0000),
        );
        let i = _mm512_min_epi32(
            _mm512_max_epi32(i, _mm512_set1_epi32(lo)),
            _mm512_set1_epi32(hi),
        );
        F32x16(_mm512_cvtepi32_ps(i))
    }
    #[inline(always)]
    unsafe fn level0_in_range(self, hi: f32) -> Self {
        // roundscale with imm 0: round to nearest even, keep no fraction bits.
        let r = _mm512_roundscale_ps::<0>(self.0);
        F32x16(_mm512_min_ps(
            _mm512_max_ps(r, _mm512_setzero_ps()),
            _mm512_set1_ps(hi),
        ))
    }
}

/// Per-sub-block results of the Q4_K/Q5_K search (`make_qkx2_quants` plus the weights), for one
/// super-block (lanes 0..8) or two (lanes 8..16: the second).
#[derive(Clone, Copy, Default)]
pub(super) struct Qkx2Lanes {
    /// The fitted scale (0 for a flat sub-block).
    pub scale: [f32; 16],
    /// `-min` of the fit (what `ScaleMin::min` holds).
    pub min: [f32; 16],
    /// The best levels are `nearest_int(iscale * (x - min_used)).clamp(0, nmax)` ...
    pub iscale: [f32; 16],
    pub min_used: [f32; 16],
    /// ... except in flat sub-blocks (bit j set: `max == min`), whose levels are all 0.
    pub flat: u32,
}

/// Whether every lane's `iscale * (x - min)`, for any x in `[xlo, max]`, is below 2^21 in
/// magnitude, so that `level0_in_range` equals `level(0, _)` there. An upper bound computed with
/// the same rounded operations (rounding is monotonic, so |fl(x - min)| <= fl(|max - min| +
/// |xlo - min|) and the product's bound follows); NaN or inf anywhere answers no.
#[inline(always)]
unsafe fn short_road<V: Vf>(iscale: V, max: V, min: V, xlo: V) -> bool {
    let reach = iscale.abs().mul(max.sub(min).abs().add(xlo.sub(min).abs()));
    V::bits(reach.lt(V::splat((1u32 << 21) as f32))) == (1u32 << V::N) - 1
}

/// Q4_K/Q5_K step (1) for the `V::N` sub-blocks of 32 values of `x` (one super-block per 8):
/// per lane, the RMS-based weights and `make_qkx2_quants` exactly as `math.rs` and
/// `kquants.rs` do them one sub-block at a time.
#[inline(always)]
unsafe fn qkx2_lanes<V: Vf>(x: &[f32], nmax: i32, rmin: f32, rdelta: f32, nstep: i32) -> Qkx2Lanes {
    assert!((V::N == 8 || V::N == 16) && x.len() == 32 * V::N);
    // Transpose: xt[i] lane j = x[32*j + i].
    let mut xt = [V::splat(0.0); 32];
    for (i, v) in xt.iter_mut().enumerate() {
        *v = V::gather(x.as_ptr().add(i), 32);
    }
    let zero = V::splat(0.0);
    // Weights: av_x = sqrt(sum x² / 32), w = av_x + |x|.
    let mut sum_x2 = zero;
    for v in &xt {
        sum_x2 = sum_x2.add(v.mul(*v));
    }
    let av_x = sum_x2.div(V::splat(32.0)).sqrt();
    let mut w = [zero; 32];
    for i in 0..32 {
        w[i] = av_x.add(xt[i].abs());
    }
    // make_qkx2_quants.
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w.mul(xt[0]);
    for i in 1..32 {
        min = V::select(xt[i].lt(min), xt[i], min);
        max = V::select(xt[i].gt(max), xt[i], max);
        sum_w = sum_w.add(w[i]);
        sum_x = sum_x.add(w[i].mul(xt[i]));
    }
    let xlo = min;
    min = V::select(min.gt(zero), zero, min);
    let flat = max.eq(min);
    let min0 = min;
    let nmax_f = nmax as f32;
    let mut iscale = V::splat(nmax_f).div(max.sub(min));
    let mut scale = V::splat(1.0).div(iscale);
    let mut best_iscale = iscale;
    let mut best_min_used = min;
    let mut best_error = zero;
    for i in 0..32 {
        let l = iscale.mul(xt[i].sub(min)).level(0, nmax);
        let diff = scale.mul(l).add(min).sub(xt[i]);
        best_error = best_error.add(w[i].mul(diff.mul(diff)));
    }
    let mut laux = [zero; 32];
    // C: iscale = (rmin + rdelta*is + nmax)/(max - min), with `min` as left by the previous
    // pass; both candidates for the next pass are divided out before this pass's error sum
    // decides between them (the division is off the critical path, the values are the same).
    let c_is = |is: i32| V::splat(rmin + rdelta * is as f32 + nmax_f);
    iscale = c_is(0).div(max.sub(min));
    // Where every lane's |iscale * (x - min)| is below 2^21 the levels take the short road
    // (`level0_in_range`). `reach` bounds it from above: x lies in [xlo, max], rounding is
    // monotonic, and a NaN or inf bound fails the test (elsewhere ggml's bit trick yields garbage
    // that only the trick itself reproduces).
    for is in 0..=nstep {
        let short = short_road(iscale, max, min, xlo);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
        // One loop body, compiled once per road (a macro: no call in the hot loop).
        macro_rules! pass {
            ($t:ident => $level:expr) => {
                for i in 0..32 {
                    let $t = iscale.mul(xt[i].sub(min));
                    let l = $level;
                    laux[i] = l;
                    let wl = w[i].mul(l);
                    sum_l = sum_l.add(wl);
                    sum_l2 = sum_l2.add(wl.mul(l));
                    sum_xl = sum_xl.add(wl.mul(xt[i]));
                }
            };
        }
        if short {
            pass!(t => t.level0_in_range(nmax_f));
        } else {
            pass!(t => t.level(0, nmax));
        }
        let d = sum_w.mul(sum_l2).sub(sum_l.mul(sum_l));
        let d_pos = d.gt(zero);
        let mut this_scale = sum_w.mul(sum_xl).sub(sum_x.mul(sum_l)).div(d);
        let mut this_min = sum_l2.mul(sum_x).sub(sum_l.mul(sum_xl)).div(d);
        let min_pos = this_min.gt(zero);
        this_min = V::select(min_pos, zero, this_min);
        this_scale = V::select(min_pos, sum_xl.div(sum_l2), this_scale);
        let c_next = c_is(is + 1);
        let iscale_keep = c_next.div(max.sub(min));
        let iscale_moved = c_next.div(max.sub(this_min));
        let mut cur_error = zero;
        for i in 0..32 {
            let diff = this_scale.mul(laux[i]).add(this_min).sub(xt[i]);
            cur_error = cur_error.add(w[i].mul(diff.mul(diff)));
        }
        let better = V::and(d_pos, cur_error.lt(best_error));
        best_error = V::select(better, cur_error, best_error);
        scale = V::select(better, this_scale, scale);
        best_iscale = V::select(better, iscale, best_iscale);
        best_min_used = V::select(better, min, best_min_used);
        min = V::select(better, this_min, min);
        iscale = V::select(better, iscale_moved, iscale_keep);
    }
    let mut out = Qkx2Lanes {
        flat: V::bits(flat),
        ..Default::default()
    };
    V::select(flat, zero, scale).store(out.scale.as_mut_ptr());
    V::select(flat, min0, min).neg().store(out.min.as_mut_ptr());
    best_iscale.store(out.iscale.as_mut_ptr());
    best_min_used.store(out.min_used.as_mut_ptr());
    out
}

/// [`qkx2_lanes`] with AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn qkx2_avx2(
    x: &[f32; 256],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> Qkx2Lanes {
    qkx2_lanes::<F32x8>(x, nmax, rmin, rdelta, nstep)
}

/// [`qkx2_lanes`] for two consecutive super-blocks at once (16 lanes in two AVX2 vectors).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn qkx2_pair_avx2(
    x: &[f32; 512],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> Qkx2Lanes {
    qkx2_lanes::<F32x8x2>(x, nmax, rmin, rdelta, nstep)
}

/// [`qkx2_lanes`] for two consecutive super-blocks at once (16 lanes in one AVX-512 vector).
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn qkx2_pair_avx512(
    x: &[f32; 512],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> Qkx2Lanes {
    qkx2_lanes::<F32x16>(x, nmax, rmin, rdelta, nstep)
}

/// Per-sub-block results of the Q6_K search (`make_qx_quants`, nmax 32).
#[derive(Clone, Copy, Default)]
pub(super) struct QxLanes {
    /// The fitted scale (0 for a sub-block whose max |x| is below GROUP_MAX_EPS).
    pub scale: [f32; 16],
    /// The best levels are `nearest_int(iscale * x).clamp(-32, 31) + 32` ...
    pub iscale: [f32; 16],
    /// ... except in the sub-blocks with bit j set (max |x| < GROUP_MAX_EPS): all 0.
    pub small: u32,
}

/// `make_qx_quants(nmax = 32)` for `V::N` sub-blocks of 16 values: lane j reads
/// `x[16*j .. 16*j + 16]`; results go to lanes `at .. at + V::N` of `out`.
#[inline(always)]
unsafe fn qx_lanes<V: Vf>(x: &[f32], out: &mut QxLanes, at: usize) {
    const NMAX: i32 = 32;
    let n = V::N;
    assert!(x.len() >= 16 * n && at + n <= 16);
    // Transpose: xt[i] lane j = x[16*j + i].
    let mut xt = [V::splat(0.0); 16];
    for (i, v) in xt.iter_mut().enumerate() {
        *v = V::gather(x.as_ptr().add(i), 16);
    }
    let zero = V::splat(0.0);
    let mut max = zero;
    let mut amax = zero;
    for v in &xt {
        let ax = v.abs();
        let m = ax.gt(amax);
        amax = V::select(m, ax, amax);
        max = V::select(m, *v, max);
    }
    let small = amax.lt(V::splat(super::GROUP_MAX_EPS));
    // w = x*x; C's w*x*l and w*l*l are (w*x)*l and (w*l)*l.
    let mut w = [zero; 16];
    let mut wx = [zero; 16];
    for i in 0..16 {
        w[i] = xt[i].mul(xt[i]);
        wx[i] = w[i].mul(xt[i]);
    }
    let nmax_f = NMAX as f32;
    let iscale = V::splat(-nmax_f).div(max);
    let (mut sumlx, mut suml2) = (zero, zero);
    for i in 0..16 {
        let l = iscale.mul(xt[i]).level(-NMAX, NMAX - 1);
        sumlx = sumlx.add(wx[i].mul(l));
        suml2 = suml2.add(w[i].mul(l).mul(l));
    }
    // scale = suml2 != 0 ? sumlx/suml2 : 0  (NaN != 0 is true: the division branch)
    let mut scale = V::select(suml2.eq(zero), zero, sumlx.div(suml2));
    let mut best = scale.mul(sumlx);
    let mut best_iscale = iscale;
    // is = -9..=9 without 0. The passes are independent but for the running best, so two
    // run side by side (independent add chains) and are then applied in order.
    const STEPS: [i32; 18] = [
        -9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9,
    ];
    for pair in STEPS.chunks_exact(2) {
        let iscale_a = V::splat(-(nmax_f + 0.1 * pair[0] as f32)).div(max);
        let iscale_b = V::splat(-(nmax_f + 0.1 * pair[1] as f32)).div(max);
        let (mut sumlx_a, mut suml2_a, mut sumlx_b, mut suml2_b) = (zero, zero, zero, zero);
        for i in 0..16 {
            let la = iscale_a.mul(xt[i]).level(-NMAX, NMAX - 1);
            let lb = iscale_b.mul(xt[i]).level(-NMAX, NMAX - 1);
            sumlx_a = sumlx_a.add(wx[i].mul(la));
            suml2_a = suml2_a.add(w[i].mul(la).mul(la));
            sumlx_b = sumlx_b.add(wx[i].mul(lb));
            suml2_b = suml2_b.add(w[i].mul(lb).mul(lb));
        }
        for (iscale, sumlx, suml2) in [(iscale_a, sumlx_a, suml2_a), (iscale_b, sumlx_b, suml2_b)] {
            let better = V::and(suml2.gt(zero), sumlx.mul(sumlx).gt(best.mul(suml2)));
            let s = sumlx.div(suml2);
            scale = V::select(better, s, scale);
            best = V::select(better, s.mul(sumlx), best);
            best_iscale = V::select(better, iscale, best_iscale);
        }
    }
    V::select(small, zero, scale).store(out.scale.as_mut_ptr().add(at));
    best_iscale.store(out.iscale.as_mut_ptr().add(at));
    out.small |= V::bits(small) << at;
}

/// Q6_K step (1) for the 16 sub-blocks of `x` with two AVX2 vectors.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn qx_avx2(x: &[f32; 256]) -> QxLanes {
    let mut out = QxLanes::default();
    qx_lanes::<F32x8>(&x[..128], &mut out, 0);
    qx_lanes::<F32x8>(&x[128..], &mut out, 8);
    out
}

/// Q6_K step (1) for the 16 sub-blocks of `x` with one AVX-512 vector.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn qx_avx512(x: &[f32; 256]) -> QxLanes {
    let mut out = QxLanes::default();
    qx_lanes::<F32x16>(x, &mut out, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avx2() -> bool {
        let here = is_x86_feature_detected!("avx2");
        if !here {
            eprintln!("skipped: this CPU has no AVX2 (the lanes did not run)");
        }
        here
    }

    /// Deterministic values over every magnitude that matters: exact halves (the ties), near
    /// integers, signed zeros, subnormals, values near the 2^21 / 2^22 edges.
    fn probes() -> Vec<f32> {
        let mut v = vec![
            0.0, -0.0, 0.5, -0.5, 1.5, 2.5, -2.5, 14.5, 15.5, 16.5, 1e-40, -1e-40,
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let m = (state >> 40) as f32 / (1u64 << 24) as f32;
            let e = ((state >> 8) % 26) as i32 - 3; // 2^-3 .. 2^22
            let sign = if state & 1 == 0 { 1.0 } else { -1.0 };
            v.push(sign * m * 2f32.powi(e));
            v.push(sign * ((state >> 20) % 64) as f32 + 0.5 * sign);
        }
        v.extend([4194303.5, -4194303.5, 2097151.5, -2097152.0, 4194304.0]);
        v
    }

    fn lanes(f: impl Fn(F32x8) -> F32x8, x: &[f32; 8]) -> [f32; 8] {
        let mut out = [0f32; 8];
        // SAFETY: the callers checked AVX2.
        unsafe { f(F32x8(_mm256_loadu_ps(x.as_ptr()))).store(out.as_mut_ptr()) };
        out
    }

    /// The short road gives ggml's trick's bits for every |t| <= 2^22 - 1, and not beyond (why
    /// the search asks `short_road` first; 4194303.5 already parts them).
    #[test]
    fn short_level_equals_the_trick_in_range() {
        if !avx2() {
            return;
        }
        let v = probes();
        for hi in [15.0f32, 31.0] {
            for c in v.chunks_exact(8) {
                let x: [f32; 8] = c.try_into().unwrap();
                // SAFETY (both closures): AVX2 checked above.
                let short = lanes(|t| unsafe { t.level0_in_range(hi) }, &x);
                let trick = lanes(|t| unsafe { t.level(0, hi as i32) }, &x);
                for k in 0..8 {
                    if x[k].abs() <= 4194303.0 {
                        assert_eq!(short[k].to_bits(), trick[k].to_bits(), "t {} hi {hi}", x[k]);
                    }
                }
            }
        }
        let far = [
            f32::INFINITY,
            8388608.0,
            -1.6e8,
            4194303.5,
            1e30,
            3e7,
            5e6,
            7e6,
        ];
        // SAFETY (both closures): AVX2 checked above.
        let short = lanes(|t| unsafe { t.level0_in_range(15.0) }, &far);
        let trick = lanes(|t| unsafe { t.level(0, 15) }, &far);
        assert_ne!(short, trick, "out of range the roads part");
    }

    /// `short_road` never says yes where some x in [xlo, max] takes iscale * (x - min) to 2^21 or
    /// beyond (checked at both ends, at points between and at their float neighbours), and says
    /// no for NaN and inf.
    #[test]
    fn short_road_bound_holds() {
        if !avx2() {
            return;
        }
        let v = probes();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut pick = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            v[(state % v.len() as u64) as usize]
        };
        let (mut yes, mut no) = (0, 0);
        for _ in 0..20000 {
            // Per lane: (iscale, max, min, xlo), xlo <= max, min <= 0.
            let lanes: [[f32; 4]; 8] = std::array::from_fn(|_| {
                let (a, b) = (pick(), pick());
                let min = -pick().abs();
                [pick() / (1.0 + pick().abs()), a.max(b), min, a.min(b)]
            });
            // SAFETY: AVX2 checked above.
            let ok = unsafe {
                let ld = |j: usize| {
                    let v: [f32; 8] = std::array::from_fn(|k| lanes[k][j]);
                    F32x8(_mm256_loadu_ps(v.as_ptr()))
                };
                short_road(ld(0), ld(1), ld(2), ld(3))
            };
            if !ok {
                no += 1;
                continue;
            }
            yes += 1;
            for &[is, hi, m, lo] in &lanes {
                let mid = lo + (hi - lo) * 0.37;
                for x in [
                    lo,
                    hi,
                    mid,
                    f32::from_bits(lo.to_bits() ^ 1),
                    f32::from_bits(hi.to_bits() ^ 1),
                ] {
                    if !(lo..=hi).contains(&x) {
                        continue;
                    }
                    let f = is * (x - m);
                    assert!(f.abs() < 2097152.0, "iscale {is} x {x} min {m}: {f}");
                }
            }
        }
        assert!(
            yes > 100 && no > 100,
            "both answers exercised: {yes} yes, {no} no"
        );
        for bad in [f32::NAN, f32::INFINITY] {
            // SAFETY: AVX2 checked above.
            let ok = unsafe {
                short_road(
                    F32x8::splat(bad),
                    F32x8::splat(1.0),
                    F32x8::splat(0.0),
                    F32x8::splat(0.0),
                )
            };
            assert!(!ok, "{bad}");
        }
    }
}

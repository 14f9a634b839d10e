//! exp on f32 for the SiLU of LLaMA's feed-forward, eight lanes at a time. Written out because
//! libm's `expf` is one call per value (a 7B prefill makes a quarter of a billion of them here)
//! and no maintained crate gives a vector exp without a SIMD framework. The same operations run
//! on every instruction set (the scalar form with the same fused multiply-adds), so every ISA
//! gives every value the same bits.
//!
//! The method: exp in f64 lanes, then rounded to f32. n = round(x·log2 e), r = x - n·ln 2
//! (|r| <= ln 2 / 2), exp(r) by its Taylor polynomial of degree 8 (truncation under 2.1e-10),
//! times 2^n put in the exponent bits. Rounding that to f32 gives the correctly rounded exp
//! except within 2.1e-10 of a tie, as libm's expf: no less accurate than the call it replaces
//! (`tests::exp_is_correctly_rounded`). Out of f32's range: inf above, 0 or subnormal below.
use crate::quant::dot::Isa;

const LOG2E: f64 = std::f64::consts::LOG2_E;
const LN2: f64 = std::f64::consts::LN_2;
/// 1/8!, 1/7!, ..., 1/1!, 1/0!: exp(r) ≈ Σ r^k / k!, in Horner's order.
const TAYLOR: [f64; 9] = [
    1.0 / 40320.0,
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];
/// Beyond these, exp's f32 value is inf or 0 already; the clamp keeps 2^n a normal f64.
const X_MIN: f64 = -110.0;
const X_MAX: f64 = 90.0;

/// exp(x), the scalar form of the vector lanes (bit for bit).
#[inline]
pub fn exp(x: f32) -> f32 {
    // NaN stays NaN (a broken input must show, not turn into a weight).
    let x = (x as f64).clamp(X_MIN, X_MAX);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2, x);
    let mut p = TAYLOR[0];
    for &c in &TAYLOR[1..] {
        p = p.mul_add(r, c);
    }
    (p * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

/// out[i] = silu(g[i]) · u[i] = g / (1 + exp(-g)) · u: LLaMA's gated feed-forward.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(g.len() == out.len() && u.len() == out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if Isa::current().vector() {
        // SAFETY: AVX2 and FMA detected (Isa::vector); the loop stays inside the slices.
        done = unsafe { avx2::silu_mul(g, u, out) };
    }
    for ((o, &g), &u) in out[done..].iter_mut().zip(&g[done..]).zip(&u[done..]) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{LN2, LOG2E, TAYLOR, X_MAX, X_MIN};
    use std::arch::x86_64::*;

    /// `super::exp` on 4 f64 lanes: the same operations in the same order.
    #[inline(always)]
    unsafe fn exp4(x: __m256d) -> __m256d {
        // maxpd / minpd return their second operand when one is NaN: NaN stays NaN.
        let x = _mm256_min_pd(
            _mm256_set1_pd(X_MAX),
            _mm256_max_pd(_mm256_set1_pd(X_MIN), x),
        );
        let n = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_pd(x, _mm256_set1_pd(LOG2E)),
        );
        let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(LN2), x);
        let mut p = _mm256_set1_pd(TAYLOR[0]);
        for &c in &TAYLOR[1..] {
            p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c));
        }
        // n as an i64 without AVX-512: n + 1.5·2^52 holds n in its low mantissa bits.
        let magic = _mm256_set1_pd(6755399441055744.0);
        let ni = _mm256_sub_epi64(
            _mm256_castpd_si256(_mm256_add_pd(n, magic)),
            _mm256_castpd_si256(magic),
        );
        let e = _mm256_slli_epi64::<52>(_mm256_add_epi64(ni, _mm256_set1_epi64x(1023)));
        _mm256_mul_pd(p, _mm256_castsi256_pd(e))
    }

    /// `super::exp` on 8 f32 lanes (as two halves of f64 lanes).
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let lo = exp4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        let hi = exp4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
        _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo))
    }

    /// `super::silu_mul` on the whole groups of 8; returns how many values it did.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
        let whole = out.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            let o = _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), o);
        }
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values across the range and its edges (clamped ends, zero, ties of the rounding).
    fn samples() -> Vec<f32> {
        let mut v: Vec<f32> = (0..200_001).map(|i| -100.0 + i as f32 * 1e-3).collect();
        v.extend([
            0.0, -0.0, 1e-30, -1e-30, 87.9, -86.9, 88.0, -87.0, 1e6, -1e6,
        ]);
        v.extend((0..64).map(|i| (i as f32 - 32.0) * std::f32::consts::LN_2 / 2.0));
        v
    }

    /// Against f64's exp rounded to f32 (correctly rounded but for f64's own last bits): within
    /// half an f32 ulp everywhere, and the same f32 for nearly every value; inf above f32's
    /// range, 0 below it.
    #[test]
    fn exp_is_correctly_rounded() {
        let (mut worst, mut same, mut all) = (0f64, 0usize, 0usize);
        for x in samples().into_iter().filter(|x| (-87.0..=88.0).contains(x)) {
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
            same += usize::from(exp(x) == want as f32);
            all += 1;
        }
        assert!(
            worst <= 0.5f64.powi(24) * 1.001,
            "worst relative error {worst:e}"
        );
        assert!(
            same as f64 >= 0.999 * all as f64,
            "{same} of {all} correctly rounded"
        );
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(-1e6), 0.0);
        assert_eq!(exp(1e6), f32::INFINITY);
        assert!(
            exp(-100.0) > 0.0 && exp(-100.0) < f32::MIN_POSITIVE,
            "subnormal"
        );
    }

    /// Every ISA here gives the scalar form's bits, including the values past the last group of
    /// 8; NaN stays NaN through SiLU.
    #[test]
    fn vector_lanes_equal_scalar() {
        let x = samples();
        let u: Vec<f32> = x.iter().map(|v| 0.5 - v * 0.01).collect();
        let mut out = vec![0f32; x.len()];
        silu_mul(&x, &u, &mut out);
        for ((&g, &u), &o) in x.iter().zip(&u).zip(&out) {
            assert_eq!(
                o.to_bits(),
                (g / (1.0 + exp(-g)) * u).to_bits(),
                "silu at {g}"
            );
        }
        let mut o = [0f32; 9];
        silu_mul(&[f32::NAN; 9], &[1.0; 9], &mut o);
        assert!(o.iter().all(|v| v.is_nan()));
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn silu_matches_f64() {
        let x = samples();
        let u = vec![1.0f32; x.len()];
        let mut out = vec![0f32; x.len()];
        silu_mul(&x, &u, &mut out);
        for (&g, &o) in x.iter().zip(&out) {
            let want = g as f64 / (1.0 + (-(g as f64)).exp());
            let err = (o as f64 - want).abs();
            assert!(
                err <= 3e-7 * want.abs().max(1e-30),
                "silu({g}) = {o}, want {want}"
            );
        }
    }
}

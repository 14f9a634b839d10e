//! exp on f32 for the element-wise ops of a forward (SiLU of the feed-forward's gate, softmax of
//! attention scores), eight lanes at a time. Written out because libm's `expf` is one call per
//! value (a 7B prefill makes half a billion of them) and no maintained crate gives a vector exp
//! without a SIMD framework. The same polynomial runs on every instruction set (the scalar form
//! with the same fused multiply-adds), so every ISA gives every value the same bits.
//!
//! The method (Cephes' `expf`): n = round(x·log2 e), r = x - n·ln 2 in two parts (so r is nearly
//! exact), exp(r) by a degree-7 polynomial on |r| <= ln 2 / 2, times 2^n put in the exponent
//! bits. Inputs are clamped to [-87, 88] (2^n stays a normal f32: no infinities, no
//! subnormals); relative error under 2.5e-7 (`tests::exp_is_accurate`).
use crate::quant::dot::Isa;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI with few enough bits that n·LN2_HI is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// exp(r) ≈ 1 + r + r²·(P[0]·r⁵ + ... + P[5]).
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
const X_MIN: f32 = -87.0;
const X_MAX: f32 = 88.0;

/// exp(x), the scalar form of the vector lanes (bit for bit).
#[inline]
pub fn exp(x: f32) -> f32 {
    // NaN stays NaN (a broken input must show, not turn into a weight).
    let x = x.clamp(X_MIN, X_MAX);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = P[0];
    for &c in &P[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
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

/// v[i] = exp(v[i] - shift) (a softmax's numerators, `shift` its row's largest value).
pub fn exp_shifted(v: &mut [f32], shift: f32) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if Isa::current().vector() {
        // SAFETY: as in `silu_mul`.
        done = unsafe { avx2::exp_shifted(v, shift) };
    }
    for a in &mut v[done..] {
        *a = exp(*a - shift);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{LN2_HI, LN2_LO, LOG2E, P, X_MAX, X_MIN};
    use std::arch::x86_64::*;

    /// `super::exp` on 8 lanes: the same operations in the same order.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        // maxps / minps return their second operand when one is NaN: NaN stays NaN.
        let x = _mm256_min_ps(
            _mm256_set1_ps(X_MAX),
            _mm256_max_ps(_mm256_set1_ps(X_MIN), x),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
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

    /// `super::exp_shifted` on the whole groups of 8; returns how many values it did.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(v: &mut [f32], shift: f32) -> usize {
        let whole = v.len() / 8 * 8;
        let s = _mm256_set1_ps(shift);
        for i in (0..whole).step_by(8) {
            let p = v.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, exp8(_mm256_sub_ps(_mm256_loadu_ps(p), s)));
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

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for x in samples()
            .into_iter()
            .filter(|x| (X_MIN..=X_MAX).contains(x))
        {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        // Outside the range: the ends' values, finite and non-zero.
        assert_eq!(exp(1e6), exp(X_MAX));
        assert_eq!(exp(-1e6), exp(X_MIN));
        assert!(exp(X_MAX).is_finite() && exp(X_MIN) > 0.0);
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
        let mut v = x.clone();
        exp_shifted(&mut v, 3.0);
        for (&a, &e) in x.iter().zip(&v) {
            assert_eq!(e.to_bits(), exp(a - 3.0).to_bits(), "exp at {a}");
        }
        let mut o = [0f32; 9];
        silu_mul(&[f32::NAN; 9], &[1.0; 9], &mut o);
        assert!(o.iter().all(|v| v.is_nan()));
        let mut v = [f32::NAN; 9];
        exp_shifted(&mut v, 0.0);
        assert!(v.iter().all(|v| v.is_nan()), "exp of NaN: {v:?}");
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
            if g >= X_MIN {
                assert!(
                    err <= 1e-6 * want.abs().max(1e-30),
                    "silu({g}) = {o}, want {want}"
                );
            } else {
                // exp(-g) clamped at exp(88): silu is g / 1.6e38 where it is smaller still.
                assert!(o <= 0.0 && err <= 1e-38 * g.abs() as f64, "silu({g}) = {o}");
            }
        }
    }
}

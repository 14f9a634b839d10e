//! The small numeric kernels shared by the block formats (ggml/src/ggml-quants.c).
//!
//! Byte parity rules that every function here keeps:
//! - f32 throughout, sums accumulated one element at a time in index order (Rust never
//!   reassociates or contracts float ops, matching ggml-base built without `-march`/FMA);
//! - products are written in C's evaluation order: `w*l*l` in C is `(w*l)*l`, which rounds
//!   differently from `w*(l*l)`, and those last bits decide close comparisons below;
//! - every comparison keeps C's strictness (`<` vs `<=`) so ties resolve the same way.

use half::f16;

/// ggml's `GROUP_MAX_EPS`: a group whose largest |x| is below this is stored as all zeros.
pub const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: add 1.5·2^23 so the integer lands in the low mantissa bits, which
/// rounds half to EVEN (IEEE default rounding) — unlike `f32::round` (half away from zero).
/// ggml asserts |f| <= 4194303 in debug builds only; outside that range the bit trick yields
/// the same garbage in both implementations.
#[inline(always)]
pub fn nearest_int(f: f32) -> i32 {
    let val = f + 12582912.0;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// C `roundf` (half away from zero) for |f| < 2^31, without the libm call `f32::round` makes on
/// x86-64's baseline (no SSE4.1): the truncation `f as i32` and the fraction `f - t` are exact, so
/// stepping away from zero when |fraction| >= 1/2 gives roundf's integer; plain arithmetic,
/// which the compiler vectorises.
#[inline(always)]
pub fn round_away(f: f32) -> i32 {
    let t = f as i32;
    let frac = f - t as f32;
    t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

/// fp32 -> fp16 bits, round to nearest even (ggml's `GGML_FP32_TO_FP16`).
#[inline(always)]
pub fn fp16(v: f32) -> f16 {
    f16::from_f32(v)
}

/// Result of [`make_qkx2_quants`]: the scale and the (non-negative) offset subtracted on dequant.
#[derive(Clone, Copy, Debug)]
pub struct ScaleMin {
    pub scale: f32,
    /// `-min` of the fit (>= 0, may be -0.0): dequant is `scale*q - min`.
    pub min: f32,
}

/// ggml's `make_qkx2_quants` with `use_mad = false` (squared error): fit `x ≈ scale*L + min`
/// with `L` in `0..=nmax`, weighted by `w`, by trying `nstep+1` candidate inverse scales
/// `(rmin + rdelta*is + nmax)/(max-min)` and keeping the weighted-least-squares (scale, min)
/// of the best quantization. `L` receives the levels; `laux` is scratch of the same length.
/// Used by Q4_K (nmax 15, rmin -1, rdelta 0.1, nstep 20) and Q5_K (31, -0.5, 0.1, 15).
/// (Fixed-size arrays let the compiler drop bounds checks: this is the hot loop of Q4_K/Q5_K.)
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn make_qkx2_quants<const N: usize>(
    nmax: i32,
    x: &[f32; N],
    w: &[f32; N],
    l_out: &mut [u8; N],
    laux: &mut [u8; N],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> ScaleMin {
    let n = N;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let wi = w[i];
        sum_w += wi;
        sum_x += wi * x[i];
    }
    // The offset only ever shifts values down (dequant subtracts a non-negative min).
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        return ScaleMin {
            scale: 0.0,
            min: -min,
        };
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let lf = l as f32;
            let wl = w[i] * lf;
            sum_l += wl;
            sum_l2 += wl * lf; // C: w*l*l == (w*l)*l
            sum_xl += wl * x[i]; // C: w*l*x[i] == (w*l)*x[i]
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    ScaleMin { scale, min: -min }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (the Q6_K path):
/// symmetric levels `L - nmax` in `-nmax..nmax-1`, weights `w = x²`; tries inverse scales
/// `-(nmax + 0.1*is)/max` for is in -9..=9 and keeps the one maximising `sumlx²/suml2`
/// (i.e. minimising weighted squared error with the least-squares scale). `max` is the
/// signed element of largest magnitude, so the largest value always maps to level `-nmax`.
/// Returns the scale; `l_out` gets `L = l + nmax` in `0..2*nmax`.
#[inline]
pub fn make_qx_quants<const N: usize>(nmax: i32, x: &[f32; N], l_out: &mut [u8; N]) -> f32 {
    let n = N;
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    // The weights w = x² and the products C writes `w*x[i]` are the same in every pass.
    let mut w = [0f32; N];
    let mut wx = [0f32; N];
    for i in 0..n {
        w[i] = x[i] * x[i];
        wx[i] = w[i] * x[i];
    }
    // One pass: (sumlx, suml2) for an inverse scale. C: w*x*l == (w*x)*l, w*l*l == (w*l)*l.
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for i in 0..n {
            let lf = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1) as f32;
            sumlx += wx[i] * lf;
            suml2 += w[i] * lf * lf;
        }
        (sumlx, suml2)
    };
    let mut best_iscale = -nmax_f / max;
    let (sumlx, suml2) = sums(best_iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax_f + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            best_iscale = iscale;
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    // The levels of the winning pass (C writes them as it goes; the values are the same).
    for i in 0..n {
        let l = nearest_int(best_iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as u8;
    }
    scale
}

/// ggml's `get_scale_min_k4`: the j-th 6-bit (scale, min) pair of the 12-byte K-quant
/// scales array. Pairs 0..3 sit in the low 6 bits of bytes 0..3 / 4..7; pairs 4..7 keep their
/// low nibbles in bytes 8..11 and their top 2 bits in the spare top bits of bytes 0..7.
#[inline(always)]
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Inverse of [`get_scale_min_k4`] for all 8 pairs (each value < 64).
pub fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            q[j] = ls[j];
            q[j + 4] = lm[j];
        } else {
            q[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            q[j - 4] |= (ls[j] >> 4) << 6;
            q[j] |= (lm[j] >> 4) << 6;
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// round_away is C roundf (Rust's f32::round) on every 61st f32 below 2^31 of either sign,
    /// and on each tie n + 1/2 and its two neighbours.
    #[test]
    fn round_away_is_roundf() {
        let below = 2f32.powi(31).to_bits();
        let ties = (0..300)
            .map(|n| n as f32 + 0.5)
            .flat_map(|t| [t.next_down(), t, t.next_up()]);
        let some = (0..below).step_by(61).map(f32::from_bits);
        for v in some
            .chain(ties)
            .chain([0.49999997, 0.5, 1.5, 2.5, 127.5, 126.99999])
        {
            for v in [v, -v] {
                assert_eq!(round_away(v), v.round() as i32, "{v:e}");
            }
        }
    }

    #[test]
    fn quant_nearest_int_is_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.0), 0);
        assert_eq!(nearest_int(3.49), 3);
        assert_eq!(nearest_int(-31.7), -32);
        for i in -1000..1000 {
            let f = i as f32 * 0.37;
            assert_eq!(nearest_int(f), f.round_ties_even() as i32, "{f}");
        }
    }

    #[test]
    fn quant_scale_min_k4_round_trip() {
        let ls = [0, 1, 63, 17, 32, 63, 5, 48];
        let lm = [63, 0, 2, 40, 63, 1, 33, 16];
        let q = pack_scale_min_k4(&ls, &lm);
        for j in 0..8 {
            assert_eq!(get_scale_min_k4(j, &q), (ls[j], lm[j]));
        }
    }
}

//! The 256-element K-quant super-blocks (ggml-common.h `block_q4_K`, `block_q5_K`,
//! `block_q6_K`), quantized as ggml's `quantize_row_q{4,5,6}_K_ref` (no imatrix).
//!
//! | format | layout (bytes)                                              | value                        |
//! |--------|-------------------------------------------------------------|------------------------------|
//! | Q4_K   | d:f16, dmin:f16, scales:[u8;12], qs:[u8;128]          = 144 | d*sc_j*q - dmin*m_j, q 0..16 |
//! | Q5_K   | d:f16, dmin:f16, scales:[u8;12], qh:[u8;32], qs:[u8;128] = 176 | same, q 0..32           |
//! | Q6_K   | ql:[u8;128], qh:[u8;64], scales:[i8;16], d:f16 (last!) = 210 | d*sc_j*(q - 32), q 0..64 |
//!
//! Q4_K/Q5_K: 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min (packed into 12 bytes,
//! see `math::get_scale_min_k4`). Q6_K: 16 sub-blocks of 16 with signed 8-bit scales.
//!
//! All three follow the same recipe: (1) fit every sub-block on its own (scale search in
//! `math`), (2) quantize the sub-block scales against the super-block's largest one and store
//! d/dmin as fp16, (3) requantize every value with the *stored* (rounded) scales — except
//! where a stored scale is zero: ggml then `continue`s and keeps the levels from step (1).
//!
//! Step (1) is nearly all the work (Q4_K: 22 passes over each sub-block). On x86-64 with AVX2
//! it runs with one sub-block per SIMD lane (`simd`), every lane doing exactly the scalar
//! sequence of f32 operations, so the bytes are the same; the scalar code in `math` stays the
//! reference and the fallback ([`Isa`]; `MMFUSER_QUANT_SCALAR=1` forces it).
//!
//! Bit packing (per 64 values for Q4_K/Q5_K, per 128 for Q6_K):
//! - Q4_K `qs`: chunk c (64 values) -> 32 bytes, low nibble = value c*64+l, high = c*64+32+l.
//! - Q5_K: same nibbles; `qh[l]` bit 2c = bit 4 of value c*64+l, bit 2c+1 = of value c*64+32+l.
//! - Q6_K: per half h (128 values, 64 `ql` bytes, 32 `qh` bytes): `ql[l]` = v[l] | v[l+64]<<4,
//!   `ql[l+32]` = v[l+32] | v[l+96]<<4 (low 4 bits each); `qh[l]` holds the top 2 bits of
//!   v[l], v[l+32], v[l+64], v[l+96] at shifts 0, 2, 4, 6.

use super::math::GROUP_MAX_EPS;
use super::math::{
    fp16, get_scale_min_k4, make_qkx2_quants, make_qx_quants, nearest_int, pack_scale_min_k4,
};
use super::{Block, GgmlType};
use half::f16;

/// QK_K: values per super-block.
const QK_K: usize = 256;

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

#[cfg(target_arch = "x86_64")]
mod simd;

/// Which implementation of the K-quant searches runs. All produce the same bytes; `Scalar`
/// (the code in `math.rs`, one sub-block at a time) is the reference and the fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    /// One sub-block per lane of 256-bit vectors (Q4_K/Q5_K: 8 lanes, Q6_K: 2 x 8).
    Avx2,
    /// As `Avx2`, but 16 lanes in one 512-bit vector: Q6_K's 16 sub-blocks, Q4_K/Q5_K's pairs of
    /// super-blocks.
    Avx512,
}

impl Isa {
    /// The best the CPU supports.
    pub(crate) fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                if is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// What [`Block::quantize`] uses: [`Isa::detected`], or `Scalar` when the environment
    /// variable `MMFUSER_QUANT_SCALAR` is set to anything but `""`/`0` (read once).
    pub(crate) fn current() -> Isa {
        use std::sync::atomic::{AtomicU8, Ordering};
        static CHOSEN: AtomicU8 = AtomicU8::new(0);
        match CHOSEN.load(Ordering::Relaxed) {
            1 => Isa::Scalar,
            2 => Isa::Avx2,
            3 => Isa::Avx512,
            _ => {
                let forced = std::env::var_os("MMFUSER_QUANT_SCALAR")
                    .is_some_and(|v| !v.is_empty() && v != "0");
                let isa = if forced { Isa::Scalar } else { Isa::detected() };
                let code = match isa {
                    Isa::Scalar => 1,
                    Isa::Avx2 => 2,
                    Isa::Avx512 => 3,
                };
                CHOSEN.store(code, Ordering::Relaxed);
                isa
            }
        }
    }

    /// `self`, or the best the CPU supports if that is less (so tests may ask for any).
    fn usable(self) -> Isa {
        match (self, Isa::detected()) {
            (_, Isa::Scalar) | (Isa::Scalar, _) => Isa::Scalar,
            (Isa::Avx512, Isa::Avx512) => Isa::Avx512,
            _ => Isa::Avx2,
        }
    }
}

/// A Q4_K / Q5_K super-block before packing: (d, dmin, packed 6-bit scales and mins, levels).
type Levels = (f16, f16, [u8; 12], [u8; QK_K]);

/// The `make_qkx2_quants` search of a format: levels 0..=nmax, `nstep + 1` candidate inverse
/// scales `(rmin + rdelta*is + nmax) / (max - min)`.
#[derive(Clone, Copy)]
struct Search {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
}

/// ggml's parameters for Q4_K and Q5_K (`quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`).
const Q4K_SEARCH: Search = Search {
    nmax: 15,
    rmin: -1.0,
    rdelta: 0.1,
    nstep: 20,
};
const Q5K_SEARCH: Search = Search {
    nmax: 31,
    rmin: -0.5,
    rdelta: 0.1,
    nstep: 15,
};

fn as_block(x: &[f32]) -> &[f32; QK_K] {
    x.try_into().expect("256 values per super-block")
}

/// Steps (2)-(3) shared by Q4_K and Q5_K, given step (1)'s per-sub-block `scales` and `mins`
/// (`-min`): quantize them to 6 bits, store d/dmin, and requantize `levels` with the stored
/// scales. Where a stored scale is zero ggml keeps the levels of step (1): `keep(j, levels_j)`
/// must put them there (the scalar search already did; the SIMD one recomputes them).
#[inline(always)]
fn finish_scale_min_k(
    x: &[f32; QK_K],
    scales: &[f32; 8],
    mins: &[f32; 8],
    nmax: i32,
    levels: &mut [u8; QK_K],
    mut keep: impl FnMut(usize, &mut [u8; 32]),
) -> (f16, f16, [u8; 12]) {
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // C stores nearest_int(...) into a uint8_t (wraps mod 256) before MIN(63, .).
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scale_min_k4(&ls, &lm);
    let d = fp16(max_scale / 63.0);
    let dmin = fp16(max_min / 63.0);
    let (df, dminf) = (d.to_f32(), dmin.to_f32());
    for (j, (lj, xj)) in levels
        .chunks_exact_mut(32)
        .zip(x.chunks_exact(32))
        .enumerate()
    {
        let lj: &mut [u8; 32] = lj.try_into().expect("32 levels");
        // (ls, lm) are the pairs get_scale_min_k4 unpacks from `packed`.
        let dj = df * ls[j] as f32;
        if dj == 0.0 {
            keep(j, lj); // make_qkx2_quants' levels, as ggml does
            continue;
        }
        let dm = dminf * lm[j] as f32;
        for (l, &v) in lj.iter_mut().zip(xj) {
            *l = nearest_int((v + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed)
}

/// Steps (1)-(3) shared by Q4_K and Q5_K: returns (d, dmin, packed scales, levels 0..=nmax).
/// `rmin/rdelta/nstep` are the make_qkx2_quants search parameters of the format.
#[inline(always)]
fn quantize_scale_min_k_scalar(x: &[f32; QK_K], search: Search) -> Levels {
    let Search {
        nmax,
        rmin,
        rdelta,
        nstep,
    } = search;
    let mut levels = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, (xs, lj)) in x
        .chunks_exact(32)
        .zip(levels.chunks_exact_mut(32))
        .enumerate()
    {
        let xs: &[f32; 32] = xs.try_into().expect("32 values");
        let lj: &mut [u8; 32] = lj.try_into().expect("32 levels");
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        // Weight each value by the sub-block's RMS plus its own magnitude: large values
        // matter more, but small ones are never ignored.
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let sm = make_qkx2_quants(nmax, xs, &weights, lj, &mut laux, rmin, rdelta, nstep);
        scales[j] = sm.scale;
        mins[j] = sm.min;
    }
    let (d, dmin, packed) = finish_scale_min_k(x, &scales, &mins, nmax, &mut levels, |_, _| {});
    (d, dmin, packed, levels)
}

/// [`quantize_scale_min_k_scalar`] with the search in AVX2 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn quantize_scale_min_k_avx2(x: &[f32; QK_K], s: Search) -> Levels {
    let r = simd::qkx2_avx2(x, s.nmax, s.rmin, s.rdelta, s.nstep);
    finish_lanes(x, &r, 0, s.nmax)
}

/// As [`quantize_scale_min_k_avx2`] for two consecutive super-blocks, whose searches share the
/// vectors (16 lanes): the same bytes, faster (two independent dependency chains).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_scale_min_k_pair_avx2(x: &[f32; 2 * QK_K], s: Search) -> [Levels; 2] {
    let r = simd::qkx2_pair_avx2(x, s.nmax, s.rmin, s.rdelta, s.nstep);
    finish_pair(x, &r, s)
}

/// [`quantize_scale_min_k_pair_avx2`] with the 16 lanes in one AVX-512 vector.
///
/// # Safety
/// The CPU must support AVX-512F and AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f")]
unsafe fn quantize_scale_min_k_pair_avx512(x: &[f32; 2 * QK_K], s: Search) -> [Levels; 2] {
    let r = simd::qkx2_pair_avx512(x, s.nmax, s.rmin, s.rdelta, s.nstep);
    finish_pair(x, &r, s)
}

/// Steps (2)-(3) for both super-blocks of a pair search.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn finish_pair(x: &[f32; 2 * QK_K], r: &simd::Qkx2Lanes, s: Search) -> [Levels; 2] {
    let (a, b) = x.split_at(QK_K);
    [
        finish_lanes(as_block(a), r, 0, s.nmax),
        finish_lanes(as_block(b), r, 8, s.nmax),
    ]
}

/// Q4_K / Q5_K `quantize_many_with`: super-blocks in pairs through the AVX2 search where the
/// CPU has it (`quantize_run`), each result `pack`ed into the format's block.
fn scale_min_k_many<B: Block>(
    x: &[f32],
    out: &mut [u8],
    isa: Isa,
    search: Search,
    one: impl Fn(&[f32; QK_K], Isa) -> B,
    pack: fn(Levels) -> B,
) {
    quantize_run(x, out, isa, one, |xs| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: quantize_run passes pairs only where `usable` found AVX2 (and AVX-512F for
        // Avx512).
        return unsafe {
            if isa.usable() == Isa::Avx512 {
                quantize_scale_min_k_pair_avx512(xs, search)
            } else {
                quantize_scale_min_k_pair_avx2(xs, search)
            }
        }
        .map(pack);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no SIMD search off x86-64: {} {}", xs.len(), search.nmax)
    })
}

/// Steps (2)-(3) for the super-block `x` whose search results are lanes `at..at + 8` of `r`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn finish_lanes(x: &[f32; QK_K], r: &simd::Qkx2Lanes, at: usize, nmax: i32) -> Levels {
    let lanes = |v: &[f32; 16]| -> [f32; 8] { v[at..at + 8].try_into().expect("8 lanes") };
    let mut levels = [0u8; QK_K];
    let (scales, mins) = (lanes(&r.scale), lanes(&r.min));
    let (d, dmin, packed) = finish_scale_min_k(x, &scales, &mins, nmax, &mut levels, |j, lj| {
        if r.flat >> (at + j) & 1 != 0 {
            lj.fill(0);
        } else {
            let (iscale, min) = (r.iscale[at + j], r.min_used[at + j]);
            for (l, &v) in lj.iter_mut().zip(&x[32 * j..32 * j + 32]) {
                *l = nearest_int(iscale * (v - min)).clamp(0, nmax) as u8;
            }
        }
    });
    (d, dmin, packed, levels)
}

/// Quantize whole super-blocks of `x` into `out` (`B::SIZE` bytes each) with `isa`: pairs of
/// super-blocks share one search where the CPU has AVX2 (`pair`), an odd last one goes alone.
#[inline(always)]
fn quantize_run<B: Block>(
    x: &[f32],
    out: &mut [u8],
    isa: Isa,
    one: impl Fn(&[f32; QK_K], Isa) -> B,
    pair: impl Fn(&[f32; 2 * QK_K]) -> [B; 2],
) {
    let (mut x, mut out) = (x, out);
    if isa.usable() != Isa::Scalar {
        let n_pairs = x.len() / (2 * QK_K);
        let (xp, xr) = x.split_at(n_pairs * 2 * QK_K);
        let (op, or) = out.split_at_mut(n_pairs * 2 * B::SIZE);
        for (xs, os) in xp
            .chunks_exact(2 * QK_K)
            .zip(op.chunks_exact_mut(2 * B::SIZE))
        {
            let [a, b] = pair(xs.try_into().expect("two super-blocks"));
            let (oa, ob) = os.split_at_mut(B::SIZE);
            a.write(oa);
            b.write(ob);
        }
        (x, out) = (xr, or);
    }
    for (xs, o) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(B::SIZE)) {
        one(as_block(xs), isa).write(o);
    }
}

/// `block_q4_K`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

impl BlockQ4K {
    /// [`Block::quantize`] with a given implementation of the search (same bytes for all).
    pub(crate) fn quantize_with(x: &[f32; QK_K], isa: Isa) -> Self {
        match isa.usable() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `usable` checked that the CPU has AVX2.
            Isa::Avx2 | Isa::Avx512 => unsafe { Self::quantize_avx2(x) },
            _ => Self::pack(quantize_scale_min_k_scalar(x, Q4K_SEARCH)),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(x: &[f32; QK_K]) -> Self {
        Self::pack(quantize_scale_min_k_avx2(x, Q4K_SEARCH))
    }

    /// [`Block::quantize_many`] with a given implementation of the search (same bytes for all).
    pub(crate) fn quantize_many_with(x: &[f32], out: &mut [u8], isa: Isa) {
        scale_min_k_many(x, out, isa, Q4K_SEARCH, Self::quantize_with, Self::pack)
    }

    #[inline(always)]
    fn pack((d, dmin, scales, l): Levels) -> Self {
        let mut qs = [0u8; QK_K / 2];
        for c in 0..4 {
            for i in 0..32 {
                qs[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
            }
        }
        BlockQ4K {
            d,
            dmin,
            scales,
            qs,
        }
    }
}

impl Block for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4K;
    const QK: usize = QK_K;
    const SIZE: usize = 144;
    const F16_AT: &'static [usize] = &[0, 2]; // d, dmin

    fn quantize(x: &[f32]) -> Self {
        Self::quantize_with(as_block(x), Isa::current())
    }

    fn quantize_many(x: &[f32], out: &mut [u8]) {
        Self::quantize_many_with(x, out, Isa::current())
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        for c in 0..4 {
            let (sc1, m1) = get_scale_min_k4(2 * c, &self.scales);
            let (sc2, m2) = get_scale_min_k4(2 * c + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for i in 0..32 {
                let q = self.qs[32 * c + i];
                y[64 * c + i] = d1 * (q & 0xF) as f32 - m1;
                y[64 * c + 32 + i] = d2 * (q >> 4) as f32 - m2;
            }
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.dmin.to_le_bytes());
        out[4..16].copy_from_slice(&self.scales);
        out[16..144].copy_from_slice(&self.qs);
    }

    fn read(b: &[u8]) -> Self {
        let mut scales = [0u8; 12];
        scales.copy_from_slice(&b[4..16]);
        let mut qs = [0u8; QK_K / 2];
        qs.copy_from_slice(&b[16..144]);
        BlockQ4K {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales,
            qs,
        }
    }
}

/// `block_q5_K`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

impl BlockQ5K {
    /// [`Block::quantize`] with a given implementation of the search (same bytes for all).
    pub(crate) fn quantize_with(x: &[f32; QK_K], isa: Isa) -> Self {
        match isa.usable() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `usable` checked that the CPU has AVX2.
            Isa::Avx2 | Isa::Avx512 => unsafe { Self::quantize_avx2(x) },
            _ => Self::pack(quantize_scale_min_k_scalar(x, Q5K_SEARCH)),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(x: &[f32; QK_K]) -> Self {
        Self::pack(quantize_scale_min_k_avx2(x, Q5K_SEARCH))
    }

    /// [`Block::quantize_many`] with a given implementation of the search (same bytes for all).
    pub(crate) fn quantize_many_with(x: &[f32], out: &mut [u8], isa: Isa) {
        scale_min_k_many(x, out, isa, Q5K_SEARCH, Self::quantize_with, Self::pack)
    }

    #[inline(always)]
    fn pack((d, dmin, scales, l): Levels) -> Self {
        let mut qs = [0u8; QK_K / 2];
        let mut qh = [0u8; QK_K / 8];
        for c in 0..4 {
            for i in 0..32 {
                let (lo, hi) = (l[64 * c + i], l[64 * c + 32 + i]);
                qs[32 * c + i] = (lo & 0xF) | ((hi & 0xF) << 4);
                qh[i] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            }
        }
        BlockQ5K {
            d,
            dmin,
            scales,
            qh,
            qs,
        }
    }
}

impl Block for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5K;
    const QK: usize = QK_K;
    const SIZE: usize = 176;
    const F16_AT: &'static [usize] = &[0, 2]; // d, dmin

    fn quantize(x: &[f32]) -> Self {
        Self::quantize_with(as_block(x), Isa::current())
    }

    fn quantize_many(x: &[f32], out: &mut [u8]) {
        Self::quantize_many_with(x, out, Isa::current())
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        for c in 0..4 {
            let (sc1, m1) = get_scale_min_k4(2 * c, &self.scales);
            let (sc2, m2) = get_scale_min_k4(2 * c + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for i in 0..32 {
                let q = self.qs[32 * c + i];
                let h = self.qh[i];
                let lo = (q & 0xF) + (((h >> (2 * c)) & 1) << 4);
                let hi = (q >> 4) + (((h >> (2 * c + 1)) & 1) << 4);
                y[64 * c + i] = d1 * lo as f32 - m1;
                y[64 * c + 32 + i] = d2 * hi as f32 - m2;
            }
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.dmin.to_le_bytes());
        out[4..16].copy_from_slice(&self.scales);
        out[16..48].copy_from_slice(&self.qh);
        out[48..176].copy_from_slice(&self.qs);
    }

    fn read(b: &[u8]) -> Self {
        let mut scales = [0u8; 12];
        scales.copy_from_slice(&b[4..16]);
        let mut qh = [0u8; QK_K / 8];
        qh.copy_from_slice(&b[16..48]);
        let mut qs = [0u8; QK_K / 2];
        qs.copy_from_slice(&b[48..176]);
        BlockQ5K {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales,
            qh,
            qs,
        }
    }
}

/// `block_q6_K` (note: d is the LAST field).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

impl BlockQ6K {
    /// [`Block::quantize`] with a given implementation of the search (same bytes for all).
    pub(crate) fn quantize_with(x: &[f32; QK_K], isa: Isa) -> Self {
        match isa.usable() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `usable` checked that the CPU has AVX2 (and AVX-512F for `Avx512`).
            Isa::Avx2 => unsafe { Self::quantize_avx2(x) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { Self::quantize_avx512(x) },
            _ => Self::quantize_scalar(x),
        }
    }

    #[inline(always)]
    fn quantize_scalar(x: &[f32; QK_K]) -> Self {
        let mut l = [0u8; QK_K];
        let mut scales = [0f32; 16];
        for (ib, (xs, ls)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            let xs: &[f32; 16] = xs.try_into().expect("16 values");
            let ls: &mut [u8; 16] = ls.try_into().expect("16 levels");
            scales[ib] = make_qx_quants(32, xs, ls);
        }
        Self::finish(x, &scales, &mut l, |_, _| {})
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(x: &[f32; QK_K]) -> Self {
        let r = simd::qx_avx2(x);
        Self::finish_simd(x, &r)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,avx512f")]
    unsafe fn quantize_avx512(x: &[f32; QK_K]) -> Self {
        let r = simd::qx_avx512(x);
        Self::finish_simd(x, &r)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn finish_simd(x: &[f32; QK_K], r: &simd::QxLanes) -> Self {
        let mut l = [0u8; QK_K];
        Self::finish(x, &r.scale, &mut l, |j, lj| {
            if r.small >> j & 1 != 0 {
                lj.fill(0);
            } else {
                let iscale = r.iscale[j];
                for (l, &v) in lj.iter_mut().zip(&x[16 * j..16 * j + 16]) {
                    *l = (nearest_int(iscale * v).clamp(-32, 31) + 32) as u8;
                }
            }
        })
    }

    /// Steps (2)-(3) and the packing, given step (1)'s per-sub-block scales; where a stored
    /// scale is zero, `keep(j, levels_j)` must leave make_qx_quants' levels there.
    #[inline(always)]
    fn finish(
        x: &[f32; QK_K],
        scales_f: &[f32; 16],
        l: &mut [u8; QK_K],
        mut keep: impl FnMut(usize, &mut [u8; 16]),
    ) -> Self {
        let mut max_scale = 0.0f32;
        let mut max_abs_scale = 0.0f32;
        for &s in scales_f {
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s; // signed: the largest scale maps to -128 below
            }
        }
        let mut blk = BlockQ6K {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales: [0; 16],
            d: fp16(0.0),
        };
        if max_abs_scale < GROUP_MAX_EPS {
            return blk; // all-zero block (ggml memsets it)
        }
        let iscale = -128.0 / max_scale;
        blk.d = fp16(1.0 / iscale);
        for (s, &sf) in blk.scales.iter_mut().zip(scales_f) {
            *s = nearest_int(iscale * sf).min(127) as i8;
        }
        let df = blk.d.to_f32();
        for (j, (lj, xj)) in l.chunks_exact_mut(16).zip(x.chunks_exact(16)).enumerate() {
            let lj: &mut [u8; 16] = lj.try_into().expect("16 levels");
            let dj = df * blk.scales[j] as f32;
            if dj == 0.0 {
                keep(j, lj); // make_qx_quants' levels
                continue;
            }
            for (l, &v) in lj.iter_mut().zip(xj) {
                *l = (nearest_int(v / dj).clamp(-32, 31) + 32) as u8;
            }
        }
        for h in 0..2 {
            let (lv, ql, qh) = (
                &l[128 * h..128 * h + 128],
                &mut blk.ql[64 * h..64 * h + 64],
                &mut blk.qh[32 * h..32 * h + 32],
            );
            for i in 0..32 {
                ql[i] = (lv[i] & 0xF) | ((lv[i + 64] & 0xF) << 4);
                ql[i + 32] = (lv[i + 32] & 0xF) | ((lv[i + 96] & 0xF) << 4);
                qh[i] = (lv[i] >> 4)
                    | ((lv[i + 32] >> 4) << 2)
                    | ((lv[i + 64] >> 4) << 4)
                    | ((lv[i + 96] >> 4) << 6);
            }
        }
        blk
    }
}

impl Block for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6K;
    const QK: usize = QK_K;
    const SIZE: usize = 210;
    const F16_AT: &'static [usize] = &[208]; // d

    fn quantize(x: &[f32]) -> Self {
        Self::quantize_with(as_block(x), Isa::current())
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for h in 0..2 {
            let (ql, qh, sc) = (
                &self.ql[64 * h..],
                &self.qh[32 * h..],
                &self.scales[8 * h..],
            );
            let y = &mut y[128 * h..128 * h + 128];
            for i in 0..32 {
                let is = i / 16;
                let q1 = ((ql[i] & 0xF) | ((qh[i] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[i + 32] & 0xF) | (((qh[i] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) as i32 - 32;
                // C: d * sc * q, evaluated as (d*sc)*q.
                y[i] = d * sc[is] as f32 * q1 as f32;
                y[i + 32] = d * sc[is + 2] as f32 * q2 as f32;
                y[i + 64] = d * sc[is + 4] as f32 * q3 as f32;
                y[i + 96] = d * sc[is + 6] as f32 * q4 as f32;
            }
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..128].copy_from_slice(&self.ql);
        out[128..192].copy_from_slice(&self.qh);
        for (o, &s) in out[192..208].iter_mut().zip(&self.scales) {
            *o = s as u8;
        }
        out[208..210].copy_from_slice(&self.d.to_le_bytes());
    }

    fn read(b: &[u8]) -> Self {
        let mut ql = [0u8; QK_K / 2];
        ql.copy_from_slice(&b[0..128]);
        let mut qh = [0u8; QK_K / 4];
        qh.copy_from_slice(&b[128..192]);
        let mut scales = [0i8; 16];
        for (s, &v) in scales.iter_mut().zip(&b[192..208]) {
            *s = v as i8;
        }
        BlockQ6K {
            ql,
            qh,
            scales,
            d: f16_at(b, 208),
        }
    }
}

//! Quantized matrix products the way ggml's CPU backend does them: each activation row is
//! quantized to 8 bits (Q8_K super-blocks of 256 for the K-quants, Q8_0 blocks of 32 for
//! Q8_0 / Q4_0 / Q5_0: ggml's `vec_dot_type` of each weight type), and every output is an
//! integer dot product per (sub-)block of the weight's stored bytes against those 8-bit values,
//! scaled in f32. Weights are read straight from their bytes (the mapped file); nothing is
//! dequantized.
//!
//! Exactness: for the K-quants every output is summed in one defined order, whatever the ISA:
//! each super-block's integer sums are kept in the 8 i32 lanes a 32-byte vector holds them in
//! (`Lanes`), folded into 8 f32 lanes by fused multiply-adds (`fold_k`), and the lanes are added
//! once at the end of the row (`hsum8`), as llama.cpp's AVX2 kernels do; the scalar code computes
//! the same lanes, so the AVX2 kernels give bit-identical results. The 32-value blocks (Q8_0,
//! Q4_0, Q5_0) likewise: 8 i32 lanes per block (4 neighbouring products each), folded by
//! f += lane·(d_w·d_a) into 8 f32 lanes, added at the end of the row. Against llama.cpp's own
//! kernels (tests: `fixtures/dot/`) Q8_0, Q4_0, Q5_0 and Q6_K are bit-identical; Q4_K and Q5_K
//! agree to f32 rounding of the mins' terms, which llama.cpp sums apart in its own order.
//!
//! Instruction sets (`Isa`): scalar (the reference), AVX2, and AVX-512 with VNNI. The AVX-512
//! kernels compute the same integer lanes and the same folds: one vpdpwssd / vpdpbusd where AVX2
//! takes a multiply-add and an add, and for many rows 64-byte vectors holding two activation rows
//! (`PairQ8K`, `PairQ8_0`; `dot/avx512.rs`), so every ISA gives every output the same bits. For
//! many rows of the 32-value types, the wide kernel turns the vector the other way: lane r holds
//! weight row r of 16 (the task's rows transposed once), 4 activation levels are broadcast, so
//! one vpdpbusd, one conversion and one fused multiply-add make lane l of 16 outputs (the pair
//! kernel also multiplied the scales for every row pair): Q8_0 about 2.5x per core.
//!
//! Block layouts (ggml-common.h; little-endian):
//! - Q8_0 `{f16 d; i8 qs[32]}`: x = d*q.
//! - Q4_0 `{f16 d; u8 qs[16]}`: x[j] = d*((qs[j]&15)-8), x[j+16] = d*((qs[j]>>4)-8).
//! - Q5_0 `{f16 d; u32 qh; u8 qs[16]}`: like Q4_0 with bit j (j+16) of qh as the 5th bit, -16.
//! - Q4_K `{f16 d, dmin; u8 scales[12]; u8 qs[128]}`: 8 sub-blocks of 32 with 6-bit (sc, m);
//!   64-value chunk c takes low nibbles of qs[32c..] (sub-block 2c), then high nibbles (2c+1);
//!   x = d*sc*q - dmin*m.
//! - Q5_K `{f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}`: Q4_K plus bit 2c (2c+1) of
//!   qh[l] as the 5th bit of chunk c's low (high) nibble l.
//! - Q6_K `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`: per 128-value half h, l in 0..32:
//!   x[l] = ql[l]&15 | (qh[l]&3)<<4, x[l+32] = ql[l+32]&15 | ((qh[l]>>2)&3)<<4,
//!   x[l+64] = ql[l]>>4 | ((qh[l]>>4)&3)<<4, x[l+96] = ql[l+32]>>4 | ((qh[l]>>6)&3)<<4, each
//!   minus 32, times d*scales[16-value sub-block].
//! - Q8_K (activations only, never stored) `{f32 d; i8 qs[256]; i16 bsums[16]}`: d = max/-127
//!   of the signed value of largest magnitude, q = min(127, nearest_int(x/d)), bsums = sums of
//!   16 consecutive q (the K-quant mins need only those).

use super::math::nearest_int;
use super::{GgmlType, QuantError};
use half::f16;
use rayon::prelude::*;

const QK_K: usize = 256;
const QK8_0: usize = 32;

/// A Q8_K super-block of activations (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// A Q8_0 block of activations, its scale (an f16 in ggml's block) held widened to f32: every
/// weight block it meets needs it as f32, and the f16 is `f16::from_f32(d)`, exactly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0Act {
    pub d: f32,
    pub qs: [i8; QK8_0],
}

/// ggml's `quantize_row_q8_K_ref` on 256 values. A non-finite input makes `d` NaN, so that it
/// shows in every output it touches instead of becoming a finite wrong number.
pub fn quantize_q8k(x: &[f32]) -> BlockQ8K {
    quantize_q8k_with(Isa::current(), x)
}

/// [`quantize_q8k`] on a chosen instruction set (the same blocks on each).
pub fn quantize_q8k_with(isa: Isa, x: &[f32]) -> BlockQ8K {
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx512, Ok(x)) = (isa, <&[f32; QK_K]>::try_from(x)) {
        // SAFETY: the caller's `isa` is one the CPU runs (Isa::current / Isa::all_here).
        return unsafe { avx512::quantize_q8k(x) };
    }
    quantize_q8k_scalar(x)
}

/// [`quantize_q8k`] one value at a time (the reference the AVX-512 form is tested against).
pub fn quantize_q8k_scalar(x: &[f32]) -> BlockQ8K {
    let mut b = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if x.iter().any(|v| !v.is_finite()) {
        b.d = f32::NAN;
        return b;
    }
    if amax == 0.0 {
        return b;
    }
    let iscale = -127.0 / max;
    for (q, &v) in b.qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
        *s = q.iter().map(|&v| v as i16).sum();
    }
    b.d = 1.0 / iscale;
    b
}

/// ggml's x86 `quantize_row_q8_0` (the AVX/AVX2 build llama.cpp runs here, not the `_ref` one
/// used for files): id = 127/max|x|, q = x*id rounded half to even, d = f16(max|x|/127).
pub fn quantize_q8_0_act(x: &[f32]) -> BlockQ8_0Act {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut b = BlockQ8_0Act {
        d: f16::from_f32(amax / 127.0).to_f32(),
        qs: [0; QK8_0],
    };
    if x.iter().any(|v| !v.is_finite()) {
        b.d = f32::NAN;
        return b;
    }
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (q, &v) in b.qs.iter_mut().zip(x) {
        // Half to even as ggml's _mm256_round_ps; |v·id| <= 127 (+ rounding), well inside
        // nearest_int's range, and no libm call (round_ties_even is one without SSE4.1).
        *q = nearest_int(v * id) as i8;
    }
    b
}

/// Two activation rows' Q8_K blocks (rows 2i and 2i + 1, the same block b) laid out for the
/// AVX-512 tiles, which hold row 2i in the low half of a vector and row 2i + 1 in the high half:
/// each 32-value group of row 2i followed by the same group of row 2i + 1; the bsums of row 2i,
/// then of row 2i + 1; each row's d in 8 lanes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct PairQ8K {
    qs: [i8; 2 * QK_K],
    bsums: [i16; 2 * QK_K / 16],
    d: [f32; 16],
}

/// Two activation rows' Q8_0 blocks laid out as [`PairQ8K`]: row 2i's 32 values then row
/// 2i + 1's; `bias` starts each vpdpbusd lane (4 neighbours) at -128·(their sum), since the
/// kernels multiply levels + 128 (unsigned) by the activations; each row's d in 8 lanes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct PairQ8_0 {
    qs: [i8; 2 * QK8_0],
    bias: [i32; 16],
    d: [f32; 16],
}

/// One activation row's Q8_0 block as the wide AVX-512 kernel reads it (`avx512::zero_wide`):
/// each 4 levels broadcast to every lane, `bias` = -128·(their sum) to start the lane with (the
/// weight levels are stored + 128, unsigned), d widened.
#[derive(Clone, Copy)]
#[repr(C)]
struct RowQ8_0 {
    qs: [i8; QK8_0],
    bias: [i32; QK8_0 / 4],
    d: f32,
}

/// -128·(the sum of each 4 neighbouring levels) of a Q8_0 activation block: what the AVX-512
/// kernels start each vpdpbusd lane with, as they multiply weight levels + 128 (unsigned).
fn bias4(qs: &[i8; QK8_0]) -> [i32; QK8_0 / 4] {
    std::array::from_fn(|l| -128 * qs[4 * l..4 * l + 4].iter().map(|&v| v as i32).sum::<i32>())
}

/// Activations laid out for the AVX-512 kernels. `K`, `Zero`: row pairs (`n / 2` pairs of
/// `per_row` blocks each: pair p, block b at `p * per_row + b`; an odd last row is left out).
/// `Rows`: every row (row j, block b at `j * per_row + b`), for the 32-value types' wide kernel.
enum Pairs {
    K(Vec<PairQ8K>),
    Zero(Vec<PairQ8_0>),
    Rows(Vec<RowQ8_0>),
}

impl Pairs {
    /// The wide kernel's rows, from the Q8_0 activation blocks.
    fn rows(a: &[BlockQ8_0Act]) -> Pairs {
        Pairs::Rows(
            a.par_iter()
                .map(|b| RowQ8_0 {
                    qs: b.qs,
                    bias: bias4(&b.qs),
                    d: b.d,
                })
                .collect(),
        )
    }

    fn of(act: &Act, per_row: usize, n: usize) -> Pairs {
        let pairs = n / 2;
        let idx = |i: usize| (2 * (i / per_row) * per_row + i % per_row, per_row);
        match act {
            Act::Q8K(a) => Pairs::K(
                (0..pairs * per_row)
                    .into_par_iter()
                    .map(|i| {
                        let (r0, step) = idx(i);
                        let (x, y) = (&a[r0], &a[r0 + step]);
                        let mut p = PairQ8K {
                            qs: [0; 2 * QK_K],
                            bsums: [0; 2 * QK_K / 16],
                            d: [0.0; 16],
                        };
                        for (g, dst) in p.qs.chunks_exact_mut(64).enumerate() {
                            dst[..32].copy_from_slice(&x.qs[32 * g..32 * g + 32]);
                            dst[32..].copy_from_slice(&y.qs[32 * g..32 * g + 32]);
                        }
                        p.bsums[..16].copy_from_slice(&x.bsums);
                        p.bsums[16..].copy_from_slice(&y.bsums);
                        p.d[..8].fill(x.d);
                        p.d[8..].fill(y.d);
                        p
                    })
                    .collect(),
            ),
            Act::Q8_0(a) => Pairs::Zero(
                (0..pairs * per_row)
                    .into_par_iter()
                    .map(|i| {
                        let (r0, step) = idx(i);
                        let mut p = PairQ8_0 {
                            qs: [0; 2 * QK8_0],
                            bias: [0; 16],
                            d: [0.0; 16],
                        };
                        for (h, row) in [&a[r0], &a[r0 + step]].into_iter().enumerate() {
                            p.qs[32 * h..32 * h + 32].copy_from_slice(&row.qs);
                            p.bias[8 * h..8 * h + 8].copy_from_slice(&bias4(&row.qs));
                            p.d[8 * h..8 * h + 8].fill(row.d);
                        }
                        p
                    })
                    .collect(),
            ),
        }
    }
}

/// Activation rows quantized for one weight type.
pub enum Act {
    Q8K(Vec<BlockQ8K>),
    Q8_0(Vec<BlockQ8_0Act>),
}

/// Instruction sets the kernels exist for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 with FMA and F16C (every AVX2 CPU x86-64 has shipped has all three).
    Avx2,
    /// `Avx2` plus AVX-512 F, BW, VL and VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later): the
    /// same kernels with VNNI's fused integer multiply-adds (the same exact integer sums in fewer
    /// operations) and 512-bit float tiles (the same chain of FMAs per output).
    Avx512,
}

impl Isa {
    /// The variable that names a lesser instruction set, for comparing them on one machine.
    pub const ENV: &'static str = "MMFUSER_CPU_ISA";

    /// What `MMFUSER_CPU_ISA` asks for: None when unset or empty; an error, naming the accepted
    /// values, for anything else unknown (the CLI checks it first, so a typo is not silently
    /// the default).
    pub fn asked() -> std::result::Result<Option<Isa>, String> {
        let v = match std::env::var_os(Self::ENV) {
            None => return Ok(None),
            Some(v) => v,
        };
        match v.to_str().map(str::trim) {
            Some("") => Ok(None),
            Some("scalar") => Ok(Some(Isa::Scalar)),
            Some("avx2") => Ok(Some(Isa::Avx2)),
            Some("avx512") => Ok(Some(Isa::Avx512)),
            _ => Err(format!(
                "{}={} is not an instruction set: use scalar, avx2 or avx512 (or unset it for the best this CPU has)",
                Self::ENV,
                v.to_string_lossy().escape_debug()
            )),
        }
    }

    /// What the CPU runs: the best it has, or a lesser one named by `MMFUSER_CPU_ISA`
    /// (read once). Asking for more than the CPU has gives what it has.
    pub fn current() -> Isa {
        use std::sync::OnceLock;
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Isa::detected();
            let asked = Isa::asked().ok().flatten().unwrap_or(best);
            if asked.rank() < best.rank() {
                asked
            } else {
                best
            }
        })
    }

    /// The best this CPU has.
    pub fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            match (avx2, avx512) {
                (true, true) => return Isa::Avx512,
                (true, false) => return Isa::Avx2,
                _ => {}
            }
        }
        Isa::Scalar
    }

    /// Every instruction set this CPU runs, the scalar reference first (the tests compare them).
    pub fn all_here() -> Vec<Isa> {
        let best = Isa::detected().rank();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.rank() <= best)
            .collect()
    }

    fn rank(self) -> u8 {
        self as u8
    }

    /// Whether the AVX2 kernels (or their VNNI forms) run.
    pub(crate) fn vector(self) -> bool {
        self != Isa::Scalar
    }
}

/// Weight types with a quantized product.
pub fn supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q5_0
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
    )
}

fn is_k(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K)
}

/// Quantize `x` (rows of `k` values) for products with weights of type `ty`, in parallel, on
/// `isa` (the product's own).
pub fn quantize_act(isa: Isa, ty: GgmlType, x: &[f32], k: usize) -> Act {
    // Tasks of 4096 values (whole blocks of either kind): a rayon task per block cost more
    // than the block.
    let task = 16 * QK_K;
    if is_k(ty) {
        Act::Q8K(
            x.par_chunks(task)
                .flat_map_iter(|c| c.chunks(QK_K).map(|b| quantize_q8k_with(isa, b)))
                .collect(),
        )
    } else {
        debug_assert!(k.is_multiple_of(QK8_0));
        Act::Q8_0(
            x.par_chunks(task)
                .flat_map_iter(|c| c.chunks(QK8_0).map(quantize_q8_0_act))
                .collect(),
        )
    }
}

/// An f16 (little-endian at `b[i]`) as f32, without a table or branches for finite values: the
/// exponent and mantissa bits shifted into an f32 and scaled by 2^112 (the bias difference; exact
/// for subnormals too, which become normal f32). A table would be 256 KiB that the weight stream
/// keeps evicting, and `half`'s software conversion branches per class.
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    let h = u16::from_le_bytes([b[i], b[i + 1]]) as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let mag = if em >= 0x7c00 {
        // Inf / NaN: all-ones exponent, the mantissa kept (NaN stays NaN).
        f32::from_bits(0x7f80_0000 | ((em & 0x3ff) << 13))
    } else {
        f32::from_bits(em << 13) * f32::from_bits(0x7780_0000) // 2^112
    };
    f32::from_bits(mag.to_bits() | sign)
}

// ---- per super-block / block integer sums (scalar) --------------------------------------------

/// A K-quant super-block's scales, decoded once and used against every activation row.
#[derive(Clone, Copy, Debug)]
pub struct KScales {
    d: f32,
    dmin: f32,
    /// Sub-block scales: 8 (Q4_K, Q5_K: 6-bit) or 16 (Q6_K: signed 8-bit).
    sc: [i16; 16],
    /// Sub-block mins (Q4_K, Q5_K), each twice: the weight of bsums[i] is m16[i].
    m16: [i16; 16],
}

/// The 8 six-bit scales and the 8 mins of a Q4_K / Q5_K super-block from its 12 scale bytes read
/// as three little-endian words: byte j of each result is pair j (see `k_scales`).
#[inline(always)]
fn k4_scales_mins(u0: u32, u1: u32, u2: u32) -> (u64, u64) {
    let sc = (u0 & 0x3f3f_3f3f) as u64
        | (((u2 & 0x0f0f_0f0f) | ((u0 >> 6) & 0x0303_0303) << 4) as u64) << 32;
    let m = (u1 & 0x3f3f_3f3f) as u64
        | ((((u2 >> 4) & 0x0f0f_0f0f) | ((u1 >> 6) & 0x0303_0303) << 4) as u64) << 32;
    (sc, m)
}

/// Decode the scales of one super-block of `ty` (a K-quant). Q4_K / Q5_K pack 8 six-bit
/// (scale, min) pairs in 12 bytes: pair j < 4 is the low 6 bits of bytes j and j + 4; pair j >= 4
/// takes its low 4 bits from byte j + 4 (scale: low nibble, min: high nibble) and its top 2
/// bits from the top of bytes j - 4 and j. Decoded four at a time on 32-bit words.
fn k_scales(ty: GgmlType, w: &[u8]) -> KScales {
    let mut k = KScales {
        d: 0.0,
        dmin: 0.0,
        sc: [0; 16],
        m16: [0; 16],
    };
    if ty == GgmlType::Q6K {
        k.d = f16_at(w, 208);
        for (o, &v) in k.sc.iter_mut().zip(&w[192..208]) {
            *o = v as i8 as i16;
        }
    } else {
        k.d = f16_at(w, 0);
        k.dmin = f16_at(w, 2);
        let word = |i: usize| u32::from_le_bytes([w[i], w[i + 1], w[i + 2], w[i + 3]]);
        let (sc, m) = k4_scales_mins(word(4), word(8), word(12));
        for j in 0..8 {
            k.sc[j] = ((sc >> (8 * j)) & 0xff) as i16;
            k.m16[2 * j] = ((m >> (8 * j)) & 0xff) as i16;
            k.m16[2 * j + 1] = k.m16[2 * j];
        }
    }
    k
}

/// One K-quant super-block's integer sums against one Q8_K block, in the 8 i32 lanes of a
/// 32-byte vector: `q[l]` sums sc·level·a over the values i with (i % 32) / 4 == l (a group of 32
/// values is one vector; maddubs + madd add 4 neighbours into an i32 lane), Q6_K's offset
/// included (lane l less 32·(sc·bsum of its 16-value sub-blocks 2l, 2l+1)); `m[l]` is the mins'
/// term m·bsum of sub-blocks 2l, 2l+1 (Q4_K, Q5_K; 0 for Q6_K). All exact integers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lanes {
    q: [i32; 8],
    m: [i32; 8],
}

/// Level (unsigned) and sub-block scale of value i (0..256) of a K-quant super-block.
#[inline(always)]
fn k_level(ty: GgmlType, w: &[u8], k: &KScales, i: usize) -> (i32, i32) {
    match ty {
        GgmlType::Q6K => {
            let (h, r) = (i / 128, i % 128);
            let (kk, l) = (r / 32, r % 32);
            let (lo, hi, hb) = (w[64 * h + l], w[64 * h + 32 + l], w[128 + 32 * h + l]);
            let q = match kk {
                0 => (lo & 0xF) | ((hb & 3) << 4),
                1 => (hi & 0xF) | (((hb >> 2) & 3) << 4),
                2 => (lo >> 4) | (((hb >> 4) & 3) << 4),
                _ => (hi >> 4) | (((hb >> 6) & 3) << 4),
            };
            (q as i32, k.sc[i / 16] as i32)
        }
        _ => {
            let (c, r) = (i / 64, i % 64);
            let (hi, l) = (r / 32, r % 32);
            let q = if ty == GgmlType::Q5K {
                w[48 + 32 * c + l]
            } else {
                w[16 + 32 * c + l]
            };
            let mut v = if hi == 1 { q >> 4 } else { q & 0xF } as i32;
            if ty == GgmlType::Q5K {
                v |= (((w[16 + l] >> (2 * c + hi)) & 1) as i32) << 4;
            }
            (v, k.sc[2 * c + hi] as i32)
        }
    }
}

/// [`Lanes`] of one super-block, scalar.
fn k_lanes_scalar(ty: GgmlType, w: &[u8], k: &KScales, a: &BlockQ8K) -> Lanes {
    let mut out = Lanes {
        q: [0; 8],
        m: [0; 8],
    };
    for i in 0..QK_K {
        let (level, sc) = k_level(ty, w, k, i);
        out.q[(i % 32) / 4] += sc * level * a.qs[i] as i32;
    }
    for l in 0..8 {
        let (b0, b1) = (a.bsums[2 * l] as i32, a.bsums[2 * l + 1] as i32);
        if ty == GgmlType::Q6K {
            out.q[l] -= 32 * (k.sc[2 * l] as i32 * b0 + k.sc[2 * l + 1] as i32 * b1);
        } else {
            out.m[l] = k.m16[2 * l] as i32 * b0 + k.m16[2 * l + 1] as i32 * b1;
        }
    }
    out
}

/// Signed level of value i (0..32) of a Q8_0 / Q4_0 / Q5_0 block.
#[inline(always)]
fn zero_level(ty: GgmlType, w: &[u8], i: usize) -> i32 {
    match ty {
        GgmlType::Q8_0 => w[2 + i] as i8 as i32,
        GgmlType::Q4_0 => {
            let q = w[2 + i % 16];
            (if i < 16 { q & 0xF } else { q >> 4 }) as i32 - 8
        }
        _ => {
            let qh = u32::from_le_bytes([w[2], w[3], w[4], w[5]]);
            let q = w[6 + i % 16];
            let lo = if i < 16 { q & 0xF } else { q >> 4 } as u32;
            (lo | ((qh >> i) & 1) << 4) as i32 - 16
        }
    }
}

/// One 32-value block's integer sum against one Q8_0 block, in the 8 i32 lanes of a 32-byte
/// vector: lane l sums level·a over values 4l..4l+3 (maddubs + madd add 4 neighbours).
fn zero_lanes_scalar(ty: GgmlType, w: &[u8], a: &BlockQ8_0Act) -> [i32; 8] {
    let mut q = [0i32; 8];
    for i in 0..QK8_0 {
        q[i / 4] += zero_level(ty, w, i) * a.qs[i] as i32;
    }
    q
}

// ---- row dot products: shared f32 combination over blocks -------------------------------------

/// Fold one super-block's lanes into the f32 lanes `f`: f += q·(d_w·d_a), then
/// f -= m·(dmin_w·d_a) (Q4_K, Q5_K), each a fused multiply-add, as the AVX2 kernels do.
#[inline(always)]
fn fold_k(ty: GgmlType, f: &mut [f32; 8], lanes: &Lanes, k: &KScales, a: &BlockQ8K) {
    fma_lanes(f, &lanes.q, k.d * a.d);
    if ty != GgmlType::Q6K {
        // -(m·dm) + f, as the kernels' fnmadd: the same bits as m·(-dm) + f.
        fma_lanes(f, &lanes.m, -(k.dmin * a.d));
    }
}

/// f[l] += q[l]·d, each one fused multiply-add (every type's per-block fold).
#[inline(always)]
fn fma_lanes(f: &mut [f32; 8], q: &[i32; 8], d: f32) {
    for (fl, &q) in f.iter_mut().zip(q) {
        *fl = (q as f32).mul_add(d, *fl);
    }
}

/// The 8 f32 lanes added as the AVX2 kernels add them: halves, then pairs, then the last two.
#[inline(always)]
fn hsum8(f: &[f32; 8]) -> f32 {
    let a = [f[0] + f[4], f[1] + f[5], f[2] + f[6], f[3] + f[7]];
    (a[0] + a[2]) + (a[1] + a[3])
}

/// One weight row (whole super-blocks of `ty`, their scales decoded in `ks`) against one
/// quantized activation row, on `isa`. The caller guarantees the lengths agree.
/// `ks`: the row's scales if decoded already (else each block's are decoded as it comes).
fn dot_row_k_with(ty: GgmlType, isa: Isa, w: &[u8], ks: Option<&[KScales]>, a: &[BlockQ8K]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.vector() {
        // SAFETY: AVX2, FMA, F16C (and for Avx512 its features) detected (Isa::current);
        // lengths as the caller guarantees.
        return unsafe {
            match (ty, ks, isa == Isa::Avx512) {
                (GgmlType::Q4K, None, false) => avx2::q45k_row::<false>(w, a),
                (GgmlType::Q5K, None, false) => avx2::q45k_row::<true>(w, a),
                (GgmlType::Q6K, None, false) => avx2::q6k_row(w, a),
                (GgmlType::Q4K, None, true) => avx2::q45k_row_vnni::<false>(w, a),
                (GgmlType::Q5K, None, true) => avx2::q45k_row_vnni::<true>(w, a),
                (GgmlType::Q6K, None, true) => avx2::q6k_row_vnni(w, a),
                _ => avx2::k_row_tile::<1>(isa, ty, w, ks, [a])[0],
            }
        };
    }
    let _ = isa;
    let mut f = [0f32; 8];
    for (b, (wb, ab)) in w.chunks_exact(ty.type_size()).zip(a).enumerate() {
        let k = &ks.map_or_else(|| k_scales(ty, wb), |v| v[b]);
        fold_k(ty, &mut f, &k_lanes_scalar(ty, wb, k, ab), k, ab);
    }
    hsum8(&f)
}

/// One weight row (whole blocks of `ty`) against one quantized activation row.
/// The caller guarantees the lengths agree (`matmul` checks them).
pub fn dot_row_k(ty: GgmlType, isa: Isa, w: &[u8], a: &[BlockQ8K]) -> f32 {
    dot_row_k_with(ty, isa, w, None, a)
}

/// One weight row of Q8_0 / Q4_0 / Q5_0 blocks against one Q8_0 activation row: each block's
/// lanes ([`zero_lanes_scalar`]) folded into 8 f32 lanes by f += q·(d_w·d_a) (one fused
/// multiply-add), the lanes added once at the end (`hsum8`), as llama.cpp's AVX2 kernels do.
/// The caller guarantees the lengths agree (`matmul` checks them).
pub fn dot_row_0(ty: GgmlType, isa: Isa, w: &[u8], a: &[BlockQ8_0Act]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.vector() {
        let mut state = [[0f32; 8]];
        // SAFETY: the features of `isa` detected (Isa::current); whole blocks.
        unsafe { avx2::zero_tile_state::<1>(isa, ty, w, [a], &mut state) };
        return hsum8(&state[0]);
    }
    let _ = isa;
    let mut f = [0f32; 8];
    for (wb, ab) in w.chunks_exact(ty.type_size()).zip(a) {
        fma_lanes(&mut f, &zero_lanes_scalar(ty, wb, ab), f16_at(wb, 0) * ab.d);
    }
    hsum8(&f)
}

/// Weight rows handled by one task: their bytes stay in cache while every activation row
/// passes by.
const ROWS_PER_TASK: usize = 8;
/// Activation rows per pass over a task's weight rows (16 rows of 4096: 75 KB of Q8_K).
const ACT_TILE: usize = 16;
/// Activation rows per pass of the AVX2 K-quant kernel over one weight row (measured on a
/// Zen 3 with `examples/quant_dot_bench.rs`: 8 rows ran 1.1-1.4x faster than 4, 2, 3 or 6).
const TILE_ROWS: usize = 8;
/// Super-blocks per run along k in the AVX2 K-quant tiles: 8 rows' run of Q8_K activations
/// (8 x 16 x 292 bytes, 37 KB: L1 and the nearest of L2) stays close while the task's weight
/// rows pass over it (runs of 8 to 64 blocks measured alike; the bound matters for long rows).
const K_RUN_BLOCKS: usize = 16;
/// Blocks per run along k in the AVX2 tiles of the 32-value types: as many values as
/// K_RUN_BLOCKS (8 rows' run of Q8_0 activations, 8 x 128 x 36 bytes, 37 KB).
const ZERO_RUN_BLOCKS: usize = K_RUN_BLOCKS * QK_K / QK8_0;
/// Activation rows per pass of the AVX-512 tiles (4 row pairs). 16 rows (8 pairs) measured the
/// same on a Sapphire Rapids core (Q4_K 5% slower, Q6_K 8% faster) but would leave up to 15 rows
/// of a short prompt to the one-row kernels.
const PAIR_TILE_ROWS: usize = 8;
/// Runs along k of the AVX-512 tiles: in super-blocks 4 (4 pairs x 4 x 640 bytes, 10 KB of the
/// 48 KB L1 of a Sapphire Rapids core, the rest for the weight rows passing over it; measured
/// 2-3% faster than 8 and 3-5% faster than 16, whose 41 KB filled it), and in 32-value blocks 64
/// (4 pairs x 64 x 192 bytes, 48 KB; 1.4x faster than 128, and 16, 32 and 64 alike).
const K_PAIR_RUN_BLOCKS: usize = 4;
const ZERO_PAIR_RUN_BLOCKS: usize = 64;
/// Activation rows from which the 32-value types take the wide AVX-512 kernel: below, its
/// per-task repacking of the weight costs about what the kernel saves (quant_dot_bench, 2
/// threads, against the pair kernel: 8 rows Q8_0 level, Q4_0 0.65-0.95x; 16 rows 1.2-1.4x).
const WIDE_MIN_ROWS: usize = 16;
/// Weight rows per task of the wide kernel: one dword of each in a 64-byte vector.
const WIDE_ROWS: usize = 16;
/// Activation rows per pass of the wide kernel over a task's repacked weight, and blocks per run
/// along k: 16 blocks of 16 weight rows (9 KB) and of 8 activation rows (9 KB) stay in L1.
const WIDE_TILE_ROWS: usize = 8;
const WIDE_RUN_BLOCKS: usize = 16;

/// y [n, out] = x [n, k] · W^T, W being `out` rows of `k` values of type `ty` in `w`
/// (row-major, as stored in GGUF). Errors if `ty` has no kernel or the sizes disagree.
pub fn matmul(
    ty: GgmlType,
    w: &[u8],
    out: usize,
    k: usize,
    x: &[f32],
    n: usize,
) -> Result<Vec<f32>, QuantError> {
    matmul_with(Isa::current(), ty, w, out, k, x, n)
}

/// [`matmul`] on a chosen instruction set (the tests compare them).
pub fn matmul_with(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    out: usize,
    k: usize,
    x: &[f32],
    n: usize,
) -> Result<Vec<f32>, QuantError> {
    if !supported(ty) {
        return Err(QuantError::Unsupported(ty));
    }
    let row_bytes = ty.bytes_for(k as u64).map(|b| b as usize);
    let Some(row_bytes) = row_bytes.filter(|&b| b * out == w.len()) else {
        return Err(QuantError::BadLength {
            ty,
            values: k * out,
            bytes: Some(w.len()),
        });
    };
    if x.len() != n * k {
        return Err(QuantError::BadLength {
            ty: GgmlType::F32,
            values: n * k,
            bytes: Some(x.len() * 4),
        });
    }
    let mut y = vec![0f32; n * out];
    if n == 0 || out == 0 {
        return Ok(y);
    }
    let act = quantize_act(isa, ty, x, k);
    // The AVX-512 tiles read activation rows in pairs; the 32-value types' wide kernel, from
    // WIDE_MIN_ROWS rows, reads them one by one against 16 weight rows at once.
    #[cfg(target_arch = "x86_64")]
    let pairs = (isa == Isa::Avx512 && n >= PAIR_TILE_ROWS).then(|| match &act {
        // (Its gathers take i32 offsets within a task's rows.)
        Act::Q8_0(a) if n >= WIDE_MIN_ROWS && WIDE_ROWS * row_bytes <= i32::MAX as usize => {
            Pairs::rows(a)
        }
        _ => Pairs::of(&act, k / ty.block_size(), n),
    });
    #[cfg(not(target_arch = "x86_64"))]
    let pairs: Option<Pairs> = None;
    // A lone activation row (decode) is a pass over the weight's bytes, bound by memory: a few
    // long runs of rows per thread keep the hardware prefetchers streaming.
    let rows_per_task = if n == 1 {
        out.div_ceil(4 * rayon::current_num_threads())
            .max(ROWS_PER_TASK)
    } else if matches!(pairs, Some(Pairs::Rows(_))) {
        WIDE_ROWS
    } else {
        ROWS_PER_TASK
    };
    let y_out = YPtr(y.as_mut_ptr());
    w.par_chunks(row_bytes * rows_per_task)
        .enumerate()
        .for_each(|(t, ws)| {
            // Each task writes y straight in place ([n, out]: no transposed copy), in its own
            // columns.
            let ys = TaskOut {
                y: y_out,
                stride: out,
                r0: t * rows_per_task,
            };
            match &act {
                Act::Q8K(a) => k_task(isa, ty, ws, row_bytes, a, pairs.as_ref(), n, ys),
                Act::Q8_0(a) => zero_task(isa, ty, ws, row_bytes, a, pairs.as_ref(), n, ys),
            }
        });
    Ok(y)
}

/// y's buffer, shared by the tasks of [`matmul`].
#[derive(Clone, Copy)]
struct YPtr(*mut f32);
// SAFETY: the tasks write disjoint elements (their own columns) and y outlives them.
unsafe impl Send for YPtr {}
unsafe impl Sync for YPtr {}

/// Where a task's outputs go: (its weight row r, activation row j) is y[j * stride + r0 + r].
#[derive(Clone, Copy)]
struct TaskOut {
    y: YPtr,
    stride: usize,
    r0: usize,
}

impl TaskOut {
    /// # Safety
    /// r is one of the task's weight rows and j < n (the element lies in y, owned by this task).
    #[inline(always)]
    unsafe fn put(self, r: usize, j: usize, v: f32) {
        *self.at(r, j) = v;
    }

    /// Where output (r, j) goes; the same conditions as [`TaskOut::put`].
    #[inline(always)]
    unsafe fn at(self, r: usize, j: usize) -> *mut f32 {
        self.y.0.add(j * self.stride + self.r0 + r)
    }
}

/// One task of [`matmul`] for a K-quant: its weight rows `ws` against all `n` activation rows
/// `a`, into its columns of y (`ys`). Scales decoded once per task; on AVX2, [`tiles`] of TILE_ROWS
/// activation rows per pass over a weight row (its levels unpacked once for them), else
/// activation rows in tiles that stay in cache while the task's weight rows pass over them. Each
/// output is summed exactly as `dot_row_k` sums it. A lone row (decode) decodes each block's
/// scales as it comes: no buffer.
#[allow(clippy::too_many_arguments)]
fn k_task(
    isa: Isa,
    ty: GgmlType,
    ws: &[u8],
    row_bytes: usize,
    a: &[BlockQ8K],
    pairs: Option<&Pairs>,
    n: usize,
    ys: TaskOut,
) {
    let size = ty.type_size();
    let per_row = row_bytes / size;
    let dec: Vec<KScales> = if n > 1 {
        ws.chunks_exact(size)
            .map(|b| match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2, FMA, F16C detected; b is one whole block.
                Isa::Avx2 | Isa::Avx512 => unsafe { avx2::k_scales_fast(ty, b.as_ptr()) },
                _ => k_scales(ty, b),
            })
            .collect()
    } else {
        vec![]
    };
    #[cfg(target_arch = "x86_64")]
    if n > 1 && isa.vector() {
        let one = |r: usize, j: usize| {
            let (wr, kd) = (
                &ws[r * row_bytes..(r + 1) * row_bytes],
                &dec[r * per_row..(r + 1) * per_row],
            );
            dot_row_k_with(ty, isa, wr, Some(kd), &a[j * per_row..(j + 1) * per_row])
        };
        if let Some(Pairs::K(p)) = pairs {
            // Q5_K, Q6_K: the task's levels unpacked once, not once per activation tile
            // (quant_dot_bench on a Sapphire Rapids core: Q6_K 1.11x, Q5_K 1.07x; Q4_K, whose
            // unpacking is two operations per 32 levels, measured no gain, so it reads its
            // blocks).
            let lv = avx512::unpacks_levels(ty).then(|| {
                let mut lv = vec![0u8; ws.len() / size * avx512::LEVELS_BYTES];
                // SAFETY: Isa::Avx512 detected (pairs are made only for it); whole blocks.
                unsafe { avx512::unpack_levels(ty, ws, &mut lv) };
                lv
            });
            let w = lv.as_deref().unwrap_or(ws);
            // Every weight row of the task in one call.
            let tile = |b0: usize, b1: usize, j0: usize, states: &mut [_]| {
                let at = |i: usize| (j0 / 2 + i) * per_row;
                let acts = std::array::from_fn(|i| &p[at(i) + b0..at(i) + b1]);
                // SAFETY: Isa::Avx512 detected (pairs are made only for it); whole blocks.
                unsafe { avx512::k_pairs_rows(ty, w, &dec, per_row, (b0, b1), acts, states) };
            };
            let rows = ws.len() / row_bytes;
            let run = K_PAIR_RUN_BLOCKS;
            return tiles::<PAIR_TILE_ROWS>(rows, per_row, run, n, 2, ys, tile, one);
        }
        let tile = |r: usize, b0: usize, b1: usize, j0: usize, st: &mut [[f32; 8]; TILE_ROWS]| {
            let wr = &ws[r * row_bytes + b0 * size..r * row_bytes + b1 * size];
            let kd = &dec[r * per_row + b0..r * per_row + b1];
            let acts =
                std::array::from_fn(|i| &a[(j0 + i) * per_row + b0..(j0 + i) * per_row + b1]);
            // SAFETY: the features of `isa` detected by the caller; whole super-blocks.
            unsafe { avx2::k_row_tile_state::<TILE_ROWS>(isa, ty, wr, Some(kd), acts, st) };
        };
        return tiles(
            ws.len() / row_bytes,
            per_row,
            K_RUN_BLOCKS,
            n,
            1,
            ys,
            each_row(tile),
            one,
        );
    }
    for j0 in (0..n).step_by(ACT_TILE) {
        let j1 = (j0 + ACT_TILE).min(n);
        for (r, wr) in ws.chunks_exact(row_bytes).enumerate() {
            let kd = (n > 1).then(|| &dec[r * per_row..(r + 1) * per_row]);
            for j in j0..j1 {
                let v = dot_row_k_with(ty, isa, wr, kd, &a[j * per_row..(j + 1) * per_row]);
                // SAFETY: r is a row of this task, j < n.
                unsafe { ys.put(r, j, v) };
            }
        }
    }
}

/// One task of [`matmul`] for Q8_0 / Q4_0 / Q5_0 weights, as [`k_task`]: on AVX2 in [`tiles`]
/// (each block's levels unpacked once for TILE_ROWS activation rows), else row by row; each
/// output summed exactly as `dot_row_0` sums it.
#[allow(clippy::too_many_arguments)]
fn zero_task(
    isa: Isa,
    ty: GgmlType,
    ws: &[u8],
    row_bytes: usize,
    a: &[BlockQ8_0Act],
    pairs: Option<&Pairs>,
    n: usize,
    ys: TaskOut,
) {
    let size = ty.type_size();
    let per_row = row_bytes / size;
    #[cfg(target_arch = "x86_64")]
    if n > 1 && isa.vector() {
        let one = |r: usize, j: usize| {
            let wr = &ws[r * row_bytes..(r + 1) * row_bytes];
            dot_row_0(ty, isa, wr, &a[j * per_row..(j + 1) * per_row])
        };
        if let Some(Pairs::Rows(a)) = pairs {
            return wide_task(ty, ws, row_bytes, a, n, ys);
        }
        if let Some(Pairs::Zero(p)) = pairs {
            let tile = |r: usize, b0: usize, b1: usize, j0: usize, st: &mut _| {
                let wr = &ws[r * row_bytes + b0 * size..r * row_bytes + b1 * size];
                let at = |i: usize| (j0 / 2 + i) * per_row;
                let acts = std::array::from_fn(|i| &p[at(i) + b0..at(i) + b1]);
                // SAFETY: Isa::Avx512 detected (pairs are made only for it); whole blocks.
                unsafe { avx512::zero_pairs_state(ty, wr, acts, st) };
            };
            let rows = ws.len() / row_bytes;
            let run = ZERO_PAIR_RUN_BLOCKS;
            return tiles::<PAIR_TILE_ROWS>(rows, per_row, run, n, 2, ys, each_row(tile), one);
        }
        let tile = |r: usize, b0: usize, b1: usize, j0: usize, st: &mut [[f32; 8]; TILE_ROWS]| {
            let wr = &ws[r * row_bytes + b0 * size..r * row_bytes + b1 * size];
            let acts =
                std::array::from_fn(|i| &a[(j0 + i) * per_row + b0..(j0 + i) * per_row + b1]);
            // SAFETY: the features of `isa` detected by the caller; whole blocks.
            unsafe { avx2::zero_tile_state::<TILE_ROWS>(isa, ty, wr, acts, st) };
        };
        return tiles(
            ws.len() / row_bytes,
            per_row,
            ZERO_RUN_BLOCKS,
            n,
            1,
            ys,
            each_row(tile),
            one,
        );
    }
    for j in 0..n {
        for (r, wr) in ws.chunks_exact(row_bytes).enumerate() {
            let v = dot_row_0(ty, isa, wr, &a[j * per_row..(j + 1) * per_row]);
            // SAFETY: r is a row of this task, j < n.
            unsafe { ys.put(r, j, v) };
        }
    }
}

/// [`zero_task`] on AVX-512 for many activation rows: the task's (up to 16) weight rows repacked
/// once, then WIDE_TILE_ROWS activation rows at a time, in runs along k, by the wide kernel
/// (`avx512::zero_wide`), which keeps every output's 8 lanes and folds as `dot_row_0` does.
#[cfg(target_arch = "x86_64")]
fn wide_task(ty: GgmlType, ws: &[u8], row_bytes: usize, a: &[RowQ8_0], n: usize, ys: TaskOut) {
    use avx512::{WideBlock, WideState};
    thread_local! {
        // The repacked weight, reused by the thread's next tasks: no allocation (and no fresh
        // pages) per task.
        static WIDE: std::cell::RefCell<Vec<WideBlock>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let per_row = row_bytes / ty.type_size();
    let rows = ws.len() / row_bytes;
    WIDE.with_borrow_mut(|w| {
        // SAFETY: Isa::Avx512 detected (Pairs::Rows is made only for it); the caller's rows
        // (WIDE_ROWS at most, their offsets within i32: matmul's choice).
        unsafe { avx512::wide_blocks(ty, ws, row_bytes, w) };
        let mut state = [WideState::default(); WIDE_TILE_ROWS];
        for j0 in (0..n).step_by(WIDE_TILE_ROWS) {
            let j1 = (j0 + WIDE_TILE_ROWS).min(n);
            let st = &mut state[..j1 - j0];
            st.fill(WideState::default());
            for b0 in (0..per_row).step_by(WIDE_RUN_BLOCKS) {
                let b1 = (b0 + WIDE_RUN_BLOCKS).min(per_row);
                let act = |j: usize| &a[j * per_row + b0..j * per_row + b1];
                let mut j = j0;
                while j < j1 {
                    let at = j - j0;
                    // SAFETY: Isa::Avx512 detected (Pairs::Rows is made only for it); w and the
                    // activations hold the same blocks b0..b1.
                    unsafe {
                        if j + 2 <= j1 {
                            let two: &mut [WideState; 2] =
                                (&mut st[at..at + 2]).try_into().expect("two");
                            avx512::zero_wide::<2>(&w[b0..b1], [act(j), act(j + 1)], two);
                        } else {
                            let one: &mut [WideState; 1] =
                                (&mut st[at..at + 1]).try_into().expect("one");
                            avx512::zero_wide::<1>(&w[b0..b1], [act(j)], one);
                        }
                    }
                    j += 2;
                }
            }
            for (i, s) in st.iter().enumerate() {
                // SAFETY: the task's rows 0..rows of y's row j0 + i are its own, j0 + i < n.
                unsafe { avx512::wide_out(s, rows, ys.at(0, j0 + i)) };
            }
        }
    });
}

/// `rows` weight rows (of `per_row` blocks) against all `n` activation rows, into their
/// columns of y (`ys`): C activation rows at a time, and along k in runs of `run` blocks, so
/// that the C rows' run of activations stays close while every weight row passes over it.
/// `tile(b0, b1, j0, states)` continues, for every row r, the 8 f32 lanes of outputs
/// (r, j0..j0 + C) in `states[r]` over blocks b0..b1 (the fold is sequential per block, so runs
/// give the bits of one pass);
/// `one(r, j)` is the whole output for the activation rows left over. The rows past the last
/// whole tile go through one more tile ending at row n (its start a multiple of `align`, as row
/// pairs need), which computes a few rows again, to the same bits: one pass over the weight
/// instead of one per row left.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn tiles<const C: usize>(
    rows: usize,
    per_row: usize,
    run: usize,
    n: usize,
    align: usize,
    ys: TaskOut,
    tile: impl Fn(usize, usize, usize, &mut [[[f32; 8]; C]]),
    one: impl Fn(usize, usize) -> f32,
) {
    let mut state = vec![[[0f32; 8]; C]; rows];
    let starts = (0..n / C).map(|t| t * C);
    let last = (!n.is_multiple_of(C) && n >= C).then(|| (n - C) / align * align);
    let mut done = 0;
    for j0 in starts.chain(last) {
        state.iter_mut().for_each(|s| *s = [[0f32; 8]; C]);
        for b0 in (0..per_row).step_by(run) {
            let b1 = (b0 + run).min(per_row);
            tile(b0, b1, j0, &mut state);
        }
        // Each group of 8 weight rows: an activation row's 8 outputs, contiguous in y, summed
        // and stored together; the rows after the last group one by one.
        let groups = state.chunks_exact(8);
        let rest = groups.remainder().len();
        for (g, st) in groups.enumerate() {
            let st: &[[[f32; 8]; C]; 8] = st.try_into().expect("chunks of 8");
            for i in 0..C {
                let m = st.each_ref().map(|r| &r[i]);
                // SAFETY: tiles run only on an ISA with AVX2 (the callers' `isa.vector()`); the
                // task's columns 8g..8g + 8 of row j0 + i of y are its own, j0 + i < n.
                unsafe { avx2::hsum8_x8(m, ys.at(8 * g, j0 + i)) };
            }
        }
        for (r, st) in state.iter().enumerate().skip(rows - rest) {
            for (i, s) in st.iter().enumerate() {
                // SAFETY: r < rows of this task, j0 + i < n.
                unsafe { ys.put(r, j0 + i, hsum8(s)) };
            }
        }
        done = j0 + C;
    }
    for j in done..n {
        for r in 0..rows {
            // SAFETY: as above.
            unsafe { ys.put(r, j, one(r, j)) };
        }
    }
}

/// A [`tiles`] tile made of a per-row one, `tile(r, b0, b1, j0, state of row r)`: row after row.
#[cfg(target_arch = "x86_64")]
fn each_row<const C: usize>(
    tile: impl Fn(usize, usize, usize, usize, &mut [[f32; 8]; C]),
) -> impl Fn(usize, usize, usize, &mut [[[f32; 8]; C]]) {
    move |b0, b1, j0, states| {
        for (r, st) in states.iter_mut().enumerate() {
            tile(r, b0, b1, j0, st)
        }
    }
}

// ---- AVX-512 (row pairs), AVX2 ----------------------------------------------------------------

/// What a kernel's const parameter `T` stands for: a K-quant (`KQ4`, `KQ5`, `KQ6`), or a 32-value
/// type (0 Q8_0, 1 Q4_0, 2 Q5_0); block sizes come from `GgmlType::type_size`.
const KQ4: u8 = 0;
const KQ5: u8 = 1;
const KQ6: u8 = 2;

fn k_type(t: u8) -> GgmlType {
    match t {
        KQ6 => GgmlType::Q6K,
        KQ5 => GgmlType::Q5K,
        _ => GgmlType::Q4K,
    }
}

fn zero_type(t: u8) -> GgmlType {
    match t {
        0 => GgmlType::Q8_0,
        1 => GgmlType::Q4_0,
        _ => GgmlType::Q5_0,
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;
/// The 8x8 transpose of f32 vectors, shared with `float_dot`'s AVX2 kernels.
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::transpose8;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The integer sums of one block with 32-byte vectors: `maddubs` multiplies unsigned weight
    //! levels by signed activations and adds pairs into i16 (no saturation: |levels| <= 63,
    //! |activations| <= 127), `madd` by the sub-block scale (or 1) adds pairs into i32.
    //! Each kernel has a VNNI form (`V`, entry points `*_vnni`, for `Isa::Avx512`): `madd` and
    //! the add after it become one vpdpwssd, maddubs + madd by 1 one vpdpbusd. Integer sums in
    //! the same lanes, so the same bits.
    //! Safety: callers run these only after detecting AVX2 (and for the VNNI forms AVX-512 VNNI
    //! and VL); the slices have the block's size.
    use super::{BlockQ8K, BlockQ8_0Act, GgmlType, Isa, KScales};
    use std::arch::x86_64::*;

    /// acc plus the products of the i16 pairs of `p` and `s` added in pairs into i32 lanes.
    /// The VNNI form is written as assembly: from the intrinsic, LLVM's generic tuning (no -mcpu)
    /// splits vpdpwssd back into vpmaddwd and vpaddd.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn madd_acc<const V: bool>(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        if V {
            let mut acc = acc;
            std::arch::asm!(
                "vpdpwssd {acc}, {p}, {s}",
                acc = inout(ymm_reg) acc,
                p = in(ymm_reg) p,
                s = in(ymm_reg) s,
                options(pure, nomem, nostack),
            );
            acc
        } else {
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
        }
    }

    /// Unsigned bytes `u` times signed bytes `s`, 4 neighbouring products summed per i32 lane
    /// (the callers' pairs fit i16, so maddubs does not saturate and both forms agree).
    #[inline(always)]
    unsafe fn dot4<const V: bool>(u: __m256i, s: __m256i) -> __m256i {
        if V {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    /// The f16 at `p` widened to f32 in all 8 lanes. Every lane is used (each product with a
    /// broadcast activation scale is a full-width multiply): converting one lane and broadcasting
    /// it let the compiler insert the f16 into whatever register it chose, the row's accumulator
    /// included, which chained every block to the previous block's sum (a false dependency).
    #[inline(always)]
    unsafe fn f16_lanes(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_set1_epi16(p.cast::<i16>().read_unaligned()))
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Bits 2k..2k+1 of each byte of `hb`, moved to bits 4..5.
    #[inline(always)]
    unsafe fn hbits(hb: __m256i, k: usize) -> __m256i {
        let s = match k {
            0 => _mm256_slli_epi16(hb, 4),
            1 => _mm256_slli_epi16(hb, 2),
            2 => hb,
            _ => _mm256_srli_epi16(hb, 2),
        };
        _mm256_and_si256(s, _mm256_set1_epi8(0x30))
    }

    /// `super::k4_scales_mins` of the Q4_K block at `wb`.
    #[inline(always)]
    unsafe fn scale_words(wb: *const u8) -> (u64, u64) {
        let word = |i: usize| wb.add(i).cast::<u32>().read_unaligned();
        super::k4_scales_mins(word(4), word(8), word(12))
    }

    /// Ask for `lines` cache lines of the weight `PREFETCH_BYTES` past the block at `wb` (a
    /// hint, never a fault, also past the end of the slice).
    #[inline(always)]
    pub(super) unsafe fn prefetch_ahead(wb: *const u8, lines: usize) {
        let ahead = wb.wrapping_add(PREFETCH_BYTES);
        for line in 0..lines {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
        }
    }

    /// The four 32-value groups of levels (0..63) of half `h` of a Q6_K block (`ql`, `qh` its
    /// low-nibble and high-bit arrays), in the order of the activations they meet.
    #[inline(always)]
    pub(super) unsafe fn q6k_levels(ql: *const u8, qh: *const u8, h: usize) -> [__m256i; 4] {
        let m4 = _mm256_set1_epi8(0xF);
        let lo = load(ql.add(64 * h));
        let hi = load(ql.add(64 * h + 32));
        let hb = load(qh.add(32 * h));
        [
            _mm256_or_si256(_mm256_and_si256(lo, m4), hbits(hb, 0)),
            _mm256_or_si256(_mm256_and_si256(hi, m4), hbits(hb, 1)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo, 4), m4), hbits(hb, 2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(hi, 4), m4), hbits(hb, 3)),
        ]
    }

    /// `super::k_scales` for Q4_K / Q5_K / Q6_K with vector widening and F16C (the same values: the
    /// tests compare them); the block at `wb` has the type's size.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn k_scales_fast(ty: GgmlType, wb: *const u8) -> KScales {
        let mut k = KScales {
            d: 0.0,
            dmin: 0.0,
            sc: [0; 16],
            m16: [0; 16],
        };
        let sc = k.sc.as_mut_ptr() as *mut __m256i;
        if ty == GgmlType::Q6K {
            let h = _mm_cvtph_ps(_mm_cvtsi32_si128(
                wb.add(208).cast::<u16>().read_unaligned() as i32,
            ));
            k.d = _mm_cvtss_f32(h);
            let bytes = _mm_loadu_si128(wb.add(192) as *const __m128i);
            _mm256_storeu_si256(sc, _mm256_cvtepi8_epi16(bytes));
        } else {
            let h = _mm_cvtph_ps(_mm_cvtsi32_si128(wb.cast::<i32>().read_unaligned()));
            k.d = _mm_cvtss_f32(h);
            k.dmin = _mm_cvtss_f32(_mm_shuffle_ps(h, h, 1));
            let (scw, m) = scale_words(wb);
            _mm256_storeu_si256(sc, _mm256_cvtepu8_epi16(_mm_cvtsi64_si128(scw as i64)));
            let mb = _mm_cvtsi64_si128(m as i64);
            _mm256_storeu_si256(
                k.m16.as_mut_ptr() as *mut __m256i,
                _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mb, mb)),
            );
        }
        k
    }

    /// Byte masks for `_mm256_shuffle_epi8` that broadcast one i16 of each 128-bit half: word
    /// `w` of the low half to the low 8 words, word `v` of the high half to the high 8 words.
    #[inline(always)]
    unsafe fn word_mask(w: i8, v: i8) -> __m256i {
        let m: [i8; 32] = std::array::from_fn(|i| 2 * if i < 16 { w } else { v } + (i & 1) as i8);
        _mm256_loadu_si256(m.as_ptr().cast())
    }

    /// Bit k of each byte of `hb` moved to bit 4 (Q5_K's fifth bit of sub-block k).
    #[inline(always)]
    unsafe fn fifth_bit(hb: __m256i, k: usize) -> __m256i {
        let s = match k {
            0 => _mm256_slli_epi16(hb, 4),
            1 => _mm256_slli_epi16(hb, 3),
            2 => _mm256_slli_epi16(hb, 2),
            3 => _mm256_slli_epi16(hb, 1),
            4 => hb,
            5 => _mm256_srli_epi16(hb, 1),
            6 => _mm256_srli_epi16(hb, 2),
            _ => _mm256_srli_epi16(hb, 3),
        };
        _mm256_and_si256(s, _mm256_set1_epi8(0x10))
    }

    /// The two 32-value groups of levels of chunk c (0..4) of a Q4_K block (`Q5`: Q5_K, the fifth
    /// bits from `hb`, its qh array) whose nibbles are at `qs`: low nibbles (sub-block 2c), then
    /// high nibbles (2c + 1). (`q5` a constant at every call, folded once inlined.)
    #[inline(always)]
    pub(super) unsafe fn k45_levels(
        q5: bool,
        qs: *const u8,
        hb: __m256i,
        c: usize,
    ) -> [__m256i; 2] {
        let m4 = _mm256_set1_epi8(0xF);
        let v = load(qs.add(32 * c));
        let lo = _mm256_and_si256(v, m4);
        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        if q5 {
            [
                _mm256_or_si256(lo, fifth_bit(hb, 2 * c)),
                _mm256_or_si256(hi, fifth_bit(hb, 2 * c + 1)),
            ]
        } else {
            [lo, hi]
        }
    }

    /// One weight row of Q4_K (`Q5`: Q5_K) against one activation row (decode):
    /// `tile::<1, _>` with the scales decoded in registers and everything held in registers, the
    /// same lanes and folds. The decode is bound by the weight stream and by the core's own work
    /// per block, so the sub-block scales are broadcast by shuffles from one vector (one op each)
    /// rather than moved in from integer registers (two).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q45k_row<const Q5: bool>(w: &[u8], a: &[BlockQ8K]) -> f32 {
        q45k_row_body::<Q5, false>(w, a)
    }

    /// [`q45k_row`] with VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn q45k_row_vnni<const Q5: bool>(w: &[u8], a: &[BlockQ8K]) -> f32 {
        q45k_row_body::<Q5, true>(w, a)
    }

    #[inline(always)]
    unsafe fn q45k_row_body<const Q5: bool, const V: bool>(w: &[u8], a: &[BlockQ8K]) -> f32 {
        let size = if Q5 { GgmlType::Q5K } else { GgmlType::Q4K }.type_size();
        let blocks = (w.len() / size).min(a.len());
        // Chunk c's two scales are words 2c and 2c + 1 of the 8: low half of `sc` twice.
        let masks: [__m256i; 8] = std::array::from_fn(|j| word_mask(j as i8, j as i8));
        let mut f = _mm256_setzero_ps();
        for (b, ab) in a.iter().enumerate().take(blocks) {
            let wb = w.as_ptr().add(b * size);
            prefetch_ahead(wb, 3);
            let h = _mm_cvtph_ps(_mm_cvtsi32_si128(wb.cast::<i32>().read_unaligned()));
            let (d, dmin) = (_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_shuffle_ps(h, h, 1)));
            let (sc, m) = scale_words(wb);
            let sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
            let scv = _mm256_setr_m128i(sc16, sc16);
            let mb = _mm_cvtsi64_si128(m as i64);
            let m16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mb, mb));
            let aq = ab.qs.as_ptr() as *const u8;
            let (qs, hb) = if Q5 {
                (wb.add(48), load(wb.add(16)))
            } else {
                (wb.add(16), _mm256_setzero_si256())
            };
            let mut q = _mm256_setzero_si256();
            for c in 0..4 {
                let [lo, hi] = k45_levels(Q5, qs, hb, c);
                let s1 = _mm256_shuffle_epi8(scv, masks[2 * c]);
                let s2 = _mm256_shuffle_epi8(scv, masks[2 * c + 1]);
                let p1 = _mm256_maddubs_epi16(lo, load(aq.add(64 * c)));
                let p2 = _mm256_maddubs_epi16(hi, load(aq.add(64 * c + 32)));
                q = madd_acc::<V>(madd_acc::<V>(q, p1, s1), p2, s2);
            }
            let bs =
                _mm256_madd_epi16(m16, _mm256_loadu_si256(ab.bsums.as_ptr() as *const __m256i));
            f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(d * ab.d), f);
            f = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(bs), _mm256_set1_ps(dmin * ab.d), f);
        }
        hsum8(f)
    }

    /// One weight row of Q6_K against one activation row (decode): `tile::<1, true>` with the
    /// scales widened in registers, the same lanes and fold; each group's pair of scales is
    /// shuffled out of the widened scales (see `q45k_row`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6k_row(w: &[u8], a: &[BlockQ8K]) -> f32 {
        q6k_row_body::<false>(w, a)
    }

    /// [`q6k_row`] with VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn q6k_row_vnni(w: &[u8], a: &[BlockQ8K]) -> f32 {
        q6k_row_body::<true>(w, a)
    }

    #[inline(always)]
    unsafe fn q6k_row_body<const V: bool>(w: &[u8], a: &[BlockQ8K]) -> f32 {
        let blocks = (w.len() / GgmlType::Q6K.type_size()).min(a.len());
        // Group kk of a half: scales 2kk (i16 lanes 0..7) and 2kk + 1 (lanes 8..15) of that
        // half's 8, which `halves` puts in both 128-bit lanes.
        let masks: [__m256i; 4] =
            std::array::from_fn(|kk| word_mask(2 * kk as i8, 2 * kk as i8 + 1));
        let mut f = _mm256_setzero_ps();
        for (b, ab) in a.iter().enumerate().take(blocks) {
            let wb = w.as_ptr().add(b * 210);
            prefetch_ahead(wb, 4);
            let d = f16_lanes(wb.add(208));
            let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(192) as *const __m128i));
            let halves = [
                _mm256_permute4x64_epi64::<0b01_00_01_00>(sc),
                _mm256_permute4x64_epi64::<0b11_10_11_10>(sc),
            ];
            let aq = ab.qs.as_ptr() as *const u8;
            let (ql, qh) = (wb, wb.add(128));
            let mut q = _mm256_setzero_si256();
            for (h, half) in halves.iter().enumerate() {
                for (kk, &l) in q6k_levels(ql, qh, h).iter().enumerate() {
                    let scv = _mm256_shuffle_epi8(*half, masks[kk]);
                    let p = _mm256_maddubs_epi16(l, load(aq.add(128 * h + 32 * kk)));
                    q = madd_acc::<V>(q, p, scv);
                }
            }
            let bs = _mm256_madd_epi16(sc, _mm256_loadu_si256(ab.bsums.as_ptr() as *const __m256i));
            let qj = _mm256_sub_epi32(q, _mm256_slli_epi32(bs, 5));
            f = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(qj),
                _mm256_mul_ps(d, _mm256_set1_ps(ab.d)),
                f,
            );
        }
        hsum8(f)
    }

    /// `super::hsum8` of each of 8 lane sets, the 8 sums stored at `out..out + 8`: the sets as
    /// the rows of an 8 x 8 matrix, transposed, then hsum8's additions on whole columns in
    /// hsum8's order (so each sum has its bits). One task's 8 outputs of one activation row,
    /// contiguous in y, in one store.
    #[target_feature(enable = "avx2")]
    pub unsafe fn hsum8_x8(m: [&[f32; 8]; 8], out: *mut f32) {
        let c = transpose8(std::array::from_fn(|i| _mm256_loadu_ps(m[i].as_ptr())));
        let a: [__m256; 4] = std::array::from_fn(|j| _mm256_add_ps(c[j], c[j + 4]));
        let h = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
        _mm256_storeu_ps(out, h);
    }

    /// The 8x8 transpose: lane j of result i is lane i of input j.
    #[inline(always)]
    pub(crate) unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// How far ahead of the block being summed `tile` prefetches the weight (prefetching past
    /// the end of the slice is harmless: a hint, never a fault).
    const PREFETCH_BYTES: usize = 3072;

    /// The 8 lanes added as `super::hsum8` adds them.
    #[inline(always)]
    unsafe fn hsum8(f: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
        let u = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps(u, u, 1)))
    }

    /// One weight row of Q4_K, Q5_K or Q6_K super-blocks (scales decoded in `ks`) against C
    /// activation rows: the lanes of `super::Lanes`, folded as `super::fold_k`, added as
    /// `super::hsum8`, so each output equals the scalar `dot_row_k` bit for bit. The weight's
    /// levels are unpacked once per block for the C rows.
    pub unsafe fn k_row_tile<const C: usize>(
        isa: Isa,
        ty: GgmlType,
        w: &[u8],
        ks: Option<&[KScales]>,
        a: [&[BlockQ8K]; C],
    ) -> [f32; C] {
        let mut state = [[0f32; 8]; C];
        k_row_tile_state(isa, ty, w, ks, a, &mut state);
        std::array::from_fn(|j| super::hsum8(&state[j]))
    }

    /// [`k_row_tile`] over some of a row's super-blocks, continuing the 8 f32 lanes of each
    /// output in `state` (the fold is sequential per block, so a row summed in several calls over
    /// consecutive runs of blocks gives the bits of one call).
    pub unsafe fn k_row_tile_state<const C: usize>(
        isa: Isa,
        ty: GgmlType,
        w: &[u8],
        ks: Option<&[KScales]>,
        a: [&[BlockQ8K]; C],
        state: &mut [[f32; 8]; C],
    ) {
        if isa == Isa::Avx512 {
            k_state_vnni(ty, w, ks, a, state)
        } else {
            k_state(ty, w, ks, a, state)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn k_state<const C: usize>(
        ty: GgmlType,
        w: &[u8],
        ks: Option<&[KScales]>,
        a: [&[BlockQ8K]; C],
        state: &mut [[f32; 8]; C],
    ) {
        match ty {
            GgmlType::Q6K => tile::<C, Q6, false>(w, ks, a, state),
            GgmlType::Q5K => tile::<C, Q5, false>(w, ks, a, state),
            _ => tile::<C, Q4, false>(w, ks, a, state),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn k_state_vnni<const C: usize>(
        ty: GgmlType,
        w: &[u8],
        ks: Option<&[KScales]>,
        a: [&[BlockQ8K]; C],
        state: &mut [[f32; 8]; C],
    ) {
        match ty {
            GgmlType::Q6K => tile::<C, Q6, true>(w, ks, a, state),
            GgmlType::Q5K => tile::<C, Q5, true>(w, ks, a, state),
            _ => tile::<C, Q4, true>(w, ks, a, state),
        }
    }

    use super::{k_type, zero_type, KQ4 as Q4, KQ5 as Q5, KQ6 as Q6};

    #[inline(always)]
    unsafe fn tile<const C: usize, const T: u8, const V: bool>(
        w: &[u8],
        ks: Option<&[KScales]>,
        a: [&[BlockQ8K]; C],
        state: &mut [[f32; 8]; C],
    ) {
        let ty = k_type(T);
        let size = ty.type_size();
        let blocks = w.len() / size;
        debug_assert!(a.iter().all(|r| r.len() >= blocks) && ks.is_none_or(|k| k.len() >= blocks));
        let mut f: [__m256; C] = std::array::from_fn(|j| _mm256_loadu_ps(state[j].as_ptr()));
        for b in 0..blocks {
            // Decoded once per task for tiles; per block here for a lone row (no buffer).
            let wb = w.as_ptr().add(b * size);
            // The weight is a stream read once (per tile): ask for the bytes a few blocks ahead,
            // or each block's first touch waits for memory (decode is bound by it).
            prefetch_ahead(wb, size.div_ceil(64));
            let k = &match ks {
                Some(v) => v[b],
                None => k_scales_fast(ty, wb),
            };
            let aq: [*const u8; C] = std::array::from_fn(|j| a[j][b].qs.as_ptr() as *const u8);
            let mut q = [_mm256_setzero_si256(); C];
            if T == Q6 {
                let (ql, qh) = (wb, wb.add(128));
                for h in 0..2 {
                    for (kk, &l) in q6k_levels(ql, qh, h).iter().enumerate() {
                        // i16 lanes 0..7 hold values 0..15 (sub-block 2kk), 8..15 values 16..31.
                        let scv = _mm256_setr_m128i(
                            _mm_set1_epi16(k.sc[8 * h + 2 * kk]),
                            _mm_set1_epi16(k.sc[8 * h + 2 * kk + 1]),
                        );
                        for j in 0..C {
                            let p = _mm256_maddubs_epi16(l, load(aq[j].add(128 * h + 32 * kk)));
                            q[j] = madd_acc::<V>(q[j], p, scv);
                        }
                    }
                }
            } else {
                let (qs, hb) = if T == Q5 {
                    (wb.add(48), load(wb.add(16)))
                } else {
                    (wb.add(16), _mm256_setzero_si256())
                };
                for c in 0..4 {
                    let [lo, hi] = k45_levels(T == Q5, qs, hb, c);
                    let s1 = _mm256_set1_epi16(k.sc[2 * c]);
                    let s2 = _mm256_set1_epi16(k.sc[2 * c + 1]);
                    for j in 0..C {
                        let p1 = _mm256_maddubs_epi16(lo, load(aq[j].add(64 * c)));
                        let p2 = _mm256_maddubs_epi16(hi, load(aq[j].add(64 * c + 32)));
                        q[j] = madd_acc::<V>(madd_acc::<V>(q[j], p1, s1), p2, s2);
                    }
                }
            }
            // Q6_K: lanes less 32·sc·bsum; Q4_K, Q5_K: the mins' lanes m·bsum, folded apart.
            let per_sub = _mm256_loadu_si256(if T == Q6 {
                k.sc.as_ptr()
            } else {
                k.m16.as_ptr()
            } as *const __m256i);
            for j in 0..C {
                let ab = &a[j][b];
                let bs = _mm256_madd_epi16(
                    per_sub,
                    _mm256_loadu_si256(ab.bsums.as_ptr() as *const __m256i),
                );
                let dq = _mm256_set1_ps(k.d * ab.d);
                if T == Q6 {
                    let qj = _mm256_sub_epi32(q[j], _mm256_slli_epi32(bs, 5));
                    f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qj), dq, f[j]);
                } else {
                    f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[j]), dq, f[j]);
                    let dm = _mm256_set1_ps(k.dmin * ab.d);
                    f[j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(bs), dm, f[j]);
                }
            }
        }
        for j in 0..C {
            _mm256_storeu_ps(state[j].as_mut_ptr(), f[j]);
        }
    }

    /// The 32 signed levels of a Q8_0 / Q4_0 / Q5_0 block (T: 0, 1, 2), in value order.
    #[inline(always)]
    unsafe fn zero_levels<const T: u8>(wb: *const u8) -> __m256i {
        if T == 0 {
            return load(wb.add(2));
        }
        let qs = _mm_loadu_si128(wb.add(if T == 1 { 2 } else { 6 }) as *const __m128i);
        let nib = _mm256_and_si256(
            _mm256_setr_m128i(qs, _mm_srli_epi16(qs, 4)),
            _mm256_set1_epi8(0xF),
        );
        if T == 1 {
            return _mm256_sub_epi8(nib, _mm256_set1_epi8(8));
        }
        // Q5_0: bit i of qh to byte i (byte i of `bytes` is byte i / 8 of qh; 1 << i % 8 tests it).
        let qh = wb.add(2).cast::<i32>().read_unaligned();
        let pick: [i8; 32] = std::array::from_fn(|i| (i / 8) as i8);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh), load(pick.as_ptr().cast()));
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
        let fifth = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
        _mm256_sub_epi8(_mm256_or_si256(nib, fifth), _mm256_set1_epi8(16))
    }

    /// Q8_0 / Q4_0 / Q5_0 weight blocks against C activation rows of Q8_0 blocks, continuing the
    /// 8 f32 lanes of each output in `state`: the lanes of `super::zero_lanes_scalar` (signed x
    /// signed by maddubs of |level| and the activation with the level's sign: no saturation,
    /// |level| <= 128 and |a| <= 127), folded as `super::dot_row_0` folds them.
    pub unsafe fn zero_tile_state<const C: usize>(
        isa: Isa,
        ty: GgmlType,
        w: &[u8],
        a: [&[BlockQ8_0Act]; C],
        state: &mut [[f32; 8]; C],
    ) {
        if isa == Isa::Avx512 {
            zero_state_vnni(ty, w, a, state)
        } else {
            zero_state(ty, w, a, state)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn zero_state<const C: usize>(
        ty: GgmlType,
        w: &[u8],
        a: [&[BlockQ8_0Act]; C],
        state: &mut [[f32; 8]; C],
    ) {
        match ty {
            GgmlType::Q8_0 => zero_tile::<C, 0, false>(w, a, state),
            GgmlType::Q4_0 => zero_tile::<C, 1, false>(w, a, state),
            _ => zero_tile::<C, 2, false>(w, a, state),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn zero_state_vnni<const C: usize>(
        ty: GgmlType,
        w: &[u8],
        a: [&[BlockQ8_0Act]; C],
        state: &mut [[f32; 8]; C],
    ) {
        match ty {
            GgmlType::Q8_0 => zero_tile::<C, 0, true>(w, a, state),
            GgmlType::Q4_0 => zero_tile::<C, 1, true>(w, a, state),
            _ => zero_tile::<C, 2, true>(w, a, state),
        }
    }

    #[inline(always)]
    unsafe fn zero_tile<const C: usize, const T: u8, const V: bool>(
        w: &[u8],
        a: [&[BlockQ8_0Act]; C],
        state: &mut [[f32; 8]; C],
    ) {
        let size = zero_type(T).type_size();
        let blocks = w.len() / size;
        // Checked once here so that the loop reads without a check per block and row.
        assert!(a.iter().all(|r| r.len() >= blocks));
        let mut f: [__m256; C] = std::array::from_fn(|j| _mm256_loadu_ps(state[j].as_ptr()));
        for b in 0..blocks {
            let wb = w.as_ptr().add(b * size);
            prefetch_ahead(wb, 1);
            let dw = f16_lanes(wb);
            let lv = zero_levels::<T>(wb);
            let mag = _mm256_sign_epi8(lv, lv);
            for j in 0..C {
                let ab = a[j].get_unchecked(b);
                let av = _mm256_sign_epi8(load(ab.qs.as_ptr() as *const u8), lv);
                let q = dot4::<V>(mag, av);
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(ab.d));
                f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, f[j]);
            }
        }
        for j in 0..C {
            _mm256_storeu_ps(state[j].as_mut_ptr(), f[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against llama.cpp's own CPU kernels (fixtures/dot/, written by make_dot_refs.py through
    //! libggml-cpu.so's from_float / vec_dot), and SIMD against scalar.
    use super::*;
    use std::path::PathBuf;

    const TYPES: [GgmlType; 6] = [
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// Every instruction set this CPU runs (scalar first); each one it lacks is said out loud as
    /// a skip of `test`.
    fn isas_here(test: &str) -> Vec<Isa> {
        let here = Isa::all_here();
        for isa in [Isa::Avx2, Isa::Avx512] {
            if !here.contains(&isa) {
                crate::quant::tests::skip::skip(
                    &format!("{test} [{isa:?}]"),
                    "this CPU lacks it; that path did not run",
                );
            }
        }
        here
    }

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/dot")
    }

    fn npy(name: &str) -> (Vec<usize>, Vec<f32>) {
        let a = crate::formats::npy::read(dir().join(name)).unwrap();
        (a.shape.clone(), a.to_f32().unwrap())
    }

    fn bytes_of_q8k(b: &BlockQ8K) -> Vec<u8> {
        let mut v = b.d.to_le_bytes().to_vec();
        v.extend(b.qs.iter().map(|&q| q as u8));
        v.extend(b.bsums.iter().flat_map(|s| s.to_le_bytes()));
        v
    }

    fn bytes_of_q8_0(b: &BlockQ8_0Act) -> Vec<u8> {
        let mut v = f16::from_f32(b.d).to_le_bytes().to_vec();
        v.extend(b.qs.iter().map(|&q| q as u8));
        v
    }

    /// Our activation quantizers write llama.cpp's bytes (x86 from_float of Q8_K and Q8_0).
    #[test]
    fn activation_blocks_equal_llamacpp_from_float() {
        let (_, x) = npy("x.npy");
        let ours: Vec<u8> = x
            .chunks(QK_K)
            .flat_map(|c| bytes_of_q8k(&quantize_q8k(c)))
            .collect();
        assert_eq!(
            ours,
            std::fs::read(dir().join("x.Q8_K.bin")).unwrap(),
            "Q8_K"
        );
        let ours: Vec<u8> = x
            .chunks(QK8_0)
            .flat_map(|c| bytes_of_q8_0(&quantize_q8_0_act(c)))
            .collect();
        assert_eq!(
            ours,
            std::fs::read(dir().join("x.Q8_0.bin")).unwrap(),
            "Q8_0"
        );
    }

    /// The block's bytes with every level set to 0: what dequantizes to the offsets (-8d, -16d,
    /// -dmin*m, -32*d*sc) that llama.cpp subtracts as separate f32 terms.
    fn zero_levels(ty: GgmlType, w: &[u8]) -> Vec<u8> {
        let (a, b) = match ty {
            GgmlType::Q4_0 => (2, 18),
            GgmlType::Q5_0 => (2, 22),
            GgmlType::Q8_0 => (2, 34),
            GgmlType::Q4K => (16, 144),
            GgmlType::Q5K => (16, 176),
            _ => (0, 192),
        };
        let mut v = w.to_vec();
        for blk in v.chunks_exact_mut(ty.type_size()) {
            blk[a..b].fill(0);
        }
        v
    }

    /// Every output of our matmul agrees with llama.cpp's vec_dot on the same weight bytes
    /// (written by ggml_quantize_chunk): bit for bit for `BIT_IDENTICAL`, else (Q4_K, Q5_K) up to
    /// f32 rounding of the terms each sums, in different orders: exact integers times f32 scales, the level sums and the offset sums (Q6_K's 32,
    /// the K-quant mins) kept apart by llama.cpp and cancelling. Bound: 1e-6 of
    /// Σ (|w_i| + |offset_i|)·|x_i| (dequantized values), a few ulps of the largest term.
    /// (With Σ|w_i x_i| alone, Q6_K row 3 x row 3 misses: llama.cpp's -1.34e-5 vs ours -9.92e-6,
    /// which is the exact f64 product of llama.cpp's own dequantized row and activations; its
    /// two cancelling terms there are near 90, ulp 7.6e-6.)
    /// The types whose sums are ordered as llama.cpp's AVX2 kernels order them: equal bits.
    const BIT_IDENTICAL: [GgmlType; 4] = [
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q6K,
    ];

    #[test]
    fn matmul_matches_llamacpp_vec_dot() {
        let (xs, x) = npy("x.npy");
        let (n, k) = (xs[0], xs[1]);
        for ty in TYPES {
            let w = std::fs::read(dir().join(format!("w.{ty}.bin"))).unwrap();
            let (ds, want) = npy(&format!("dot.{ty}.npy"));
            let out = ds[0];
            let wd = crate::quant::dequantize(ty, &w, out * k).unwrap();
            let w0 = crate::quant::dequantize(ty, &zero_levels(ty, &w), out * k).unwrap();
            for isa in isas_here("matmul_matches_llamacpp_vec_dot") {
                let got = matmul_with(isa, ty, &w, out, k, &x, n).unwrap();
                let mut worst = 0f64;
                for o in 0..out {
                    for j in 0..n {
                        let mag: f64 = (0..k)
                            .map(|i| {
                                let wi =
                                    (wd[o * k + i] as f64).abs() + (w0[o * k + i] as f64).abs();
                                wi * (x[j * k + i] as f64).abs()
                            })
                            .sum();
                        let (g, r) = (got[j * out + o], want[o * n + j]);
                        let err = (g as f64 - r as f64).abs() / mag.max(f64::MIN_POSITIVE);
                        worst = worst.max(if g == r { 0.0 } else { err });
                        assert!(
                            g == r || (err <= 1e-6 && !BIT_IDENTICAL.contains(&ty)),
                            "{ty} {isa:?} row {o} x{j}: ours {g} llama.cpp {r} (rel {err:e})"
                        );
                    }
                }
                eprintln!(
                    "{ty} {isa:?}: largest |ours - llama.cpp| / sum (|w|+|offset|)|x| = {worst:e}"
                );
            }
        }
    }

    /// The AVX2 kernels give exactly the scalar results (integer block sums, shared f32 code),
    /// on random bytes too (any level, any scale bits, non-finite scales aside).
    #[test]
    fn simd_equals_scalar_exactly() {
        if !Isa::detected().vector() {
            eprintln!("SKIPPED simd_equals_scalar_exactly: this CPU has no AVX2");
            return;
        }
        // More activation rows than one tile, weight rows not a multiple of a task's; then one
        // activation row (decode's own kernels).
        // k of 37 super-blocks (296 blocks of 32): runs of K_RUN_BLOCKS (ZERO_RUN_BLOCKS) and a
        // partial one in the AVX2 tiles. On AVX-512, 13 rows take the pair kernels (a tile of 8
        // and a last tile ending at row 13); from WIDE_MIN_ROWS the 32-value types take the wide
        // kernel: 37 weight rows are two whole tasks of 16 and one of 5, 33 activation rows four
        // tiles and a lone row.
        assert!((8..WIDE_MIN_ROWS).contains(&13) && WIDE_MIN_ROWS <= 19);
        for (n, out, k) in [
            (37, 11, 1024),
            (19, 11, 37 * 256),
            (13, 11, 37 * 256),
            (33, 37, 37 * 256),
            (1, 11, 1024),
        ] {
            let mut s = 0x2545_f491_4f6c_dd1du64;
            let mut next = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let x: Vec<f32> = (0..n * k)
                .map(|_| (next() % 2001) as f32 / 100.0 - 10.0)
                .collect();
            for ty in TYPES {
                let mut w: Vec<u8> = (0..out * ty.bytes_for(k as u64).unwrap() as usize)
                    .map(|_| next() as u8)
                    .collect();
                // Keep the f16 scales finite and small: set their high byte to 0x1c..0x23 (or sign).
                let size = ty.type_size();
                for b in w.chunks_exact_mut(size) {
                    let at: &[usize] = match ty {
                        GgmlType::Q6K => &[208],
                        GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
                        _ => &[0],
                    };
                    for &i in at {
                        b[i + 1] = (b[i + 1] & 0x87) | 0x20;
                    }
                }
                let a = matmul_with(Isa::Scalar, ty, &w, out, k, &x, n).unwrap();
                assert!(a.iter().all(|v| v.is_finite()), "{ty}");
                // The tiled matmul gives each output exactly the one-row dot product.
                let act = quantize_act(Isa::Scalar, ty, &x, k);
                let per = k / ty.block_size();
                let rb = w.len() / out;
                for j in 0..n {
                    for o in 0..out {
                        let wr = &w[o * rb..(o + 1) * rb];
                        let want = match &act {
                            Act::Q8K(v) => {
                                dot_row_k(ty, Isa::Scalar, wr, &v[j * per..(j + 1) * per])
                            }
                            Act::Q8_0(v) => {
                                dot_row_0(ty, Isa::Scalar, wr, &v[j * per..(j + 1) * per])
                            }
                        };
                        assert_eq!(a[j * out + o].to_bits(), want.to_bits(), "{ty} {j} {o}");
                    }
                }
                for isa in isas_here("simd_equals_scalar_exactly") {
                    let b = matmul_with(isa, ty, &w, out, k, &x, n).unwrap();
                    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
                        panic!("{ty}: output {i}: scalar {} vs {isa:?} {}", a[i], b[i]);
                    }
                }
            }
        }
    }

    /// The word-wise scale decode equals the format's per-pair definition (llama.cpp's
    /// get_scale_min_k4, as quant::math writes it), on every bit pattern of each byte.
    #[test]
    fn k_scales_word_decode_equals_the_definition() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..4096 {
            let mut w = vec![0u8; 144];
            for (i, b) in w[4..16].iter_mut().enumerate() {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = if round < 256 {
                    round as u8 ^ (i as u8 * 17)
                } else {
                    (s >> 56) as u8
                };
            }
            let k = k_scales(GgmlType::Q4K, &w);
            let mut scales = [0u8; 12];
            scales.copy_from_slice(&w[4..16]);
            for j in 0..8 {
                let (sc, m) = super::super::math::get_scale_min_k4(j, &scales);
                assert_eq!(
                    (k.sc[j], k.m16[2 * j], k.m16[2 * j + 1]),
                    (sc as i16, m as i16, m as i16)
                );
            }
        }
        // The vector decode gives the same scales, on random Q4_K, Q5_K and Q6_K blocks.
        #[cfg(target_arch = "x86_64")]
        if Isa::current().vector() {
            for round in 0..4096u64 {
                for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
                    let w: Vec<u8> = (0..ty.type_size() as u64)
                        .map(|i| {
                            s = s.wrapping_mul(6364136223846793005).wrapping_add(i ^ round);
                            (s >> 56) as u8
                        })
                        .collect();
                    let (a, b) = (k_scales(ty, &w), unsafe {
                        avx2::k_scales_fast(ty, w.as_ptr())
                    });
                    let same =
                        |x: f32, y: f32| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
                    assert!(same(a.d, b.d) && same(a.dmin, b.dmin), "{ty} {a:?} {b:?}");
                    assert_eq!(a.sc, b.sc, "{ty}");
                    if ty != GgmlType::Q6K {
                        assert_eq!(a.m16, b.m16);
                    }
                }
            }
        }
        // Every f16 bit pattern converts as `half` converts it (NaN to some NaN).
        for b in 0..=u16::MAX {
            let v = f16_at(&b.to_le_bytes(), 0);
            let want = f16::from_bits(b).to_f32();
            assert!(
                v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                "{b:#x}"
            );
        }
    }

    /// The activation quantizer on every ISA here equals the scalar one: random
    /// rows, magnitude ties of both signs (the first one sets the sign), zeros, subnormals,
    /// extremes and non-finite values.
    #[test]
    fn q8k_quantizer_equals_scalar() {
        let isas = isas_here("q8k_quantizer_equals_scalar");
        let mut s = 0x853c_49e6_748f_ea9bu64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for round in 0..2000 {
            let scale = [1e-30f32, 1e-3, 1.0, 7.5, 1e30][round % 5];
            rows.push(
                (0..QK_K)
                    .map(|_| ((next() % 20001) as f32 / 10000.0 - 1.0) * scale)
                    .collect(),
            );
        }
        for (i, j) in [(3, 200), (200, 3), (0, 255), (17, 18)] {
            for sign in [1.0f32, -1.0] {
                let mut x: Vec<f32> = (0..QK_K).map(|k| (k % 7) as f32 * 0.1).collect();
                x[i] = 5.0 * sign;
                x[j] = -5.0 * sign;
                rows.push(x);
            }
        }
        rows.push(vec![0.0; QK_K]);
        rows.push((0..QK_K).map(|k| if k == 9 { -0.0 } else { 0.0 }).collect());
        rows.push((0..QK_K).map(|k| f32::from_bits(k as u32 + 1)).collect());
        rows.push(
            (0..QK_K)
                .map(|k| if k == 100 { f32::MAX } else { -f32::MAX })
                .collect(),
        );
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            rows.push((0..QK_K).map(|k| if k == 77 { bad } else { 1.0 }).collect());
        }
        for x in &rows {
            let b = quantize_q8k_scalar(x);
            for &isa in &isas {
                let a = quantize_q8k_with(isa, x);
                let same_d = a.d.to_bits() == b.d.to_bits() || (a.d.is_nan() && b.d.is_nan());
                let same = same_d && a.qs == b.qs && a.bsums == b.bsums;
                assert!(same, "{isa:?} {:?}", &x[..4]);
            }
            // The public entry point (this CPU's best) too.
            assert_eq!(quantize_q8k(x).qs, b.qs);
        }
    }

    #[test]
    fn bad_sizes_and_types_are_errors() {
        let w = vec![0u8; 144];
        assert!(matmul(GgmlType::Q4K, &w, 1, 256, &[0.0; 256], 1).is_ok());
        assert!(matmul(GgmlType::Q4K, &w, 2, 256, &[0.0; 256], 1).is_err());
        assert!(matmul(GgmlType::Q4K, &w, 1, 256, &[0.0; 255], 1).is_err());
        assert!(matmul(GgmlType::Q5_1, &w, 1, 256, &[0.0; 256], 1).is_err());
        let y = matmul(GgmlType::Q4K, &w, 1, 256, &[f32::NAN; 256], 1).unwrap();
        assert!(y[0].is_nan(), "a NaN activation must show in the output");
    }
}

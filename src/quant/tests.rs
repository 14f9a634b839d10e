//! Tests of the block formats: hand-checked vectors, round-trip error bounds, and byte parity
//! with third-party outputs stored under fixtures/quant/ (made by make_quant_refs.py and
//! make_mixture_refs.py; no Python needed here).

use super::*;
use crate::ground::dtype::FileType;
use std::path::PathBuf;

/// `skip::skip(what, reason)`: a check that cannot run on this machine, said out loud (the same
/// file the integration tests use).
pub(crate) mod skip {
    include!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/skip.rs"));
}

const QUANT_TYPES: [GgmlType; 7] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];
const ALL_TYPES: [GgmlType; 10] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// A small seeded generator (xorshift64*) for test data; Box-Muller for normals.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
}

fn round_trip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    let q = quantize(ty, x).unwrap();
    assert_eq!(q.len() as u64, ty.bytes_for(x.len() as u64).unwrap());
    dequantize(ty, &q, x.len()).unwrap()
}

fn rel_rms(x: &[f32], y: &[f32]) -> f64 {
    let num: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn quant_block_geometry_matches_type_table() {
    fn check<B: Block>() {
        assert_eq!(B::QK, B::TYPE.block_size(), "{}", B::TYPE);
        assert_eq!(B::SIZE, B::TYPE.type_size(), "{}", B::TYPE);
    }
    check::<BlockQ8_0>();
    check::<BlockQ4_0>();
    check::<BlockQ5_0>();
    check::<BlockQ5_1>();
    check::<BlockQ4K>();
    check::<BlockQ5K>();
    check::<BlockQ6K>();
}

/// `first_nonfinite_block` (fp16 scales only) gives what a scan of the dequantized values
/// gives: None for blocks of random bytes whose scales are finite (the other bytes may be
/// anything), and the same first index with an inf or NaN put in any scale of any block.
#[test]
fn quant_nonfinite_found_from_scales() {
    fn check<B: Block>(rng: &mut Rng) {
        let ty = B::TYPE;
        let blocks = 40;
        let mut bytes: Vec<u8> = (0..blocks * B::SIZE)
            .map(|_| rng.next_u64() as u8)
            .collect();
        let finite_f16 = |rng: &mut Rng| loop {
            let h = rng.next_u64() as u16;
            if h & 0x7c00 != 0x7c00 {
                return h;
            }
        };
        for b in bytes.chunks_exact_mut(B::SIZE) {
            for &o in B::F16_AT {
                b[o..o + 2].copy_from_slice(&finite_f16(rng).to_le_bytes());
            }
        }
        let scan = |bytes: &[u8]| {
            dequantize(ty, bytes, blocks * B::QK)
                .unwrap()
                .iter()
                .position(|v| !v.is_finite())
        };
        assert_eq!(scan(&bytes), None, "{ty}: finite scales, finite values");
        assert_eq!(first_nonfinite_block(ty, &bytes), None, "{ty}");
        for &o in B::F16_AT {
            for bad in [0x7c00u16, 0xfc00, 0x7e00, 0x7c01] {
                for at in [0, 7, blocks - 1] {
                    let mut b = bytes.clone();
                    let p = at * B::SIZE + o;
                    b[p..p + 2].copy_from_slice(&bad.to_le_bytes());
                    let want = scan(&b);
                    assert_eq!(want, Some(at * B::QK), "{ty}: byte {o} = {bad:#x}");
                    assert_eq!(first_nonfinite_block(ty, &b), want, "{ty}: byte {o}");
                }
            }
        }
    }
    let mut rng = Rng(5);
    check::<BlockQ8_0>(&mut rng);
    check::<BlockQ4_0>(&mut rng);
    check::<BlockQ5_0>(&mut rng);
    check::<BlockQ5_1>(&mut rng);
    check::<BlockQ4K>(&mut rng);
    check::<BlockQ5K>(&mut rng);
    check::<BlockQ6K>(&mut rng);
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        assert_eq!(first_nonfinite_block(ty, &[0xff; 64]), None, "{ty}");
    }
}

#[test]
fn quant_all_zeros() {
    let x = vec![0f32; 512];
    for ty in ALL_TYPES {
        let q = quantize(ty, &x).unwrap();
        let y = dequantize(ty, &q, x.len()).unwrap();
        assert!(y.iter().all(|v| *v == 0.0), "{ty}");
        match ty {
            // d = 0 / -8 = -0.0 (fp16 0x8000, as ggml stores it) and every value takes the
            // middle level: 8 (Q4_0) or 16 (Q5_0, i.e. only the fifth bit set).
            GgmlType::Q4_0 => assert!(q
                .chunks(18)
                .all(|b| b[..2] == [0, 0x80] && b[2..].iter().all(|&v| v == 0x88))),
            GgmlType::Q5_0 => assert!(q.chunks(22).all(|b| b[..2] == [0, 0x80]
                && b[2..6] == [0xFF; 4]
                && b[6..].iter().all(|&v| v == 0))),
            _ => assert!(q.iter().all(|&b| b == 0), "{ty}: {:?}", &q[..8]),
        }
    }
}

#[test]
fn quant_single_spike() {
    for (pos, amp) in [(5usize, 1.0f32), (200, -3.5), (31, 0.01)] {
        let mut x = vec![0f32; 256];
        x[pos] = amp;
        for ty in QUANT_TYPES {
            let y = round_trip(ty, &x);
            for (i, v) in y.iter().enumerate() {
                if i == pos {
                    // fp16 d (and the 6-bit sub-block scale of the K-quants) limit the precision
                    let tol = if ty.block_size() == 256 { 5e-3 } else { 2e-3 };
                    assert!(
                        (v - amp).abs() <= amp.abs() * tol,
                        "{ty}: spike {amp} -> {v}"
                    );
                } else {
                    // symmetric formats store 0 exactly; those with a min offset only nearly
                    let tol = if matches!(ty, GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K) {
                        2e-3
                    } else {
                        0.0
                    };
                    assert!(v.abs() <= amp.abs() * tol, "{ty}: zero at {i} -> {v}");
                }
            }
        }
    }
}

#[test]
fn quant_q8_0_ties_round_half_away() {
    // amax 127 => d = 1, id = 1: x*id is exact and C roundf sends .5 away from zero.
    let mut x = [0f32; 32];
    x[0] = 127.0;
    x[1..9].copy_from_slice(&[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -126.5]);
    let q = quantize(GgmlType::Q8_0, &x).unwrap();
    assert_eq!(&q[0..2], &half::f16::from_f32(1.0).to_le_bytes());
    let qs: Vec<i8> = q[2..11].iter().map(|&b| b as i8).collect();
    assert_eq!(qs, [127, 1, 2, 3, -1, -2, -3, 3, -127]);
}

#[test]
fn quant_q4_0_and_q5_0_ties_truncate_after_offset() {
    // max = -8 => d = 1, id = 1: level = trunc(x + 8.5), so x.5 always rounds up.
    let mut x = [0f32; 32];
    x[0] = -8.0;
    x[1..7].copy_from_slice(&[-0.5, 0.5, 1.5, 6.5, 7.0, -7.5]);
    let b = BlockQ4_0::quantize(&x);
    assert_eq!(b.d.to_f32(), 1.0);
    let lv: Vec<u8> = (0..7).map(|j| b.qs[j] & 0xF).collect();
    assert_eq!(lv, [0, 8, 9, 10, 15, 15, 1]);
    // Q5_0: max = -16 => d = 1.
    let mut x = [0f32; 32];
    x[0] = -16.0;
    x[1..5].copy_from_slice(&[-0.5, 0.5, 14.5, 15.0]);
    x[20] = 2.5;
    let b = BlockQ5_0::quantize(&x);
    let mut y = [0f32; 32];
    b.dequantize(&mut y);
    assert_eq!(&y[..5], &[-16.0, 0.0, 1.0, 15.0, 15.0]);
    assert_eq!(y[20], 3.0);
}

#[test]
fn quant_constant_blocks() {
    // (magnitudes kept where the fp16 super-block scale is a normal number: Q6_K stores
    // d = c/4096, which is subnormal -- and coarse -- below c ~ 0.25)
    for c in [0.5f32, -0.75, 0.3, 1234.0] {
        let x = vec![c; 256];
        for ty in QUANT_TYPES {
            let y = round_trip(ty, &x);
            for v in &y {
                // fp16 storage of the scale (or of the min for Q5_1) and, for the K-quants, the
                // 6-bit sub-block scale bound the error.
                let tol = if ty.block_size() == 256 { 1e-2 } else { 2e-3 };
                assert!((v - c).abs() <= c.abs() * tol, "{ty}: {c} -> {v}");
            }
        }
    }
}

#[test]
fn quant_huge_and_tiny_magnitudes() {
    let mut rng = Rng(7);
    for scale in [1e-30f32, 1e-12, 1e-6, 1e3, 1e4] {
        let x: Vec<f32> = (0..512).map(|_| rng.normal() * scale).collect();
        for ty in QUANT_TYPES {
            let y = round_trip(ty, &x);
            assert!(y.iter().all(|v| v.is_finite()), "{ty} {scale}");
            if scale <= 1e-12 {
                // scales underflow fp16 (or fall below GROUP_MAX_EPS): everything decodes to ~0
                assert!(y.iter().all(|v| v.abs() <= 1e-6), "{ty} {scale}");
            } else if scale >= 1e-3 {
                assert!(rel_rms(&x, &y) < 0.2, "{ty} {scale}: {}", rel_rms(&x, &y));
            }
        }
    }
}

#[test]
fn quant_non_finite_rejected() {
    for ty in ALL_TYPES {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.1f32; 512];
            x[300] = bad;
            x[400] = f32::NAN;
            assert!(
                matches!(quantize(ty, &x), Err(QuantError::NonFinite { index: 300 })),
                "{ty}"
            );
            assert!(
                matches!(
                    quantize_par(ty, &x, 256),
                    Err(QuantError::NonFinite { index: 300 })
                ),
                "{ty}"
            );
        }
    }
}

#[test]
fn quant_bad_lengths_and_unsupported() {
    assert!(matches!(
        quantize(GgmlType::Q4K, &[0.0; 32]),
        Err(QuantError::BadLength { .. })
    ));
    let mut small = [0u8; 10];
    assert!(matches!(
        quantize_into(GgmlType::Q8_0, &[0.0; 32], &mut small),
        Err(QuantError::BadLength { .. })
    ));
    assert!(matches!(
        dequantize(GgmlType::Q6K, &[0u8; 209], 256),
        Err(QuantError::BadLength { .. })
    ));
    assert!(matches!(
        quantize_par(GgmlType::Q8_0, &[0.0; 96], 64),
        Err(QuantError::BadLength { .. })
    ));
    assert!(matches!(
        quantize(GgmlType::Q4_1, &[0.0; 32]),
        Err(QuantError::Unsupported(GgmlType::Q4_1))
    ));
}

#[test]
fn quant_dequantize_hand_built_blocks() {
    let h = |v: f32| half::f16::from_f32(v);
    // Q8_0: d = 0.5
    let mut b = vec![0u8; 34];
    BlockQ8_0 {
        d: h(0.5),
        qs: std::array::from_fn(|i| i as i8 - 16),
    }
    .write(&mut b);
    let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
    assert_eq!(y[0], -8.0);
    assert_eq!(y[31], 7.5);
    // Q4_0: low nibble = element j, high nibble = element j+16
    let mut b = vec![0u8; 18];
    BlockQ4_0 {
        d: h(2.0),
        qs: [0x3F; 16],
    }
    .write(&mut b);
    let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
    assert_eq!((y[0], y[16]), (14.0, -10.0));
    // Q5_0: element 0 has its fifth bit set, element 17 not
    let mut b = vec![0u8; 22];
    BlockQ5_0 {
        d: h(1.0),
        qh: 1u32.to_le_bytes(),
        qs: [0x21; 16],
    }
    .write(&mut b);
    let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
    assert_eq!((y[0], y[1], y[17]), (1.0, -15.0, -14.0));
    // Q5_1: value = d*q + m
    let mut b = vec![0u8; 24];
    BlockQ5_1 {
        d: h(0.25),
        m: h(-1.0),
        qh: (1u32 << 31).to_le_bytes(),
        qs: [0xF0; 16],
    }
    .write(&mut b);
    let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
    assert_eq!((y[0], y[16], y[31]), (-1.0, 2.75, 6.75));
    // Q4_K: sub-block j has scale j+1 and min 2j; d = 1, dmin = 0.5
    let ls: [u8; 8] = std::array::from_fn(|j| j as u8 + 1);
    let lm: [u8; 8] = std::array::from_fn(|j| if j == 7 { 63 } else { 2 * j as u8 });
    let scales = math::pack_scale_min_k4(&ls, &lm);
    let mut b = vec![0u8; 144];
    BlockQ4K {
        d: h(1.0),
        dmin: h(0.5),
        scales,
        qs: [0x52; 128],
    }
    .write(&mut b);
    let y = dequantize(GgmlType::Q4K, &b, 256).unwrap();
    // element 0 (sub-block 0, low nibble 2): 1*1*2 - 0.5*0; element 32 (sub-block 1, high 5): 2*5 - 0.5*2
    assert_eq!((y[0], y[32], y[255]), (2.0, 9.0, 8.0 * 5.0 - 0.5 * 63.0));
    // Q5_K: same, with the fifth bit from qh bit 2c / 2c+1
    let mut qh = [0u8; 32];
    qh[0] = 0b0000_0011;
    let mut b = vec![0u8; 176];
    BlockQ5K {
        d: h(1.0),
        dmin: h(0.5),
        scales,
        qh,
        qs: [0x52; 128],
    }
    .write(&mut b);
    let y = dequantize(GgmlType::Q5K, &b, 256).unwrap();
    assert_eq!(
        (y[0], y[32], y[1], y[64]),
        (18.0, 2.0 * 21.0 - 1.0, 2.0, 3.0 * 2.0 - 2.0)
    );
    // Q6_K: value = d * scale * (q - 32); d stored last
    let mut scales = [0i8; 16];
    scales[0] = 2;
    scales[15] = -3;
    let mut b = vec![0u8; 210];
    BlockQ6K {
        ql: [0x01; 128],
        qh: [0b1110_0100; 64],
        scales,
        d: h(0.5),
    }
    .write(&mut b);
    assert_eq!(&b[208..], &h(0.5).to_le_bytes());
    let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
    // element 0: q = 1 | (0<<4) = 1 -> 0.5*2*(1-32); element 255 (half 1, l=31, +96): q = 0 | 3<<4 = 48
    assert_eq!((y[0], y[255]), (-31.0, 0.5 * -3.0 * 16.0));
}

#[test]
fn quant_round_trip_error_bounds() {
    let mut rng = Rng(42);
    let x: Vec<f32> = (0..256 * 64).map(|_| rng.normal() * 0.02).collect();
    // Relative RMS error of each format on Gaussian data (printed with --nocapture); the bounds
    // leave headroom over the measured values.
    let bounds = [
        (GgmlType::F16, 5e-4),
        (GgmlType::BF16, 3e-3),
        (GgmlType::Q8_0, 0.007),
        (GgmlType::Q6K, 0.022),
        (GgmlType::Q5K, 0.045),
        (GgmlType::Q5_1, 0.047),
        (GgmlType::Q5_0, 0.053),
        (GgmlType::Q4K, 0.09),
        (GgmlType::Q4_0, 0.11),
    ];
    let errors: Vec<(GgmlType, f64, f64)> = bounds
        .iter()
        .map(|&(ty, bound)| (ty, rel_rms(&x, &round_trip(ty, &x)), bound))
        .collect();
    for (ty, e, _) in &errors {
        eprintln!("{ty}: relative RMS {e:.5}");
    }
    for (ty, e, bound) in errors {
        assert!(e < bound, "{ty}: {e} >= {bound}");
    }
    assert_eq!(round_trip(GgmlType::F32, &x), x);
}

#[test]
fn quant_par_matches_serial_for_any_thread_count() {
    let mut rng = Rng(3);
    let x: Vec<f32> = (0..1024 * 96).map(|_| rng.normal()).collect();
    for ty in ALL_TYPES {
        let serial = quantize(ty, &x).unwrap();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let par = pool.install(|| quantize_par(ty, &x, 1024)).unwrap();
            assert!(par == serial, "{ty} with {threads} threads");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The K-quant searches: SIMD lanes (one sub-block per lane) against the scalar reference.

const KQUANT_ISAS: [kquants::Isa; 3] = [
    kquants::Isa::Scalar,
    kquants::Isa::Avx2,
    kquants::Isa::Avx512,
];

/// The K-quant search implementations this CPU runs, in KQUANT_ISAS order. Each one it lacks is
/// reported as a skip of `test`: asking for it would quietly run a lesser one (`Isa::usable`).
fn kquant_isas_here(test: &str) -> Vec<kquants::Isa> {
    use kquants::Isa;
    let rank = |i: Isa| match i {
        Isa::Scalar => 0,
        Isa::Avx2 => 1,
        Isa::Avx512 => 2,
    };
    let best = Isa::detected();
    KQUANT_ISAS
        .into_iter()
        .filter(|&isa| {
            let here = rank(isa) <= rank(best);
            if !here {
                let need = if isa == Isa::Avx512 {
                    "AVX-512F"
                } else {
                    "AVX2"
                };
                skip::skip(
                    &format!("{test} [{isa:?}]"),
                    &format!("this CPU has no {need} (best here: {best:?}); that path did not run"),
                );
            }
            here
        })
        .collect()
}

/// `quantize(ty, x)` for a K-quant `ty` with the search run by `isa` (None for other types;
/// an `isa` the CPU lacks falls back to the best it has, down to scalar): block by block, and
/// (Q4_K/Q5_K) through `quantize_many_with`, which searches two super-blocks at once.
fn quantize_kquant_with(ty: GgmlType, x: &[f32], isa: kquants::Isa) -> Option<Vec<u8>> {
    fn run<B: Block>(x: &[f32], f: impl Fn(&[f32; 256]) -> B) -> Vec<u8> {
        let mut out = vec![0u8; x.len() / 256 * B::SIZE];
        for (xb, o) in x.chunks_exact(256).zip(out.chunks_exact_mut(B::SIZE)) {
            f(xb.try_into().unwrap()).write(o);
        }
        out
    }
    fn many<B: Block>(x: &[f32], one: Vec<u8>, f: impl Fn(&[f32], &mut [u8])) -> Vec<u8> {
        let mut out = vec![0u8; x.len() / 256 * B::SIZE];
        f(x, &mut out);
        assert!(
            out == one,
            "{}: blocks in pairs differ from one by one",
            B::TYPE
        );
        out
    }
    match ty {
        GgmlType::Q4K => {
            let one = run(x, |b| BlockQ4K::quantize_with(b, isa));
            Some(many::<BlockQ4K>(x, one, |x, o| {
                BlockQ4K::quantize_many_with(x, o, isa)
            }))
        }
        GgmlType::Q5K => {
            let one = run(x, |b| BlockQ5K::quantize_with(b, isa));
            Some(many::<BlockQ5K>(x, one, |x, o| {
                BlockQ5K::quantize_many_with(x, o, isa)
            }))
        }
        GgmlType::Q6K => Some(run(x, |b| BlockQ6K::quantize_with(b, isa))),
        _ => None,
    }
}

/// Super-blocks built to hit the corners of the searches, sub-block by sub-block: flat and
/// all-zero sub-blocks (the early returns), values below GROUP_MAX_EPS, exact ties on the
/// level grid, all-positive/all-negative sub-blocks (the min clamp), huge values whose squares
/// overflow to inf, subnormals, and plain noise at many scales.
fn kquant_corner_blocks(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(n * 256);
    for b in 0..n {
        let mut blk = [0f32; 256];
        for (s, sub) in blk.chunks_exact_mut(16).enumerate() {
            let kind = (rng.next_u64() % 14) as usize;
            let scale = 10f32.powf(rng.uniform() * 12.0 - 8.0);
            for (i, v) in sub.iter_mut().enumerate() {
                *v = match kind {
                    0 => 0.0,
                    1 => scale,
                    2 => -0.0,
                    3 => rng.normal() * 1e-16,
                    4 => ((rng.next_u64() % 31) as f32 - 15.0) * 0.5 * scale,
                    5 => (rng.next_u64() % 16) as f32,
                    6 => rng.uniform() * scale + scale,
                    7 => -(rng.uniform() * scale) - scale,
                    8 => rng.normal() * 3e19,
                    9 => rng.normal().clamp(-4.0, 4.0) * 8e37,
                    10 => rng.normal() * 1e-40,
                    11 if i == s % 16 => scale,
                    11 => 0.0,
                    12 => ((rng.next_u64() % 64) as f32 - 32.0) / 32.0 * scale,
                    _ => rng.normal() * scale,
                };
            }
        }
        // every 8th block uniform across sub-blocks (the common case)
        if b % 8 == 0 {
            for v in blk.iter_mut() {
                *v = rng.normal() * 0.02;
            }
        }
        x.extend_from_slice(&blk);
    }
    x
}

#[test]
fn quant_kquant_simd_matches_scalar() {
    let mut rng = Rng(11);
    // An odd number of super-blocks: the pairs and a last one alone.
    let x = kquant_corner_blocks(&mut rng, 3001);
    assert!(x.iter().all(|v| v.is_finite()));
    let isas = kquant_isas_here("quant_kquant_simd_matches_scalar");
    for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
        let reference = quantize_kquant_with(ty, &x, kquants::Isa::Scalar).unwrap();
        for &isa in &isas {
            let got = quantize_kquant_with(ty, &x, isa).unwrap();
            let bs = ty.type_size();
            let bad = reference
                .chunks(bs)
                .zip(got.chunks(bs))
                .position(|(a, b)| a != b);
            assert!(
                bad.is_none(),
                "{ty} {isa:?}: block {bad:?} differs from scalar"
            );
        }
        // and the public entry point (whatever Isa::current() is) agrees
        assert!(quantize(ty, &x).unwrap() == reference, "{ty}: default path");
    }
    eprintln!(
        "K-quant search paths compared; CPU has {:?}",
        kquants::Isa::detected()
    );
}

// ---------------------------------------------------------------------------------------------
// Byte parity with llama.cpp (ggml_quantize_chunk) and gguf-py, from fixtures/quant/.

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("quant")
}

/// The byte references: fixtures/quant/, or QUANT_FIXTURE_DIR (e.g. a large set written by
/// `make_quant_refs.py --stress ROWS --outdir DIR`).
fn parity_dir() -> PathBuf {
    std::env::var_os("QUANT_FIXTURE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(fixture_dir)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn quant_parity_with_llamacpp_and_ggufpy() {
    let dir = parity_dir();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("manifest.json")).expect("fixtures/quant/manifest.json"),
    )
    .expect("manifest is JSON");
    let isas = kquant_isas_here("quant_parity_with_llamacpp_and_ggufpy");
    let mut compared_blocks = std::collections::BTreeMap::<String, (usize, usize)>::new();
    let mut failures = Vec::new();
    for case in manifest["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().unwrap();
        let arr = crate::formats::npy::read(dir.join(case["npy"].as_str().unwrap())).unwrap();
        assert_eq!(arr.descr, "<f4", "{name}");
        let x = arr.to_f32().unwrap();
        let row_len = *arr.shape.last().unwrap();
        for (tyname, r) in case["types"].as_object().unwrap() {
            let ty = GgmlType::from_name(tyname).unwrap_or_else(|| panic!("type {tyname}"));
            let ours = quantize_par(ty, &x, row_len).unwrap();
            let sha = sha256_hex(&ours);
            let entry = compared_blocks.entry(tyname.clone()).or_default();
            if let Some(file) = r.get("ggml").and_then(|v| v.as_str()) {
                let theirs = std::fs::read(dir.join(file)).unwrap();
                if theirs != ours {
                    let bs = ty.type_size();
                    let bad = theirs
                        .chunks(bs)
                        .zip(ours.chunks(bs))
                        .position(|(a, b)| a != b);
                    failures.push(format!(
                        "{name} {tyname}: bytes differ from llama.cpp (first block {bad:?})"
                    ));
                } else {
                    entry.0 += ours.len() / ty.type_size();
                }
                // The K-quants again through every implementation of the search (the default
                // above is the best the CPU has, or scalar under MMFUSER_QUANT_SCALAR).
                for &isa in &isas {
                    if let Some(alt) = quantize_kquant_with(ty, &x, isa) {
                        if alt != theirs {
                            failures.push(format!(
                                "{name} {tyname}: {isa:?} bytes differ from llama.cpp"
                            ));
                        }
                    }
                }
            }
            if let Some(s) = r.get("ggufpy_sha256").and_then(|v| v.as_str()) {
                if s != sha {
                    failures.push(format!("{name} {tyname}: bytes differ from gguf-py"));
                } else {
                    entry.1 += ours.len() / ty.type_size();
                }
            }
            if let Some(s) = r.get("ggml_dequant_sha256").and_then(|v| v.as_str()) {
                let y = dequantize(ty, &ours, x.len()).unwrap();
                let yb: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
                if sha256_hex(&yb) != s {
                    failures.push(format!(
                        "{name} {tyname}: dequantized values differ from ggml's to_float"
                    ));
                }
            }
        }
    }
    eprintln!(
        "K-quant search: default {:?}, also checked {:?} (CPU has {:?})",
        kquants::Isa::current(),
        isas,
        kquants::Isa::detected()
    );
    for (ty, (n_ggml, n_py)) in &compared_blocks {
        eprintln!("{ty}: {n_ggml} blocks equal to llama.cpp, {n_py} blocks equal to gguf-py");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Blocks were actually compared, for every type with a reference (the map's entries exist
    // before any comparison, so its size proves nothing).
    let want_ggml = [
        "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
    ];
    let want_py = ["F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q5_1"];
    let n = |ty: &str, k: usize| compared_blocks.get(ty).map_or(0, |c| [c.0, c.1][k]);
    let missing: Vec<String> = (want_ggml.iter().map(|t| (t, 0, "llama.cpp")))
        .chain(want_py.iter().map(|t| (t, 1, "gguf-py")))
        .filter(|&(t, k, _)| n(t, k) < 64)
        .map(|(t, k, who)| format!("{t}: {} blocks compared with {who}", n(t, k)))
        .collect();
    assert!(missing.is_empty(), "too few blocks compared: {missing:?}");
}

#[test]
fn quant_mixture_matches_llama_quantize() {
    let path = fixture_dir().join("mixture_refs.json");
    let refs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("fixtures/quant/mixture_refs.json"))
            .unwrap();
    let mut checked = 0;
    for model in refs["models"].as_array().unwrap() {
        let mname = model["name"].as_str().unwrap();
        let n_layer = model["n_layer"].as_u64().unwrap() as usize;
        // tensors as written in the input file (not sorted)
        let inputs: Vec<(String, Vec<u64>, GgmlType)> = model["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let ne = t[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                (
                    t[0].as_str().unwrap().to_string(),
                    ne,
                    GgmlType::from_name(t[2].as_str().unwrap()).unwrap(),
                )
            })
            .collect();
        let mut names: Vec<String> = inputs.iter().map(|t| t.0.clone()).collect();
        mixture::llama_quantize_order(&mut names);
        let order: Vec<&str> = model["order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(names, order, "{mname}: tensor order");
        let sorted: Vec<&(String, Vec<u64>, GgmlType)> = names
            .iter()
            .map(|n| inputs.iter().find(|t| &t.0 == n).unwrap())
            .collect();
        let descs: Vec<mixture::TensorDesc> = sorted
            .iter()
            .map(|t| mixture::TensorDesc {
                name: &t.0,
                ne: &t.1,
                ty: t.2,
            })
            .collect();
        for (ftname, expected) in model["types"].as_object().unwrap() {
            let ftype = FileType::from_name(ftname).unwrap();
            let got = mixture::choose_types(ftype, &descs, n_layer);
            let expected: Vec<&str> = expected
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(got.len(), expected.len(), "{mname} {ftname}");
            for ((name, (ty, _)), exp) in names.iter().zip(&got).zip(&expected) {
                assert_eq!(ty.name(), *exp, "{mname} {ftname}: {name}");
            }
            // the fallback flag: set exactly where llama.cpp's chosen type differs from what the
            // rules asked for because of the row length; check it is only set on quantized files
            // for tensors whose ne[0] is not a multiple of 256
            for ((t, (_, fb)), name) in descs.iter().zip(&got).zip(&names) {
                if *fb {
                    assert!(
                        t.ne[0] % 256 != 0,
                        "{mname} {ftname}: {name} fallback with ne0 {}",
                        t.ne[0]
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 0);
    eprintln!("{checked} (model, file type) combinations match llama-quantize");
}

/// Single-threaded throughput of every quantizer on a 4096x11008 matrix (prints MB/s of f32
/// input). `cargo test --release --lib quant_speed -- --ignored --nocapture`
#[test]
#[ignore = "a timing, not a check: run with --ignored --nocapture"]
fn quant_speed() {
    let mut rng = Rng(1);
    let (rows, cols) = (4096usize, 11008usize);
    let x: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * 0.02).collect();
    let mb = (x.len() * 4) as f64 / 1e6;
    for ty in ALL_TYPES {
        let mut out = vec![0u8; ty.bytes_for(x.len() as u64).unwrap() as usize];
        let t0 = std::time::Instant::now();
        quantize_into(ty, &x, &mut out).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let y = dequantize(ty, &out, x.len()).unwrap();
        let dq = t1.elapsed().as_secs_f64();
        eprintln!(
            "{ty:>5}: quantize {:8.1} MB/s ({dt:.2} s), dequantize {:8.1} MB/s",
            mb / dt,
            mb / dq
        );
        std::hint::black_box(y);
    }
    // The K-quants with each implementation of the search (the default above is the best).
    for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
        for isa in kquant_isas_here("quant_speed") {
            let t0 = std::time::Instant::now();
            let out = quantize_kquant_with(ty, &x, isa).unwrap();
            let dt = t0.elapsed().as_secs_f64();
            eprintln!("{ty:>5} {isa:?}: quantize {:8.1} MB/s ({dt:.2} s)", mb / dt);
            std::hint::black_box(out);
        }
    }
}

/// Min-of-repeats throughput of the K-quants, less sensitive to a busy machine than
/// `quant_speed`: each measurement quantizes 1M values (4096 super-blocks), repeated `REPS`
/// times; MB/s of f32 input from the fastest repeat.
/// `cargo test --release --lib quant_kquant_bench -- --ignored --nocapture`
#[test]
#[ignore = "a timing, not a check: run with --ignored --nocapture"]
fn quant_kquant_bench() {
    const REPS: usize = 40;
    let mut rng = Rng(1);
    let x: Vec<f32> = (0..1 << 20).map(|_| rng.normal() * 0.02).collect();
    let mb = (x.len() * 4) as f64 / 1e6;
    let best = |f: &mut dyn FnMut()| {
        (0..REPS)
            .map(|_| {
                let t0 = std::time::Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
        let mut out = vec![0u8; ty.bytes_for(x.len() as u64).unwrap() as usize];
        let dt = best(&mut || quantize_into(ty, &x, &mut out).unwrap());
        eprintln!("{ty:>5} default: {:7.1} MB/s", mb / dt);
        for isa in kquant_isas_here("quant_kquant_bench") {
            let dt = best(&mut || {
                std::hint::black_box(quantize_kquant_with(ty, &x, isa));
            });
            eprintln!("{ty:>5} {isa:?}: {:7.1} MB/s", mb / dt);
        }
    }
}

/// The one-pass bf16 -> f16 agrees with half's conversion (bf16 -> f32 -> f16) on every one of
/// the 65536 bf16 bit patterns (NaN payloads and subnormals included), at every offset of the
/// 8-value vector loop (lengths 0..=17 cover the scalar tail).
#[test]
fn bf16_to_f16_matches_half_on_every_pattern() {
    use half::{bf16, f16};
    let src: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
    let want: Vec<u8> = src
        .chunks_exact(2)
        .flat_map(|c| f16::from_f32(bf16::from_le_bytes([c[0], c[1]]).to_f32()).to_le_bytes())
        .collect();
    let mut got = vec![0u8; src.len()];
    if !crate::quant::bf16_to_f16_into(&src, &mut got) {
        skip::skip(
            "bf16_to_f16_matches_half_on_every_pattern",
            "this CPU has no F16C/AVX2: the one-pass conversion cannot run here",
        );
        return;
    }
    let bad: Vec<String> = got
        .chunks_exact(2)
        .zip(want.chunks_exact(2))
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .take(5)
        .map(|(i, (g, w))| format!("bf16 {i:#06x}: got {g:02x?}, half gives {w:02x?}"))
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
    for len in 0..=17usize {
        for off in [0usize, 1, 7] {
            let s = &src[2 * (off + 1000)..2 * (off + 1000 + len)];
            let mut d = vec![0u8; s.len()];
            assert!(crate::quant::bf16_to_f16_into(s, &mut d));
            assert_eq!(
                d,
                want[2 * (off + 1000)..2 * (off + 1000 + len)],
                "len {len} off {off}"
            );
        }
    }
}

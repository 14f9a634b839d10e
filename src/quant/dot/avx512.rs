//! The many-row kernels on 64-byte vectors: two activation rows per vector (low half row 2i,
//! high half row 2i + 1, laid out so by [`PairQ8K`] / [`PairQ8_0`]), the weight's levels
//! broadcast to both halves. Each half computes exactly the integer lanes and the f32 folds of the
//! AVX2 kernels (`super::avx2`), so every output has the same bits; an instruction does the work
//! of two.
//! Safety: callers run these only after detecting `Isa::Avx512`; the slices have whole blocks.
use super::avx2::prefetch_ahead;
use super::{k_type, zero_type, BlockQ8K, GgmlType, KScales, PairQ8K, PairQ8_0, PAIR_TILE_ROWS};
use super::{RowQ8_0, QK8_0, WIDE_ROWS};
use super::{KQ4 as Q4, KQ5 as Q5, KQ6 as Q6};
use std::arch::x86_64::*;

/// Row pairs per tile.
const PAIRS: usize = PAIR_TILE_ROWS / 2;

#[inline(always)]
unsafe fn load(p: *const u8) -> __m512i {
    _mm512_loadu_si512(p.cast())
}

/// 32 bytes at `p` in both halves.
#[inline(always)]
unsafe fn load_both(p: *const u8) -> __m512i {
    _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast()))
}

/// Two groups' sums of 4 products (`lo`, `hi`: i32 lanes, each within i16) as the i16 pairs
/// (lo, hi) of each lane: `hi`'s low 16 bits moved into the top of `lo`'s lanes by one byte
/// shuffle. A vpdpwssd of that with the pairs (scale of lo, scale of hi) adds both groups' scaled
/// sums to each lane: three multiplies for two groups (vpdpbusd, vpdpbusd, vpdpwssd) where the
/// AVX2 road takes four (maddubs and madd twice), the same integers.
/// `idx` is [`PAIR_WORDS`] in a register.
/// Written as assembly: from the intrinsic, LLVM's generic tuning emits a plain shuffle and a
/// masked move (two operations).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn pair_words(lo: __m512i, hi: __m512i, idx: __m512i) -> __m512i {
    let mut out = lo;
    std::arch::asm!(
        "vpshufb {out}{{{k}}}, {hi}, {idx}",
        out = inout(zmm_reg) out,
        k = in(kreg) 0xCCCC_CCCC_CCCC_CCCCu64,
        hi = in(zmm_reg) hi,
        idx = in(zmm_reg) idx,
        options(pure, nomem, nostack),
    );
    out
}

/// acc + the products of the i16 pairs of `a` and `b` added in pairs into i32 lanes: one
/// vpdpwssd. Written as assembly: from the intrinsic, LLVM's generic tuning (no -mcpu) splits it
/// into vpmaddwd and vpaddd, the two operations VNNI is there to fuse.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    std::arch::asm!(
        "vpdpwssd {acc}, {a}, {b}",
        acc = inout(zmm_reg) acc,
        a = in(zmm_reg) a,
        b = in(zmm_reg) b,
        options(pure, nomem, nostack),
    );
    acc
}

/// Bytes 2, 3 of each dword take bytes 0, 1 of that dword (in-lane byte shuffle indices).
const PAIR_WORDS: [i8; 64] = {
    let mut idx = [0i8; 64];
    let mut i = 0;
    while i < 64 {
        idx[i] = ((i % 16) - (i % 4) + (i % 2)) as i8;
        i += 1;
    }
    idx
};

/// `super::avx2::k_row_tile_state` for PAIR_TILE_ROWS activation rows given as PAIRS row pairs
/// (`a`: blocks b0..b1), over blocks b0..b1 of every weight row of a task at once: row r's
/// blocks (of `per_row`) and scales start at r · per_row in `w` and `ks`, its lanes are
/// `states[r]`. `w` holds Q4_K's blocks as stored, and Q5_K's and Q6_K's levels unpacked
/// ([`unpacks_levels`], [`unpack_levels`]). One call for all rows: per call, the slices, the
/// dispatch and the constants cost a tenth of a 4-block run.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn k_pairs_rows(
    ty: GgmlType,
    w: &[u8],
    ks: &[KScales],
    per_row: usize,
    (b0, b1): (usize, usize),
    a: [&[PairQ8K]; PAIRS],
    states: &mut [[[f32; 8]; PAIR_TILE_ROWS]],
) {
    match ty {
        GgmlType::Q6K => k_rows::<Q6>(w, ks, per_row, (b0, b1), a, states),
        GgmlType::Q5K => k_rows::<Q5>(w, ks, per_row, (b0, b1), a, states),
        _ => k_rows::<Q4>(w, ks, per_row, (b0, b1), a, states),
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn k_rows<const T: u8>(
    w: &[u8],
    ks: &[KScales],
    per_row: usize,
    (b0, b1): (usize, usize),
    a: [&[PairQ8K]; PAIRS],
    states: &mut [[[f32; 8]; PAIR_TILE_ROWS]],
) {
    let size = block_bytes(T);
    let n = states.len();
    assert!(b0 <= b1 && b1 <= per_row && a.iter().all(|r| r.len() >= b1 - b0));
    assert!(w.len() >= n * per_row * size && ks.len() >= n * per_row);
    for (r, st) in states.iter_mut().enumerate() {
        let (c0, c1) = (r * per_row + b0, r * per_row + b1);
        k_pairs::<T>(
            w.get_unchecked(c0 * size..c1 * size),
            ks.get_unchecked(c0..c1),
            a,
            st,
        );
    }
}

/// Bytes per block of what [`k_pairs`] reads for `T`: Q4_K's block, or a block's levels.
#[inline(always)]
fn block_bytes(t: u8) -> usize {
    if t == Q4 {
        k_type(t).type_size()
    } else {
        LEVELS_BYTES
    }
}

/// Bytes of one super-block's unpacked levels ([`unpack_levels`]).
pub(super) const LEVELS_BYTES: usize = 256;

/// Whether [`k_pairs_rows`] takes `ty` (its levels unpacked ahead by [`unpack_levels`]).
pub(super) fn unpacks_levels(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q5K | GgmlType::Q6K)
}

/// The levels of each super-block of Q5_K or Q6_K weights `w`, [`LEVELS_BYTES`] per block into
/// `out`, in the order [`k_pairs`] takes them.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn unpack_levels(ty: GgmlType, w: &[u8], out: &mut [u8]) {
    let size = ty.type_size();
    assert!(unpacks_levels(ty) && w.len().is_multiple_of(size));
    assert_eq!(out.len(), w.len() / size * LEVELS_BYTES);
    for (wb, ob) in w.chunks_exact(size).zip(out.chunks_exact_mut(LEVELS_BYTES)) {
        if ty == GgmlType::Q6K {
            q6_levels(wb.as_ptr(), ob.as_mut_ptr())
        } else {
            q5_levels(wb.as_ptr(), ob.as_mut_ptr())
        }
    }
}

/// One Q6_K super-block's levels (0..63) at `wb` into the 256 bytes at `ob`: half h's four
/// groups (`super::avx2::q6k_levels`) at 128h.
#[inline(always)]
unsafe fn q6_levels(wb: *const u8, ob: *mut u8) {
    for h in 0..2 {
        let levels = super::avx2::q6k_levels(wb, wb.add(128), h);
        for (i, l) in levels.into_iter().enumerate() {
            _mm256_storeu_si256(ob.add(128 * h + 32 * i).cast(), l);
        }
    }
}

/// One Q5_K super-block's levels (0..31) at `wb` into the 256 bytes at `ob`: chunk c's two
/// groups (`super::avx2::k45_levels`) at 64c.
#[inline(always)]
unsafe fn q5_levels(wb: *const u8, ob: *mut u8) {
    let hb = _mm256_loadu_si256(wb.add(16).cast());
    for c in 0..4 {
        let [lo, hi] = super::avx2::k45_levels(true, wb.add(48), hb, c);
        _mm256_storeu_si256(ob.add(64 * c).cast(), lo);
        _mm256_storeu_si256(ob.add(64 * c + 32).cast(), hi);
    }
}

/// Indices for vpermw picking Q6_K's scales for groups 2g, 2g + 1 of half h from the 16 scales (in
/// both halves of the vector): i32 lane l (of 8 per row) holds (scale of group 2g, of 2g + 1) for
/// values 4l..4l + 3, i.e. scales 8h + 4g + (l >= 4) and 8h + 4g + 2 + (l >= 4); entry 2h + g.
const Q6_SCALE_INDEX: [[i16; 32]; 4] = {
    let mut idx = [[0i16; 32]; 4];
    let mut hg = 0;
    while hg < 4 {
        let (h, g) = (hg / 2, hg % 2);
        let mut i = 0;
        while i < 32 {
            let (l, second) = ((i / 2) % 8, i % 2);
            idx[hg][i] = (8 * h + 4 * g + 2 * second + if l >= 4 { 1 } else { 0 }) as i16;
            i += 1;
        }
        hg += 1;
    }
    idx
};

/// The two rows' 8 f32 lanes of pair `j` in one vector.
#[inline(always)]
unsafe fn load_state(state: &[[f32; 8]; PAIR_TILE_ROWS], j: usize) -> __m512 {
    _mm512_loadu_ps(state[2 * j..].as_ptr().cast())
}

#[inline(always)]
unsafe fn store_state(state: &mut [[f32; 8]; PAIR_TILE_ROWS], j: usize, f: __m512) {
    _mm512_storeu_ps(state[2 * j..].as_mut_ptr().cast(), f)
}

/// One weight row's blocks `w` (`T`: Q4 its Q4_K blocks as stored, Q5 / Q6 its unpacked levels)
/// against PAIRS row pairs, continuing their lanes in `state`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn k_pairs<const T: u8>(
    w: &[u8],
    ks: &[KScales],
    a: [&[PairQ8K]; PAIRS],
    state: &mut [[f32; 8]; PAIR_TILE_ROWS],
) {
    let size = block_bytes(T);
    let blocks = w.len() / size;
    assert!(ks.len() >= blocks && a.iter().all(|r| r.len() >= blocks));
    let m4 = _mm512_set1_epi8(0xF);
    let words = load(PAIR_WORDS.as_ptr().cast());
    let q6_index: [__m512i; 4] = std::array::from_fn(|i| load(Q6_SCALE_INDEX[i].as_ptr().cast()));
    let mut f: [__m512; PAIRS] = std::array::from_fn(|j| load_state(state, j));
    for b in 0..blocks {
        let wb = w.as_ptr().add(b * size);
        prefetch_ahead(wb, size.div_ceil(64));
        let k = ks.get_unchecked(b);
        let ap: [*const u8; PAIRS] =
            std::array::from_fn(|j| a[j].get_unchecked(b).qs.as_ptr().cast());
        let mut q = [_mm512_setzero_si512(); PAIRS];
        if T == Q6 {
            let sc = _mm512_broadcast_i64x4(_mm256_loadu_si256(k.sc.as_ptr().cast()));
            for h in 0..2 {
                let levels: [__m512i; 4] =
                    std::array::from_fn(|i| load_both(wb.add(128 * h + 32 * i)));
                for g in 0..2 {
                    // Groups 2g and 2g + 1 of this half: lane l < 4 (values 0..15 of a group)
                    // scales 8h + 4g and 8h + 4g + 2, lane l >= 4 the next ones.
                    let scv = _mm512_permutexvar_epi16(q6_index[2 * h + g], sc);
                    let chunk = 4 * h + 2 * g;
                    for j in 0..PAIRS {
                        let s0 = _mm512_dpbusd_epi32(
                            _mm512_setzero_si512(),
                            levels[2 * g],
                            load(ap[j].add(64 * chunk)),
                        );
                        let s1 = _mm512_dpbusd_epi32(
                            _mm512_setzero_si512(),
                            levels[2 * g + 1],
                            load(ap[j].add(64 * chunk + 64)),
                        );
                        q[j] = dpwssd(q[j], pair_words(s0, s1, words), scv);
                    }
                }
            }
        } else {
            for c in 0..4 {
                let (lo, hi) = if T == Q5 {
                    (load_both(wb.add(64 * c)), load_both(wb.add(64 * c + 32)))
                } else {
                    let v = load_both(wb.add(16 + 32 * c));
                    (
                        _mm512_and_si512(v, m4),
                        _mm512_and_si512(_mm512_srli_epi16(v, 4), m4),
                    )
                };
                // The pair (sc[2c], sc[2c + 1]) in every lane: adjacent i16, one 32-bit load.
                let scv =
                    _mm512_set1_epi32(k.sc.as_ptr().add(2 * c).cast::<i32>().read_unaligned());
                for j in 0..PAIRS {
                    let zero = _mm512_setzero_si512();
                    let s0 = _mm512_dpbusd_epi32(zero, lo, load(ap[j].add(128 * c)));
                    let s1 = _mm512_dpbusd_epi32(zero, hi, load(ap[j].add(128 * c + 64)));
                    q[j] = dpwssd(q[j], pair_words(s0, s1, words), scv);
                }
            }
        }
        // Q6_K: lanes less 32·sc·bsum; Q4_K, Q5_K: the mins' lanes m·bsum, folded apart.
        let per_sub = _mm512_broadcast_i64x4(_mm256_loadu_si256(
            if T == Q6 {
                k.sc.as_ptr()
            } else {
                k.m16.as_ptr()
            }
            .cast(),
        ));
        let (d, dmin) = (_mm512_set1_ps(k.d), _mm512_set1_ps(k.dmin));
        for j in 0..PAIRS {
            let ab = a[j].get_unchecked(b);
            let bs = _mm512_madd_epi16(per_sub, load(ab.bsums.as_ptr().cast()));
            let da = _mm512_loadu_ps(ab.d.as_ptr());
            // d·d_a per lane: the product the AVX2 kernels form as scalars, the same bits.
            let dq = _mm512_mul_ps(d, da);
            if T == Q6 {
                let qj = _mm512_sub_epi32(q[j], _mm512_slli_epi32(bs, 5));
                f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qj), dq, f[j]);
            } else {
                f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[j]), dq, f[j]);
                let dm = _mm512_mul_ps(dmin, da);
                f[j] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(bs), dm, f[j]);
            }
        }
    }
    for (j, &fj) in f.iter().enumerate() {
        store_state(state, j, fj);
    }
}

/// The 32 levels of a Q8_0 / Q4_0 / Q5_0 block (T: 0, 1, 2) plus 128, as unsigned bytes, in
/// both halves: vpdpbusd multiplies unsigned by signed, and the pair block carries -128·(the
/// activations' sums of 4) to start each lane with (see [`PairQ8_0`]).
#[inline(always)]
unsafe fn zero_levels_biased<const T: u8>(wb: *const u8) -> __m512i {
    if T == 0 {
        // i8 + 128 as u8: the sign bit flipped.
        return _mm512_xor_si512(load_both(wb.add(2)), _mm512_set1_epi8(-128));
    }
    let qs = _mm_loadu_si128(wb.add(if T == 1 { 2 } else { 6 }) as *const __m128i);
    let nib = _mm256_and_si256(
        _mm256_setr_m128i(qs, _mm_srli_epi16(qs, 4)),
        _mm256_set1_epi8(0xF),
    );
    let v = if T == 1 {
        // (nib - 8) + 128
        _mm256_add_epi8(nib, _mm256_set1_epi8(120))
    } else {
        // Q5_0: bit i of qh to byte i; (nib | fifth - 16) + 128.
        let qh = wb.add(2).cast::<i32>().read_unaligned();
        let pick: [i8; 32] = std::array::from_fn(|i| (i / 8) as i8);
        let bytes = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh),
            _mm256_loadu_si256(pick.as_ptr().cast()),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
        let fifth = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
        _mm256_add_epi8(_mm256_or_si256(nib, fifth), _mm256_set1_epi8(112))
    };
    _mm512_broadcast_i64x4(v)
}

/// `super::avx2::zero_tile_state` for PAIR_TILE_ROWS activation rows given as PAIRS row pairs.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn zero_pairs_state(
    ty: GgmlType,
    w: &[u8],
    a: [&[PairQ8_0]; PAIRS],
    state: &mut [[f32; 8]; PAIR_TILE_ROWS],
) {
    match ty {
        GgmlType::Q8_0 => zero_pairs::<0>(w, a, state),
        GgmlType::Q4_0 => zero_pairs::<1>(w, a, state),
        _ => zero_pairs::<2>(w, a, state),
    }
}

#[inline(always)]
unsafe fn zero_pairs<const T: u8>(
    w: &[u8],
    a: [&[PairQ8_0]; PAIRS],
    state: &mut [[f32; 8]; PAIR_TILE_ROWS],
) {
    let size = zero_type(T).type_size();
    let blocks = w.len() / size;
    assert!(a.iter().all(|r| r.len() >= blocks));
    let mut f: [__m512; PAIRS] = std::array::from_fn(|j| load_state(state, j));
    for b in 0..blocks {
        let wb = w.as_ptr().add(b * size);
        prefetch_ahead(wb, 1);
        let dw = _mm512_cvtph_ps(_mm256_set1_epi16(wb.cast::<i16>().read_unaligned()));
        let u = zero_levels_biased::<T>(wb);
        for j in 0..PAIRS {
            let ab = a[j].get_unchecked(b);
            // Σ (level + 128)·a - 128·Σ a = Σ level·a, per lane of 4 neighbours: exact.
            let start = load(ab.bias.as_ptr().cast());
            let q = _mm512_dpbusd_epi32(start, u, load(ab.qs.as_ptr().cast()));
            let d = _mm512_mul_ps(dw, _mm512_loadu_ps(ab.d.as_ptr()));
            f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), d, f[j]);
        }
    }
    for (j, &fj) in f.iter().enumerate() {
        store_state(state, j, fj);
    }
}

// ---- the wide kernel of the 32-value types: 16 weight rows per vector ------------------------

/// One 32-value block of WIDE_ROWS weight rows, transposed: lane r of `lv[l]` holds row r's levels
/// 4l..4l + 3 plus 128 (unsigned bytes), `d[r]` its scale. A vpdpbusd of `lv[l]` with 4 activation
/// levels broadcast gives lane l of `super::zero_lanes_scalar` for 16 rows at once.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct WideBlock {
    lv: [[u8; 64]; QK8_0 / 4],
    d: [f32; WIDE_ROWS],
}

/// One activation row's outputs in progress for WIDE_ROWS weight rows: `f[l][r]` is lane l of
/// output r's 8 f32 lanes (as `dot_row_0` keeps them).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
pub(super) struct WideState {
    f: [[f32; WIDE_ROWS]; QK8_0 / 4],
}

/// The task's weight rows (`ws`, up to WIDE_ROWS of `row_bytes`, `WIDE_ROWS * row_bytes` within
/// i32: gather offsets) transposed into `out`, one [`WideBlock`] per block; rows past the last
/// are level 0 and scale 0 (computed, never stored). Each vector is one gather of 16 dwords.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn wide_blocks(
    ty: GgmlType,
    ws: &[u8],
    row_bytes: usize,
    out: &mut Vec<WideBlock>,
) {
    match ty {
        GgmlType::Q8_0 => wide_blocks_t::<0>(ws, row_bytes, out),
        GgmlType::Q4_0 => wide_blocks_t::<1>(ws, row_bytes, out),
        _ => wide_blocks_t::<2>(ws, row_bytes, out),
    }
}

#[inline(always)]
unsafe fn wide_blocks_t<const T: u8>(ws: &[u8], row_bytes: usize, out: &mut Vec<WideBlock>) {
    let size = zero_type(T).type_size();
    let (rows, per_row) = (ws.len() / row_bytes, row_bytes / size);
    assert!(rows <= WIDE_ROWS && WIDE_ROWS * row_bytes <= i32::MAX as usize);
    let live = ((1u32 << rows) - 1) as u16;
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let row_at = _mm512_mullo_epi32(lane, _mm512_set1_epi32(row_bytes as i32));
    let flip = _mm512_set1_epi8(-128);
    // Q4_0 / Q5_0: each row's 32 levels (+ 128) unpacked here first, rows past the last level 0.
    let mut levels = [[128u8; QK8_0]; WIDE_ROWS];
    let level_at = _mm512_mullo_epi32(lane, _mm512_set1_epi32(QK8_0 as i32));
    out.clear();
    out.reserve(per_row);
    for b in 0..per_row {
        let block = ws.as_ptr().add(b * size);
        let mut wide = WideBlock {
            lv: [[0; 64]; QK8_0 / 4],
            d: [0.0; WIDE_ROWS],
        };
        if T == 0 {
            for (l, lv) in wide.lv.iter_mut().enumerate() {
                let at = _mm512_add_epi32(row_at, _mm512_set1_epi32(2 + 4 * l as i32));
                let v = _mm512_mask_i32gather_epi32::<1>(
                    _mm512_setzero_si512(),
                    live,
                    at,
                    block.cast(),
                );
                // i8 + 128 as u8: the sign bit flipped (rows past the last: 0 -> level 0).
                _mm512_store_si512(lv.as_mut_ptr().cast(), _mm512_xor_si512(v, flip));
            }
        } else {
            for (r, lr) in levels.iter_mut().enumerate().take(rows) {
                let v = zero_levels_biased::<T>(block.add(r * row_bytes));
                _mm256_storeu_si256(lr.as_mut_ptr().cast(), _mm512_castsi512_si256(v));
            }
            for (l, lv) in wide.lv.iter_mut().enumerate() {
                let at = _mm512_add_epi32(level_at, _mm512_set1_epi32(4 * l as i32));
                let v = _mm512_i32gather_epi32::<1>(at, levels.as_ptr().cast());
                _mm512_store_si512(lv.as_mut_ptr().cast(), v);
            }
        }
        // The f16 scales (the first 2 bytes of each row's block), widened exactly.
        let h =
            _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), live, row_at, block.cast());
        _mm512_store_ps(
            wide.d.as_mut_ptr(),
            _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)),
        );
        out.push(wide);
    }
}

/// C activation rows (`a`, their blocks matching `w`'s) continue their states over the blocks of
/// `w`: per block, lane l of every weight row is Σ (level + 128)·a - 128·Σ a over 4 neighbours
/// (one vpdpbusd for 16 rows, exact), then f[l] += lane·(d_w·d_a) (one fused multiply-add):
/// `dot_row_0`'s lanes and folds, in the other direction of the vector.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn zero_wide<const C: usize>(
    w: &[WideBlock],
    a: [&[RowQ8_0]; C],
    state: &mut [WideState; C],
) {
    assert!(a.iter().all(|r| r.len() == w.len()));
    let mut f: [[__m512; QK8_0 / 4]; C] =
        std::array::from_fn(|c| std::array::from_fn(|l| _mm512_load_ps(state[c].f[l].as_ptr())));
    for (b, wb) in w.iter().enumerate() {
        let dw = _mm512_load_ps(wb.d.as_ptr());
        let d: [__m512; C] =
            std::array::from_fn(|c| _mm512_mul_ps(dw, _mm512_set1_ps(a[c].get_unchecked(b).d)));
        for (l, lv) in wb.lv.iter().enumerate() {
            let lv = _mm512_load_si512(lv.as_ptr().cast());
            for c in 0..C {
                let ab = a[c].get_unchecked(b);
                let four = ab.qs.as_ptr().cast::<i32>().add(l).read_unaligned();
                let q =
                    _mm512_dpbusd_epi32(_mm512_set1_epi32(ab.bias[l]), lv, _mm512_set1_epi32(four));
                f[c][l] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), d[c], f[c][l]);
            }
        }
    }
    for (fc, sc) in f.iter().zip(state.iter_mut()) {
        for (fl, sl) in fc.iter().zip(sc.f.iter_mut()) {
            _mm512_store_ps(sl.as_mut_ptr(), *fl);
        }
    }
}

/// The first `rows` outputs of a state, each its 8 lanes added as `super::hsum8` adds them
/// (halves, pairs, the last two: here for 16 rows at once), stored at `y` (contiguous).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn wide_out(s: &WideState, rows: usize, y: *mut f32) {
    let f: [__m512; 8] = std::array::from_fn(|l| _mm512_load_ps(s.f[l].as_ptr()));
    let a: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(f[i], f[i + 4]));
    let v = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
    _mm512_mask_storeu_ps(y, (1u32 << rows).wrapping_sub(1) as u16, v);
}

/// `super::quantize_q8k_scalar` on 16 lanes, the same values: the largest magnitude is exact
/// (a max), the first value holding it gives the sign as the scalar scan does (strict `>`), and
/// each level is ggml's `nearest_int` bit trick on the same f32 product, then min(127).
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_q8k(x: &[f32; 256]) -> BlockQ8K {
    let mut b = BlockQ8K {
        d: 0.0,
        qs: [0; 256],
        bsums: [0; 16],
    };
    let p = x.as_ptr();
    let sign = _mm512_set1_ps(-0.0);
    let mut amax = _mm512_setzero_ps();
    let mut finite = true;
    for c in 0..16 {
        let a = _mm512_andnot_ps(sign, _mm512_loadu_ps(p.add(16 * c)));
        // |v| <= f32::MAX is false for inf and NaN.
        finite &= _mm512_cmp_ps_mask::<_CMP_LE_OQ>(a, _mm512_set1_ps(f32::MAX)) == 0xffff;
        amax = _mm512_max_ps(amax, a);
    }
    if !finite {
        b.d = f32::NAN;
        return b;
    }
    let amax = _mm512_reduce_max_ps(amax);
    if amax == 0.0 {
        return b;
    }
    let at = (0..16)
        .find_map(|c| {
            let a = _mm512_andnot_ps(sign, _mm512_loadu_ps(p.add(16 * c)));
            let m = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(a, _mm512_set1_ps(amax));
            (m != 0).then(|| 16 * c + m.trailing_zeros() as usize)
        })
        .expect("the largest magnitude is one of the values");
    let iscale = -127.0 / x[at];
    let (sv, magic) = (_mm512_set1_ps(iscale), _mm512_set1_ps(12582912.0));
    for c in 0..16 {
        let t = _mm512_add_ps(_mm512_mul_ps(sv, _mm512_loadu_ps(p.add(16 * c))), magic);
        let i = _mm512_sub_epi32(
            _mm512_and_si512(_mm512_castps_si512(t), _mm512_set1_epi32(0x007f_ffff)),
            _mm512_set1_epi32(0x0040_0000),
        );
        let q = _mm512_min_epi32(i, _mm512_set1_epi32(127));
        _mm_storeu_si128(
            b.qs.as_mut_ptr().add(16 * c).cast(),
            _mm512_cvtepi32_epi8(q),
        );
        b.bsums[c] = _mm512_reduce_add_epi32(q) as i16;
    }
    b.d = 1.0 / iscale;
    b
}

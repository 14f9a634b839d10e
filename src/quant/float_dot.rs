//! Matrix products with weights stored as floats (F32, F16, BF16: a checkpoint's tensors, an
//! F16 mmproj, a float GGUF), on the stored bytes. Each panel of 16 weight rows is widened to
//! f32 into a small buffer that stays in cache while every activation row passes over it, so no
//! f32 copy of a matrix is ever made (the road before this widened every 16-bit weight of a 7B
//! forward, 26 GB of f32 written and read again, on one thread).
//!
//! Exactness: every output is one chain of fused multiply-adds over k in order,
//! `y = fma(x[k-1], w[k-1], ... fma(x[0], w[0], 0))`, whatever the ISA, the number of activation
//! rows or of threads. The AVX2 kernel holds 16 outputs of an activation row in two vectors (one
//! lane per output, so no lane ever mixes two terms of a sum) and the scalar code runs the same
//! chain with `f32::mul_add`; they agree bit for bit, and one row alone (a decode step) gives
//! the bits that row gets among many (a prefill).
//!
//! Shape of the work (the usual blocked GEMM): a task owns up to `NC_MAX` weight rows; for each
//! run of `KC` along k it widens its rows into `NR`-row panels laid out `[k][NR]`, then each tile
//! of `MR` activation rows x `NR` outputs (AVX-512: `MR2` rows x two panels) reads its activations
//! once per run and a panel per tile. One activation row (decode) skips the panels: 16 (AVX2: 8)
//! weight rows' next 16 (8) values are loaded, widened and transposed in registers, so each lane
//! still carries one output's chain (F16 7B decode 2.4x faster than through the panels).
use super::dot::Isa;
use super::{GgmlType, QuantError};
use rayon::prelude::*;

/// Outputs per tile: two 8-lane vectors.
const NR: usize = 16;
/// Activation rows per tile: 6 x 2 accumulators, 2 weight vectors and a broadcast fill 15 of
/// AVX2's 16 vector registers.
const MR: usize = 6;
/// Activation rows per two-panel tile (AVX-512): 24 accumulators of its 32 registers, so each
/// panel load serves 12 FMAs.
const MR2: usize = 12;
/// k per run: a task's panels (at most `NC_MAX` rows) are 128 KB of f32 and stay in L2.
const KC: usize = 256;
/// Most weight rows per task.
const NC_MAX: usize = 128;
/// Weight rows per task of the one-row product (AVX2 / AVX-512): groups of 8 / NR, each read
/// once.
const MATVEC_ROWS: usize = 4 * NR;

/// Weight types this module multiplies on their stored bytes.
pub fn supported(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// x [n, k] (f32, row-major) times the transpose of the weight [out, k] stored as `ty` in `w`
/// (little-endian, any alignment): y [n, out], row-major.
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
    let values = out.checked_mul(k);
    if values.and_then(|v| v.checked_mul(ty.type_size())) != Some(w.len()) {
        return Err(QuantError::BadLength {
            ty,
            values: values.unwrap_or(usize::MAX),
            bytes: Some(w.len()),
        });
    }
    if n.checked_mul(k) != Some(x.len()) {
        return Err(QuantError::BadLength {
            ty: GgmlType::F32,
            values: n.saturating_mul(k),
            bytes: Some(x.len() * 4),
        });
    }
    let mut y = vec![0f32; n * out];
    if n == 0 || out == 0 || k == 0 {
        return Ok(y);
    }
    #[cfg(target_arch = "x86_64")]
    if n == 1 && isa.vector() {
        // A lone row (decode): its weight rows are read once, so packing them into panels (a
        // store and a load of every value, plus the transposes) is pure cost.
        let group = if isa == Isa::Avx512 { NR } else { 8 };
        let size = ty.type_size();
        y.par_chunks_mut(MATVEC_ROWS)
            .enumerate()
            .for_each(|(t, yt)| {
                for (g, yg) in yt.chunks_mut(group).enumerate() {
                    let r0 = t * MATVEC_ROWS + g * group;
                    let rows = &w[r0 * k * size..(r0 + yg.len()) * k * size];
                    // SAFETY: the ISA's features detected; `rows` holds yg.len() <= group rows
                    // of k values.
                    unsafe {
                        if isa == Isa::Avx512 {
                            avx512::matvec(ty, rows, k, x, yg)
                        } else {
                            avx2::matvec(ty, rows, k, x, yg)
                        }
                    };
                }
            });
        return Ok(y);
    }
    // Tasks: blocks of weight rows, and when those are too few to keep every thread busy (a
    // narrow weight), blocks of activation rows too (each then widens its panels itself).
    let threads = rayon::current_num_threads();
    let nc = out
        .div_ceil(2 * threads)
        .next_multiple_of(NR)
        .clamp(NR, NC_MAX);
    let col_tasks = out.div_ceil(nc);
    let row_blocks = (4 * threads).div_ceil(col_tasks).min(n.div_ceil(MR));
    let mb = n.div_ceil(row_blocks).next_multiple_of(MR);
    let weight = Stored {
        ty,
        bytes: w,
        stride: k,
    };
    let y_out = OutPtr(y.as_mut_ptr());
    (0..col_tasks * n.div_ceil(mb))
        .into_par_iter()
        .for_each(|t| {
            let (c, r) = (t % col_tasks, t / col_tasks);
            let cols = c * nc..((c + 1) * nc).min(out);
            let rows = r * mb..((r + 1) * mb).min(n);
            // SAFETY: tasks own disjoint (rows, cols) rectangles of y, which outlives them.
            unsafe { task(isa, &weight, x, out, cols, rows, y_out.get()) }
        });
    Ok(y)
}

/// The right-hand operand of [`gemm_serial`]: B [k, cols] read from an f32 buffer, either
/// as `cols` rows of k values (B's columns stored as rows, like a weight: attention's keys) or
/// as k rows of `cols` values (B as stored: attention's values).
#[derive(Clone, Copy)]
pub enum Right<'a> {
    /// Column j of B is `data[j * stride..][..k]`.
    Rows { data: &'a [f32], stride: usize },
    /// Row p of B is `data[p * stride..][..cols]`.
    Cols { data: &'a [f32], stride: usize },
}

/// C [rows, cols] (stride `ldc`) = A [rows, k] (stride `lda`) x B, on this thread, with the
/// tiles of [`matmul`] and the same sums: each output one chain of FMAs over k in order. For
/// products the caller already runs many of in parallel (attention's heads and query tiles).
/// Panics when a slice is too short for its shape.
#[allow(clippy::too_many_arguments)]
pub fn gemm_serial(
    isa: Isa,
    a: &[f32],
    lda: usize,
    rows: usize,
    k: usize,
    b: Right<'_>,
    cols: usize,
    c: &mut [f32],
    ldc: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(a.len() >= (rows - 1) * lda + k && c.len() >= (rows - 1) * ldc + cols);
    if k == 0 {
        (0..rows).for_each(|i| c[i * ldc..i * ldc + cols].fill(0.0));
        return;
    }
    // AVX-512: two panels per tile (see `task`), packed KC * NR apart.
    let width = panels_per_tile(isa);
    let mut panel = vec![0f32; width * KC * NR];
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        for c0 in (0..cols).step_by(width * NR) {
            let live = (width * NR).min(cols - c0);
            for h in 0..live.div_ceil(NR) {
                let (c1, live1) = (c0 + h * NR, NR.min(live - h * NR));
                let dst = &mut panel[h * KC * NR..][..kc * NR];
                match b {
                    Right::Rows { data, stride } => {
                        let m = Stored {
                            ty: GgmlType::F32,
                            bytes: bytemuck::cast_slice(data),
                            stride,
                        };
                        pack_panel(isa, &m, c1, live1, p0, dst);
                    }
                    Right::Cols { data, stride } => {
                        for (q, d) in dst.chunks_exact_mut(NR).enumerate() {
                            let row = &data[(p0 + q) * stride + c1..][..live1];
                            d[..live1].copy_from_slice(row);
                            d[live1..].fill(0.0);
                        }
                    }
                }
            }
            let step = rows_per_tile(isa);
            for i0 in (0..rows).step_by(step) {
                let tile = Tile {
                    kc,
                    a: &a[i0 * lda + p0..],
                    lda,
                    b: &panel,
                    c: c[i0 * ldc + c0..].as_mut_ptr(),
                    ldc,
                    live,
                    first: p0 == 0,
                };
                // SAFETY: rows i0..i0+m of c, columns c0..c0+live, lie in `c` (asserted above),
                // which this call borrows mutably; two panels only with Isa::Avx512.
                unsafe { tile.run_rows(isa, step.min(rows - i0)) };
            }
        }
    }
}

/// A row-major matrix as stored: value (r, p) at byte `(r * stride + p) * ty.type_size()`.
struct Stored<'a> {
    ty: GgmlType,
    bytes: &'a [u8],
    stride: usize,
}

/// y's buffer, shared by the tasks (each writes only its own rectangle).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint elements and y outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    // A method, so closures capture the Sync wrapper rather than its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Outputs `rows` x `cols` of y (row stride `out`).
///
/// # Safety
/// `y` points to n x out f32; no other thread touches this rectangle meanwhile.
unsafe fn task(
    isa: Isa,
    weight: &Stored<'_>,
    x: &[f32],
    out: usize,
    cols: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    y: *mut f32,
) {
    let panels = cols.len().div_ceil(NR);
    let mut pack = vec![0f32; panels * KC * NR];
    let k = weight.stride;
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        for (pi, panel) in pack.chunks_exact_mut(KC * NR).enumerate() {
            let r0 = cols.start + pi * NR;
            let live = NR.min(cols.end - r0);
            pack_panel(isa, weight, r0, live, p0, &mut panel[..kc * NR]);
        }
        // AVX-512: two panels per tile (32 outputs), the last one alone.
        let (width, step) = (panels_per_tile(isa), rows_per_tile(isa));
        for i0 in rows.clone().step_by(step) {
            for pi in (0..panels).step_by(width) {
                let c0 = cols.start + pi * NR;
                let tile = Tile {
                    kc,
                    a: &x[i0 * k + p0..],
                    lda: k,
                    b: &pack[pi * KC * NR..],
                    c: y.add(i0 * out + c0),
                    ldc: out,
                    live: (width * NR).min(cols.end - c0),
                    first: p0 == 0,
                };
                tile.run_rows(isa, step.min(rows.end - i0));
            }
        }
    }
}

/// Widens weight rows `r0 .. r0+live` (the rest of the panel's `NR` zero), columns
/// `p0 .. p0 + kc`, into `dst` laid out `[kc][NR]`.
fn pack_panel(isa: Isa, m: &Stored<'_>, r0: usize, live: usize, p0: usize, dst: &mut [f32]) {
    let kc = dst.len() / NR;
    let (w, size, stride) = (m.bytes, m.ty.type_size(), m.stride);
    let mut p = 0;
    #[cfg(target_arch = "x86_64")]
    if isa.vector() {
        // Whole 8x8 squares: 8 rows' 8 values widened and transposed into 8 columns.
        p = kc / 8 * 8;
        for g in [0, 8] {
            let rows: [Option<&[u8]>; 8] = std::array::from_fn(|i| {
                let r = g + i;
                (r < live).then(|| {
                    &w[((r0 + r) * stride + p0) * size..((r0 + r) * stride + p0 + p) * size]
                })
            });
            // SAFETY: AVX2, FMA and F16C detected (Isa::Avx2); each row holds `p` values.
            unsafe { avx2::pack_squares(m.ty, &rows, p, &mut dst[g..]) };
        }
    }
    for r in 0..NR {
        let row = (r < live).then(|| ((r0 + r) * stride + p0) * size);
        for q in p..kc {
            dst[q * NR + r] = row.map_or(0.0, |o| widen(m.ty, &w[o + q * size..]));
        }
    }
}

/// Value q of each of the first `live` weight rows in `w` (k values of `ty` each), zero past
/// them: one column of an L-row group of the one-row product, past its last whole square.
#[cfg(target_arch = "x86_64")]
fn column<const L: usize>(ty: GgmlType, w: &[u8], k: usize, live: usize, q: usize) -> [f32; L] {
    let size = ty.type_size();
    std::array::from_fn(|i| {
        if i < live {
            widen(ty, &w[(i * k + q) * size..])
        } else {
            0.0
        }
    })
}

/// The value of type `ty` at the start of `b` as f32 (exact for all three types).
fn widen(ty: GgmlType, b: &[u8]) -> f32 {
    match ty {
        GgmlType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    }
}

/// One tile: up to `MR` activation rows (from `a`, stride `lda`) against one packed panel `b`,
/// into c (stride `ldc`), of which only the first `live` columns exist. `first`: the run that
/// starts the sums (else they go on from what c holds).
struct Tile<'a> {
    kc: usize,
    a: &'a [f32],
    lda: usize,
    b: &'a [f32],
    c: *mut f32,
    ldc: usize,
    live: usize,
    first: bool,
}

/// Panels (of NR outputs) one tile covers: two on AVX-512 (`avx512::tile2`), else one.
fn panels_per_tile(isa: Isa) -> usize {
    if isa == Isa::Avx512 {
        2
    } else {
        1
    }
}

/// Activation rows the callers hand to one [`Tile::run_rows`].
fn rows_per_tile(isa: Isa) -> usize {
    if isa == Isa::Avx512 {
        MR2
    } else {
        MR
    }
}

impl Tile<'_> {
    /// `m` rows (at most `rows_per_tile(isa)`): a two-panel tile where `live` spans two panels
    /// (packed `KC * NR` apart in `b`; made only for `Isa::Avx512`), else single-panel tiles of
    /// up to MR rows.
    ///
    /// # Safety
    /// As [`Tile::run`].
    unsafe fn run_rows(&self, isa: Isa, m: usize) {
        if self.live > NR {
            return self.run_pair(m);
        }
        for s in (0..m).step_by(MR) {
            let rows = Tile {
                a: &self.a[s * self.lda..],
                c: self.c.add(s * self.ldc),
                ..*self
            };
            rows.run(isa, MR.min(m - s));
        }
    }

    /// # Safety
    /// `c` addresses `m` rows of `live` writable values at stride `ldc`, owned by the caller.
    unsafe fn run(&self, isa: Isa, m: usize) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => match m {
                1 => avx2::tile::<1>(self),
                2 => avx2::tile::<2>(self),
                3 => avx2::tile::<3>(self),
                4 => avx2::tile::<4>(self),
                5 => avx2::tile::<5>(self),
                _ => avx2::tile::<MR>(self),
            },
            _ => self.scalar(m),
        }
    }

    /// [`Tile::run`] on two panels at once: `b` holds the second at offset `KC * NR`, `live`
    /// counts the outputs of both. Only with `Isa::Avx512` (detected by the caller).
    ///
    /// # Safety
    /// As [`Tile::run`]; AVX-512 F detected.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_pair(&self, m: usize) {
        match m {
            1 => avx512::tile2::<1>(self),
            2 => avx512::tile2::<2>(self),
            3 => avx512::tile2::<3>(self),
            4 => avx512::tile2::<4>(self),
            5 => avx512::tile2::<5>(self),
            6 => avx512::tile2::<6>(self),
            7 => avx512::tile2::<7>(self),
            8 => avx512::tile2::<8>(self),
            9 => avx512::tile2::<9>(self),
            10 => avx512::tile2::<10>(self),
            11 => avx512::tile2::<11>(self),
            _ => avx512::tile2::<MR2>(self),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_pair(&self, _m: usize) {
        unreachable!("two-panel tiles are AVX-512 only")
    }

    unsafe fn scalar(&self, m: usize) {
        for i in 0..m {
            for j in 0..self.live {
                let c = self.c.add(i * self.ldc + j);
                let mut acc = if self.first { 0.0 } else { *c };
                for p in 0..self.kc {
                    acc = self.a[i * self.lda + p].mul_add(self.b[p * NR + j], acc);
                }
                *c = acc;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{GgmlType, Tile, MR, NR};
    use crate::quant::dot::transpose8;
    use std::arch::x86_64::*;

    /// 8 values of `ty` at `p` as f32.
    #[inline(always)]
    unsafe fn widen8(ty: GgmlType, p: *const u8) -> __m256 {
        match ty {
            GgmlType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            GgmlType::BF16 => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
            _ => _mm256_loadu_ps(p.cast()),
        }
    }

    /// Rows (None: zero) x `p` values (a multiple of 8) into `dst[q * NR + i]` for row i.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn pack_squares(
        ty: GgmlType,
        rows: &[Option<&[u8]>; 8],
        p: usize,
        dst: &mut [f32],
    ) {
        let size = ty.type_size();
        debug_assert!(dst.len() >= (p.max(1) - 1) * NR + 8);
        for q0 in (0..p).step_by(8) {
            let v: [__m256; 8] = std::array::from_fn(|i| match rows[i] {
                Some(r) => widen8(ty, r[q0 * size..].as_ptr()),
                None => _mm256_setzero_ps(),
            });
            let t = transpose8(v);
            for (q, col) in t.iter().enumerate() {
                _mm256_storeu_ps(dst[(q0 + q) * NR..].as_mut_ptr(), *col);
            }
        }
    }

    /// `super::avx512::matvec` on 8-lane vectors: 8 weight rows' next 8 values loaded, widened
    /// and transposed 8x8 in registers, each lane one output's chain of FMAs over k in order.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec(ty: GgmlType, w: &[u8], k: usize, x: &[f32], y: &mut [f32]) {
        let (live, size) = (y.len(), ty.type_size());
        assert!(live <= 8 && w.len() == live * k * size && x.len() == k);
        let row = |i: usize| w.as_ptr().add(i * k * size);
        let mut acc = _mm256_setzero_ps();
        let whole = k / 8 * 8;
        for q0 in (0..whole).step_by(8) {
            let r: [__m256; 8] = std::array::from_fn(|i| {
                if i < live {
                    widen8(ty, row(i).add(q0 * size))
                } else {
                    _mm256_setzero_ps()
                }
            });
            for (j, cj) in transpose8(r).iter().enumerate() {
                acc = _mm256_fmadd_ps(_mm256_set1_ps(*x.get_unchecked(q0 + j)), *cj, acc);
            }
        }
        for (q, &xq) in x.iter().enumerate().skip(whole) {
            let col = super::column::<8>(ty, w, k, live, q);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(xq), _mm256_loadu_ps(col.as_ptr()), acc);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
        y.copy_from_slice(&out[..live]);
    }

    /// `M` rows of the tile (see [`Tile`]); each lane one output's chain of FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const M: usize>(t: &Tile<'_>) {
        debug_assert!(M <= MR && t.b.len() >= t.kc * NR);
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let mut edge = [0f32; NR];
        if !t.first {
            for (i, a) in acc.iter_mut().enumerate() {
                let c = t.c.add(i * t.ldc);
                let src = if t.live == NR {
                    c.cast_const()
                } else {
                    std::ptr::copy_nonoverlapping(c, edge.as_mut_ptr(), t.live);
                    edge.as_ptr()
                };
                *a = [_mm256_loadu_ps(src), _mm256_loadu_ps(src.add(8))];
            }
        }
        let (a, b) = (t.a.as_ptr(), t.b.as_ptr());
        for p in 0..t.kc {
            let b0 = _mm256_loadu_ps(b.add(p * NR));
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(i * t.lda + p));
                acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let c = t.c.add(i * t.ldc);
            if t.live == NR {
                _mm256_storeu_ps(c, a[0]);
                _mm256_storeu_ps(c.add(8), a[1]);
            } else {
                _mm256_storeu_ps(edge.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(edge.as_mut_ptr().add(8), a[1]);
                std::ptr::copy_nonoverlapping(edge.as_ptr(), c, t.live);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Tile, KC, MR2, NR};
    use crate::quant::GgmlType;
    use std::arch::x86_64::*;

    /// 16 values of type `ty` at `p` as f32 (exact).
    #[inline(always)]
    unsafe fn widen16(ty: GgmlType, p: *const u8) -> __m512 {
        match ty {
            GgmlType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            GgmlType::BF16 => {
                let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
            }
            _ => _mm512_loadu_ps(p.cast()),
        }
    }

    /// The 16x16 transpose: lane j of result i is lane i of input j.
    #[inline(always)]
    unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // In each 128-bit lane L (columns 4L..4L+4): t[2i] = (r[2i] c0, r[2i+1] c0, r[2i] c1,
        // r[2i+1] c1), t[2i+1] the same for c2, c3.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // u[4q + j], lane L: rows 4q..4q+4 of column 4L + j.
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (q, j) = (i / 4, i % 4);
            let (a, b) = (t[4 * q + j / 2], t[4 * q + 2 + j / 2]);
            if j % 2 == 0 {
                _mm512_shuffle_ps::<0x44>(a, b)
            } else {
                _mm512_shuffle_ps::<0xEE>(a, b)
            }
        });
        // Column 4L + j gathers lane L of u[j], u[4 + j], u[8 + j], u[12 + j]: first lanes
        // (0, 2) and (1, 3) of each pair of those, then of the pairs.
        let mut out = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            let a = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
            let b = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
            let c = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
            let d = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
            out[j] = _mm512_shuffle_f32x4::<0x88>(a, c);
            out[8 + j] = _mm512_shuffle_f32x4::<0xDD>(a, c);
            out[4 + j] = _mm512_shuffle_f32x4::<0x88>(b, d);
            out[12 + j] = _mm512_shuffle_f32x4::<0xDD>(b, d);
        }
        out
    }

    /// y[r] = x · weight row r for the `y.len()` (<= 16) rows in `w` (k values each, type
    /// `ty`): each output one chain of FMAs over k in order from 0, as the tiles sum it, with the
    /// 16 rows' values for each k brought into one vector by a 16x16 transpose of what 16 row
    /// loads give.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn matvec(ty: GgmlType, w: &[u8], k: usize, x: &[f32], y: &mut [f32]) {
        let (live, size) = (y.len(), ty.type_size());
        assert!(live <= NR && w.len() == live * k * size && x.len() == k);
        let row = |i: usize| w.as_ptr().add(i * k * size);
        let mut acc = _mm512_setzero_ps();
        let whole = k / NR * NR;
        for q0 in (0..whole).step_by(NR) {
            let r: [__m512; 16] = std::array::from_fn(|i| {
                if i < live {
                    widen16(ty, row(i).add(q0 * size))
                } else {
                    _mm512_setzero_ps()
                }
            });
            let c = transpose16(r);
            for (j, cj) in c.iter().enumerate() {
                acc = _mm512_fmadd_ps(_mm512_set1_ps(*x.get_unchecked(q0 + j)), *cj, acc);
            }
        }
        for (q, &xq) in x.iter().enumerate().skip(whole) {
            let col = super::column::<16>(ty, w, k, live, q);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(xq), _mm512_loadu_ps(col.as_ptr()), acc);
        }
        _mm512_mask_storeu_ps(y.as_mut_ptr(), ((1u32 << live) - 1) as __mmask16, acc);
    }

    /// `M` rows of a two-panel tile (see [`Tile::run_pair`]): 32 outputs per row in two 16-lane
    /// vectors, each lane one output's chain of FMAs, as the AVX2 tile and the scalar code sum.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn tile2<const M: usize>(t: &Tile<'_>) {
        debug_assert!(M <= MR2 && t.b.len() >= KC * NR + t.kc * NR && t.live > NR);
        // Outputs that exist in each half (the second panel may be partial).
        let mask = |h: usize| -> __mmask16 {
            let n = t.live.saturating_sub(h * NR).min(NR);
            ((1u32 << n) - 1) as __mmask16
        };
        let (m0, m1) = (mask(0), mask(1));
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        if !t.first {
            for (i, a) in acc.iter_mut().enumerate() {
                let c = t.c.add(i * t.ldc).cast_const();
                *a = [
                    _mm512_maskz_loadu_ps(m0, c),
                    _mm512_maskz_loadu_ps(m1, c.add(NR)),
                ];
            }
        }
        let (a, b) = (t.a.as_ptr(), t.b.as_ptr());
        for p in 0..t.kc {
            let b0 = _mm512_loadu_ps(b.add(p * NR));
            let b1 = _mm512_loadu_ps(b.add(KC * NR + p * NR));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(i * t.lda + p));
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let c = t.c.add(i * t.ldc);
            _mm512_mask_storeu_ps(c, m0, a[0]);
            _mm512_mask_storeu_ps(c.add(NR), m1, a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(0x9e37_79b9).rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn stored(ty: GgmlType, v: &[f32]) -> Vec<u8> {
        match ty {
            GgmlType::F16 => v
                .iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
            GgmlType::BF16 => v
                .iter()
                .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// The contract, written out: one chain of FMAs over k per output, on the weights widened
    /// by half's own conversions.
    fn chains(ty: GgmlType, w: &[u8], out: usize, k: usize, x: &[f32], n: usize) -> Vec<f32> {
        let wf: Vec<f32> = match ty {
            GgmlType::F16 => w
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            GgmlType::BF16 => w
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => w
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        };
        let mut y = vec![0f32; n * out];
        for i in 0..n {
            for j in 0..out {
                y[i * out + j] =
                    (0..k).fold(0f32, |acc, p| x[i * k + p].mul_add(wf[j * k + p], acc));
            }
        }
        y
    }

    /// Shapes with edges everywhere: k not a multiple of 8 nor of KC, out not of 16, n not of 6;
    /// enough rows for several row blocks per weight-row block.
    // One row: AVX-512's transposing mat-vec (whole groups of 16 rows and of 16 values, a
    // partial group of each, and tasks of 64 rows); then the tiles.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (1, 16, 8),
        (1, 70, 600),
        (1, 133, 32),
        (7, 33, 300),
        (13, 130, 517),
        (6, 16, 256),
        (40, 200, 64),
        (50, 3, 9),
    ];

    #[test]
    fn every_output_is_its_chain_of_fmas_on_every_isa() {
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            for &(n, out, k) in &SHAPES {
                let x = values(n * k, 1);
                let w = stored(ty, &values(out * k, 2));
                let want = chains(ty, &w, out, k, &x, n);
                for isa in Isa::all_here() {
                    let y = matmul_with(isa, ty, &w, out, k, &x, n).unwrap();
                    assert!(
                        y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{ty} {isa:?} n={n} out={out} k={k}"
                    );
                }
            }
        }
    }

    /// gemm_serial (attention's tiles) on every ISA: each output its chain of FMAs, with B given
    /// as rows or as columns, strides wider than the shapes, and edges in every dimension.
    #[test]
    fn gemm_serial_outputs_are_chains_on_every_isa() {
        for (rows, k, cols) in [
            (1, 1, 1),
            (7, 300, 33),
            (13, 64, 50),
            (6, 517, 16),
            (3, 9, 70),
        ] {
            let (lda, ldb, ldc) = (k + 3, k.max(cols) + 5, cols + 2);
            let a = values(rows * lda, 7);
            let bdata = values(ldb * k.max(cols), 8);
            for by_rows in [true, false] {
                // B[p][j] as the product reads it.
                let bv = |p: usize, j: usize| {
                    if by_rows {
                        bdata[j * ldb + p]
                    } else {
                        bdata[p * ldb + j]
                    }
                };
                let right = if by_rows {
                    Right::Rows {
                        data: &bdata,
                        stride: ldb,
                    }
                } else {
                    Right::Cols {
                        data: &bdata,
                        stride: ldb,
                    }
                };
                for isa in Isa::all_here() {
                    let mut c = vec![f32::NAN; rows * ldc];
                    gemm_serial(isa, &a, lda, rows, k, right, cols, &mut c, ldc);
                    for i in 0..rows {
                        for j in 0..cols {
                            let want =
                                (0..k).fold(0f32, |acc, p| a[i * lda + p].mul_add(bv(p, j), acc));
                            assert_eq!(
                                c[i * ldc + j].to_bits(),
                                want.to_bits(),
                                "{isa:?} rows={rows} k={k} cols={cols} by_rows={by_rows} ({i}, {j})"
                            );
                        }
                        // Columns past `cols` are not written.
                        assert!(c[i * ldc + cols..(i + 1) * ldc].iter().all(|v| v.is_nan()));
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_alone_equals_that_row_among_many_whatever_the_threads() {
        let (n, out, k) = (29, 70, 600);
        let x = values(n * k, 3);
        for ty in [GgmlType::F32, GgmlType::F16] {
            let w = stored(ty, &values(out * k, 4));
            let all = matmul(ty, &w, out, k, &x, n).unwrap();
            for i in [0, 5, 28] {
                let one = matmul(ty, &w, out, k, &x[i * k..(i + 1) * k], 1).unwrap();
                assert_eq!(one, all[i * out..(i + 1) * out], "{ty}");
            }
        }
        let w = stored(GgmlType::BF16, &values(out * k, 4));
        let all = matmul(GgmlType::BF16, &w, out, k, &x, n).unwrap();
        for i in [0, 5, 28] {
            let one = matmul(GgmlType::BF16, &w, out, k, &x[i * k..(i + 1) * k], 1).unwrap();
            assert_eq!(one, all[i * out..(i + 1) * out]);
        }
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let y = pool.install(|| matmul(GgmlType::BF16, &w, out, k, &x, n).unwrap());
            assert_eq!(y, all, "{threads} threads");
        }
    }

    #[test]
    fn weights_at_any_alignment_and_bad_lengths() {
        let (n, out, k) = (3, 17, 40);
        let x = values(n * k, 5);
        for ty in [GgmlType::F32, GgmlType::F16] {
            let w = stored(ty, &values(out * k, 6));
            let mut shifted = vec![0u8; w.len() + 1];
            shifted[1..].copy_from_slice(&w);
            assert_eq!(
                matmul(ty, &shifted[1..], out, k, &x, n).unwrap(),
                matmul(ty, &w, out, k, &x, n).unwrap()
            );
            assert!(matches!(
                matmul(ty, &w[1..], out, k, &x, n),
                Err(QuantError::BadLength { .. })
            ));
            assert!(matches!(
                matmul(ty, &w, out, k, &x[1..], n),
                Err(QuantError::BadLength { .. })
            ));
        }
        assert!(matches!(
            matmul(GgmlType::Q8_0, &[], 0, 32, &[], 0),
            Err(QuantError::Unsupported(_))
        ));
        assert_eq!(
            matmul(GgmlType::F32, &[], 4, 0, &[], 2).unwrap(),
            vec![0.0; 8]
        );
    }
}

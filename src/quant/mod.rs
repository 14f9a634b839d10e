//! Block quantizers, byte-identical to ggml's reference (`quantize_row_*_ref`, no imatrix)
//! as built for x86-64 (plain IEEE f32 arithmetic, no FMA contraction), and llama-quantize's
//! per-tensor type choice (`mixture`).
//!
//! Layout, like candle-core's `quantized/k_quants.rs`: one small struct per block format with
//! the fields of ggml's block struct (`legacy`: Q8_0, Q4_0, Q5_0, Q5_1; `kquants`: Q4_K, Q5_K,
//! Q6_K), each implementing [`Block`]; the shared math (ggml's `nearest_int`, scale searches)
//! lives in `math`. Elements per block and bytes per block come from [`GgmlType`]
//! (`gguf::types`, the one table of those facts); the structs only check they agree.
//!
//! Why byte parity matters: a GGUF written by this tool should be indistinguishable from the
//! one llama.cpp's `convert_hf_to_gguf.py` + `llama-quantize` would write from the same f32
//! values, so the oracle comparisons measure conversion, not quantizer drift.

pub mod dot;
pub mod float_dot;
mod kquants;
mod legacy;
mod math;
pub mod mixture;
#[cfg(test)]
mod tests;

pub use crate::ground::dtype::GgmlType;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

pub use kquants::{BlockQ4K, BlockQ5K, BlockQ6K};
pub use legacy::{BlockQ4_0, BlockQ5_0, BlockQ5_1, BlockQ8_0};

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// ggml would quantize NaN/Inf into garbage (and llama-quantize rejects the row);
    /// we refuse up front. `index` is the first bad element of the input.
    #[error("non-finite value (NaN or Inf) at element {index}")]
    NonFinite { index: usize },
    /// `values` elements do not fill whole blocks of `ty`, or `bytes` (the buffer given, when
    /// there is one) is not the size those blocks take.
    #[error("{}", bad_len_msg(*.ty, *.values, *.bytes))]
    BadLength {
        ty: GgmlType,
        values: usize,
        bytes: Option<usize>,
    },
    /// A ggml type this module does not (de)quantize.
    #[error("quantization type {0} is not supported")]
    Unsupported(GgmlType),
}

/// One ggml block format: the struct mirrors ggml's `block_*` (ggml-common.h) field for field.
pub trait Block: Sized {
    /// The ggml type; its block size and byte size come from the `gguf::types` table.
    const TYPE: GgmlType;
    /// Elements per block (must equal `TYPE.block_size()`; checked in tests).
    const QK: usize;
    /// Bytes per block (must equal `TYPE.type_size()`; checked in tests).
    const SIZE: usize;
    /// Byte offsets of the block's fp16 scale fields. Every dequantized value is one of them
    /// times a small integer (plus another): all finite when they are, and the block's first
    /// value non-finite when one is not (inf·0 is NaN). Checked against `dequantize` in tests.
    const F16_AT: &'static [usize];
    /// ggml's `quantize_row_*_ref` on exactly `QK` finite values.
    fn quantize(x: &[f32]) -> Self;
    /// `quantize` for every block of `x` (a whole number of blocks) into `out` (as many times
    /// `SIZE` bytes), the same bytes; formats override it where several blocks go faster together.
    fn quantize_many(x: &[f32], out: &mut [u8]) {
        for (xb, o) in x
            .chunks_exact(Self::QK)
            .zip(out.chunks_exact_mut(Self::SIZE))
        {
            Self::quantize(xb).write(o);
        }
    }
    /// ggml's `dequantize_row_*` into exactly `QK` values.
    fn dequantize(&self, y: &mut [f32]);
    /// Little-endian bytes in ggml's struct layout (`SIZE` bytes).
    fn write(&self, out: &mut [u8]);
    /// Inverse of `write` (`SIZE` bytes).
    fn read(b: &[u8]) -> Self;
}

fn bad_len_msg(ty: GgmlType, values: usize, bytes: Option<usize>) -> String {
    match (ty.bytes_for(values as u64), bytes) {
        (None, _) => format!(
            "{ty}: {values} values are not a whole number of {}-value blocks",
            ty.block_size()
        ),
        (Some(need), Some(got)) => {
            format!("{ty}: {values} values take {need} bytes, buffer has {got}")
        }
        (Some(_), None) => format!("{ty}: {values} values do not split into whole rows"),
    }
}

fn bad_len(ty: GgmlType, values: usize, bytes: Option<usize>) -> QuantError {
    QuantError::BadLength { ty, values, bytes }
}

/// Checks that `values` elements of `ty` fit exactly in `bytes` bytes.
fn check_len(ty: GgmlType, values: usize, bytes: usize) -> Result<(), QuantError> {
    match ty.bytes_for(values as u64) {
        Some(n) if n == bytes as u64 => Ok(()),
        _ => Err(bad_len(ty, values, Some(bytes))),
    }
}

fn first_non_finite(src: &[f32]) -> Result<(), QuantError> {
    match src.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite { index }),
        None => Ok(()),
    }
}

/// ggml's `ggml_compute_fp32_to_bf16` (ggml-impl.h): round to nearest, ties to even, by adding
/// 0x7fff plus the lowest kept bit. (NaN never reaches here: it is rejected up front.)
pub(crate) fn f32_to_bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

fn quantize_blocks<B: Block>(src: &[f32], dst: &mut [u8]) {
    B::quantize_many(src, dst)
}

fn dequantize_blocks<B: Block>(bytes: &[u8], dst: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(B::SIZE).zip(dst.chunks_exact_mut(B::QK)) {
        B::read(b).dequantize(y);
    }
}

/// The quantizer body, after length and finiteness checks.
fn quantize_unchecked(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    match ty {
        GgmlType::F32 => {
            for (v, o) in src.iter().zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            // IEEE round-to-nearest-even, as ggml's FP16 conversion and numpy's astype(float16).
            for (v, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (v, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
            }
        }
        GgmlType::Q8_0 => quantize_blocks::<BlockQ8_0>(src, dst),
        GgmlType::Q4_0 => quantize_blocks::<BlockQ4_0>(src, dst),
        GgmlType::Q5_0 => quantize_blocks::<BlockQ5_0>(src, dst),
        GgmlType::Q5_1 => quantize_blocks::<BlockQ5_1>(src, dst),
        GgmlType::Q4K => quantize_blocks::<BlockQ4K>(src, dst),
        GgmlType::Q5K => quantize_blocks::<BlockQ5K>(src, dst),
        GgmlType::Q6K => quantize_blocks::<BlockQ6K>(src, dst),
        GgmlType::Q4_1 => return Err(QuantError::Unsupported(ty)),
    }
    Ok(())
}

/// Quantize `src` (length a multiple of ty.block_size()) into `dst` (exactly ty.bytes_for(len) bytes).
/// Supported: F32, F16 (round-to-nearest-even), BF16 (ggml's fp32->bf16 rounding), Q8_0, Q4_0,
/// Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.
/// Rejects NaN/Inf with Err(QuantError::NonFinite{index}) (index of the first bad element).
pub fn quantize_into(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    if ty == GgmlType::Q4_1 {
        return Err(QuantError::Unsupported(ty));
    }
    check_len(ty, src.len(), dst.len())?;
    first_non_finite(src)?;
    quantize_unchecked(ty, src, dst)
}

/// [`quantize_into`] into a new buffer.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    let n = ty
        .bytes_for(src.len() as u64)
        .ok_or_else(|| bad_len(ty, src.len(), None))?;
    let mut out = vec![0u8; n as usize];
    quantize_into(ty, src, &mut out)?;
    Ok(out)
}

/// Same as [`quantize`], split over rayon in chunks of whole rows of `row_len`; bytes identical
/// for any thread count (every block depends only on its own values).
pub fn quantize_par(ty: GgmlType, src: &[f32], row_len: usize) -> Result<Vec<u8>, QuantError> {
    if ty == GgmlType::Q4_1 {
        return Err(QuantError::Unsupported(ty));
    }
    let row_bytes = ty
        .bytes_for(row_len as u64)
        .ok_or_else(|| bad_len(ty, row_len, None))? as usize;
    if row_len == 0 || !src.len().is_multiple_of(row_len) {
        return Err(bad_len(ty, src.len(), None));
    }
    if let Some(index) = src.par_iter().position_first(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite { index });
    }
    let n_rows = src.len() / row_len;
    let mut out = vec![0u8; n_rows * row_bytes];
    // ~64k values per task: big enough to amortise scheduling, small enough to balance.
    let rows_per_task = (65536 / row_len).max(1);
    out.par_chunks_mut(rows_per_task * row_bytes)
        .zip(src.par_chunks(rows_per_task * row_len))
        .try_for_each(|(o, x)| quantize_unchecked(ty, x, o))?;
    Ok(out)
}

/// Dequantize `dst.len()` values (all types above, F32/F16/BF16 included) from `bytes`
/// (exactly ty.bytes_for(dst.len()) bytes), as ggml's `to_float` does.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    if ty == GgmlType::Q4_1 {
        return Err(QuantError::Unsupported(ty));
    }
    check_len(ty, dst.len(), bytes.len())?;
    match ty {
        // Float types through half's slice conversions (F16C/SIMD) where the bytes are aligned
        // for it (exact either way; a mapped file's tensor may start at any byte).
        GgmlType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(v) => dst.copy_from_slice(v),
            Err(_) => {
                for (b, y) in bytes.chunks_exact(4).zip(dst.iter_mut()) {
                    *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        },
        GgmlType::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(v) => v.convert_to_f32_slice(dst),
            Err(_) => {
                for (b, y) in bytes.chunks_exact(2).zip(dst.iter_mut()) {
                    *y = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
        GgmlType::BF16 => match bytemuck::try_cast_slice::<u8, bf16>(bytes) {
            Ok(v) => v.convert_to_f32_slice(dst),
            Err(_) => {
                for (b, y) in bytes.chunks_exact(2).zip(dst.iter_mut()) {
                    *y = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        },
        GgmlType::Q8_0 => dequantize_blocks::<BlockQ8_0>(bytes, dst),
        GgmlType::Q4_0 => dequantize_blocks::<BlockQ4_0>(bytes, dst),
        GgmlType::Q5_0 => dequantize_blocks::<BlockQ5_0>(bytes, dst),
        GgmlType::Q5_1 => dequantize_blocks::<BlockQ5_1>(bytes, dst),
        GgmlType::Q4K => dequantize_blocks::<BlockQ4K>(bytes, dst),
        GgmlType::Q5K => dequantize_blocks::<BlockQ5K>(bytes, dst),
        GgmlType::Q6K => dequantize_blocks::<BlockQ6K>(bytes, dst),
        GgmlType::Q4_1 => return Err(QuantError::Unsupported(ty)),
    }
    Ok(())
}

/// bf16 -> f16 (little-endian bytes, `dst.len() == src.len()`) in one pass where the CPU has F16C
/// and AVX2; false (nothing written) elsewhere, for the caller's general path. Each bf16 widens to
/// f32 exactly (a 16-bit shift) and F16C rounds it to nearest even, as half's conversion does.
/// Why not half's slice conversion (through an f32 scratch): it converts eight values per
/// non-inlined call; with the two passes that was about a quarter of the CPU samples of a 7B F16
/// conversion (2026-11-27 profile), now 1-4 s less user time for the same bytes.
pub fn bf16_to_f16_into(src: &[u8], dst: &mut [u8]) -> bool {
    assert_eq!(src.len(), dst.len(), "bf16 -> f16 keeps the byte count");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has both features (checked just above).
        unsafe { bf16_to_f16_f16c(src, dst) };
        return true;
    }
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn bf16_to_f16_f16c(src: &[u8], dst: &mut [u8]) {
    use std::arch::x86_64::*;
    const LANES: usize = 8;
    let n = dst.len() / 2;
    let whole = n / LANES * LANES;
    for i in (0..whole).step_by(LANES) {
        // SAFETY: i + 8 <= whole <= n values, so bytes 2i..2i + 16 lie inside both slices
        // (equal lengths, asserted by the caller); unaligned loads and stores.
        unsafe {
            let b = _mm_loadu_si128(src.as_ptr().add(2 * i).cast());
            let f = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(b)));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f);
            _mm_storeu_si128(dst.as_mut_ptr().add(2 * i).cast(), h);
        }
    }
    for (s, d) in src[2 * whole..]
        .chunks_exact(2)
        .zip(dst[2 * whole..].chunks_exact_mut(2))
    {
        let v = half::bf16::from_le_bytes([s[0], s[1]]).to_f32();
        d.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
}

/// Index of the first non-finite value `dequantize` would give from the blocks of `ty` in
/// `bytes`, found from the fp16 scales alone ([`Block::F16_AT`]); None for float types and
/// where all are finite. (At 7B scale, dequantizing only to look cost 6 s of a verify.)
pub fn first_nonfinite_block(ty: GgmlType, bytes: &[u8]) -> Option<usize> {
    fn scan<B: Block>(bytes: &[u8]) -> Option<usize> {
        let bad = |b: &[u8]| {
            B::F16_AT
                .iter()
                .any(|&o| u16::from_le_bytes([b[o], b[o + 1]]) & 0x7c00 == 0x7c00)
        };
        bytes
            .par_chunks(B::SIZE * 4096)
            .enumerate()
            .find_map_first(|(ci, c)| {
                let i = c.chunks_exact(B::SIZE).position(bad)?;
                Some((ci * 4096 + i) * B::QK)
            })
    }
    match ty {
        GgmlType::Q8_0 => scan::<BlockQ8_0>(bytes),
        GgmlType::Q4_0 => scan::<BlockQ4_0>(bytes),
        GgmlType::Q5_0 => scan::<BlockQ5_0>(bytes),
        GgmlType::Q5_1 => scan::<BlockQ5_1>(bytes),
        GgmlType::Q4K => scan::<BlockQ4K>(bytes),
        GgmlType::Q5K => scan::<BlockQ5K>(bytes),
        GgmlType::Q6K => scan::<BlockQ6K>(bytes),
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q4_1 => None,
    }
}

/// Dequantize `n` values of `ty` from `bytes` into a new buffer.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, QuantError> {
    let mut out = vec![0f32; n];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

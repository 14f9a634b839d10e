//! One tensor's bytes from its input type into its output type (a copy, a float cast, or a block
//! quantization), in parallel chunks handed to the writer in order; and the checks on the way
//! (NaN/Inf, squared-error sums for the manifest). Errors about the values are `Error::Values`:
//! the emit step, which knows the file and the tensor, names them.
use crate::formats::gguf::DataSink;
use crate::ground::dtype::GgmlType;
use crate::ground::error::{Error, Result};
use rayon::prelude::*;

/// Squared-error sums of one encoded tensor (for the relative RMS quantization error).
#[derive(Debug, Default, Clone, Copy)]
pub struct ErrStats {
    pub sum_sq_err: f64,
    pub sum_sq: f64,
}
impl ErrStats {
    pub fn rel_rms(&self) -> f64 {
        if self.sum_sq > 0.0 {
            (self.sum_sq_err / self.sum_sq).sqrt()
        } else {
            self.sum_sq_err.sqrt()
        }
    }
}

fn to_f32(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    let n = bytes.len() / ty.type_size() * ty.block_size();
    crate::quant::dequantize(ty, bytes, n).map_err(|e| Error::Values(e.to_string()))
}

/// A float output type (F32, F16, BF16) is a plain cast that keeps NaN and Inf: whether they are
/// allowed is the caller's decision (--allow-nonfinite); the block quantizers refuse them.
/// Rounding as ggml: F16 round-to-nearest-even, BF16 `ggml_compute_fp32_to_bf16` (NaN forced quiet).
fn cast_float(out: GgmlType, f: &[f32]) -> Option<Vec<u8>> {
    Some(match out {
        GgmlType::F32 => f.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => f
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => f
            .iter()
            .flat_map(|&v| {
                let u = v.to_bits();
                let b = if u & 0x7fff_ffff > 0x7f80_0000 {
                    ((u >> 16) | 64) as u16
                } else {
                    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
                };
                b.to_le_bytes()
            })
            .collect(),
        _ => return None,
    })
}

/// f32 values into float output bytes (`dst.len() / out.type_size()` values), rounding as
/// [`cast_float`].
fn f32_to_float(out: GgmlType, f: &[f32], dst: &mut [u8]) {
    use half::slice::HalfFloatSliceExt;
    match out {
        GgmlType::F32 => match bytemuck::try_cast_slice_mut::<u8, f32>(dst) {
            Ok(d) => d.copy_from_slice(f),
            Err(_) => dst
                .chunks_exact_mut(4)
                .zip(f)
                .for_each(|(d, v)| d.copy_from_slice(&v.to_le_bytes())),
        },
        GgmlType::F16 => match bytemuck::try_cast_slice_mut::<u8, half::f16>(dst) {
            Ok(h) => h.convert_from_f32_slice(f),
            Err(_) => dst.copy_from_slice(&cast_float(out, f).expect("float output")),
        },
        _ => dst.copy_from_slice(&cast_float(out, f).expect("float output")),
    }
}

/// Values per step of an in-place float cast: the f32 scratch (16 KiB) stays in L1.
const CAST_STEP: usize = 4096;
/// Output bytes per parallel task of an in-place float cast.
const CAST_TASK_BYTES: usize = 1 << 20;

/// Cast float `src` values into `dst` (same number of values), in parallel 1 MiB pieces, each
/// through a small f32 scratch: no allocation per tensor, data stays in cache between the steps.
fn cast_into(src_ty: GgmlType, src: &[u8], out: GgmlType, dst: &mut [u8]) -> Result<()> {
    let (is, os) = (src_ty.type_size(), out.type_size());
    let task_values = CAST_TASK_BYTES / os;
    dst.par_chunks_mut(task_values * os)
        .zip(src.par_chunks(task_values * is))
        .try_for_each(|(d, s)| {
            // The common case (bf16 checkpoint -> F16 GGUF) in one pass where the CPU allows.
            if (src_ty, out) == (GgmlType::BF16, GgmlType::F16)
                && crate::quant::bf16_to_f16_into(s, d)
            {
                return Ok(());
            }
            let mut f = [0f32; CAST_STEP];
            for (dd, ss) in d.chunks_mut(CAST_STEP * os).zip(s.chunks(CAST_STEP * is)) {
                let n = dd.len() / os;
                crate::quant::dequantize_into(src_ty, ss, &mut f[..n])
                    .map_err(|e| Error::Values(e.to_string()))?;
                f32_to_float(out, &f[..n], dd);
            }
            Ok(())
        })
}

/// Float -> float conversion (no statistics: a cast is not a quantization). A float source is
/// cast straight into the writer's buffers; a quantized one is dequantized in parallel chunks.
fn encode_float(
    src_ty: GgmlType,
    data: &[u8],
    out: GgmlType,
    sink: &mut dyn DataSink,
) -> Result<()> {
    let (is, os) = (src_ty.type_size(), out.type_size());
    if matches!(src_ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        let n = data.len() / is;
        return sink.put_with(n * os, os, &mut |off, dst| {
            let first = off / os;
            let src = &data[first * is..(first + dst.len() / os) * is];
            cast_into(src_ty, src, out, dst)
        });
    }
    if !src_ty.is_quantized() {
        return Err(Error::Values(format!("cannot convert {src_ty}")));
    }
    const CHUNK_VALUES: usize = 1 << 20;
    let in_chunk = src_ty
        .bytes_for(CHUNK_VALUES as u64)
        .ok_or_else(|| Error::Values(format!("cannot convert {src_ty}")))?
        as usize;
    let chunks: Vec<&[u8]> = data.chunks(in_chunk).collect();
    for batch in chunks.chunks(rayon::current_num_threads() * 2) {
        let outs: Vec<Result<Vec<u8>>> = batch
            .par_iter()
            .map(|c| {
                let f = to_f32(src_ty, c)?;
                let mut bytes = vec![0u8; f.len() * os];
                f32_to_float(out, &f, &mut bytes);
                Ok(bytes)
            })
            .collect();
        for o in outs {
            sink.put(&o?)?;
        }
    }
    Ok(())
}

/// Index of the first NaN or ±Inf value, if any. Scans 256-byte blocks without branching (the
/// compiler vectorizes it: at 7B scale an early-exit loop cost 6 s of the main thread), and
/// looks for the exact index only inside a block that has one.
pub fn first_nonfinite(ty: GgmlType, bytes: &[u8]) -> Option<usize> {
    fn scan<const N: usize>(bytes: &[u8], bad: impl Fn([u8; N]) -> bool) -> Option<usize> {
        const BLOCK: usize = 256;
        let elem = |c: &[u8]| -> [u8; N] { c.try_into().expect("chunks_exact") };
        bytes.chunks(BLOCK).enumerate().find_map(|(bi, block)| {
            let any = block
                .chunks_exact(N)
                .fold(0u8, |acc, c| acc | bad(elem(c)) as u8);
            (any != 0).then(|| {
                let i = block.chunks_exact(N).position(|c| bad(elem(c)));
                bi * BLOCK / N + i.expect("a hit in this block")
            })
        })
    }
    match ty {
        GgmlType::F32 => scan::<4>(bytes, |c| {
            u32::from_le_bytes(c) & 0x7f80_0000 == 0x7f80_0000
        }),
        GgmlType::F16 => scan::<2>(bytes, |c| u16::from_le_bytes(c) & 0x7c00 == 0x7c00),
        GgmlType::BF16 => scan::<2>(bytes, |c| u16::from_le_bytes(c) & 0x7f80 == 0x7f80),
        _ => None,
    }
}

/// Whether `encode_tensor(src_ty, .., out, ..)` works value by value (a copy or a float cast),
/// so that encoding any split of the data in order gives the same bytes.
pub fn is_elementwise(src_ty: GgmlType, out: GgmlType) -> bool {
    src_ty == out || cast_float(out, &[]).is_some()
}

/// Encode a row-major tensor from `src_ty` bytes into `out` bytes, in chunks of whole rows converted
/// in parallel and handed to `sink` in order. Bytes do not depend on the thread count. Returns the
/// quantization error statistics (zero work when the types are equal).
pub fn encode_tensor(
    src_ty: GgmlType,
    data: &[u8],
    row_len: usize,
    out: GgmlType,
    sink: &mut dyn DataSink,
) -> Result<ErrStats> {
    encode(src_ty, data, row_len, out, sink, true)
}

/// [`encode_tensor`] without the error statistics (which cost a dequantization of every block):
/// the same bytes, for verify's re-derivation.
pub fn encode_tensor_bytes(
    src_ty: GgmlType,
    data: &[u8],
    row_len: usize,
    out: GgmlType,
    sink: &mut dyn DataSink,
) -> Result<()> {
    encode(src_ty, data, row_len, out, sink, false).map(|_| ())
}

fn encode(
    src_ty: GgmlType,
    data: &[u8],
    row_len: usize,
    out: GgmlType,
    sink: &mut dyn DataSink,
    measure: bool,
) -> Result<ErrStats> {
    if src_ty == out {
        sink.put(data)?;
        return Ok(ErrStats::default());
    }
    if is_elementwise(src_ty, out) {
        return encode_float(src_ty, data, out, sink).map(|_| ErrStats::default());
    }
    let in_row = src_ty.bytes_for(row_len as u64).ok_or_else(|| {
        Error::Values(format!("row length {row_len} does not fit {src_ty} blocks"))
    })? as usize;
    let rows_per_chunk = (1usize << 20).div_ceil(row_len).max(1);
    let chunks: Vec<&[u8]> = data.chunks(rows_per_chunk * in_row).collect();
    let mut stats = ErrStats::default();
    for batch in chunks.chunks(rayon::current_num_threads() * 4) {
        let outs: Vec<Result<(Vec<u8>, ErrStats)>> = batch
            .par_iter()
            .map(|c| {
                let f = to_f32(src_ty, c)?;
                let q = match cast_float(out, &f) {
                    Some(q) => q,
                    None => {
                        crate::quant::quantize(out, &f).map_err(|e| Error::Values(e.to_string()))?
                    }
                };
                let mut s = ErrStats::default();
                if !measure {
                    return Ok((q, s));
                }
                let back = crate::quant::dequantize(out, &q, f.len())
                    .map_err(|e| Error::Values(e.to_string()))?;
                // NaN/Inf (only here under --allow-nonfinite, float outputs) stay out of the statistics.
                for (a, b) in f
                    .iter()
                    .zip(&back)
                    .filter(|(a, b)| a.is_finite() && b.is_finite())
                {
                    s.sum_sq += (*a as f64) * (*a as f64);
                    s.sum_sq_err += ((*a - *b) as f64).powi(2);
                }
                Ok((q, s))
            })
            .collect();
        for o in outs {
            let (q, s) = o?;
            stats.sum_sq += s.sum_sq;
            stats.sum_sq_err += s.sum_sq_err;
            sink.put(&q)?;
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod thread_tests {
    use super::*;

    fn encode_with(
        threads: usize,
        src_ty: GgmlType,
        data: &[u8],
        row: usize,
        out: GgmlType,
    ) -> Vec<u8> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut bytes: Vec<u8> = vec![];
            encode_tensor(src_ty, data, row, out, &mut bytes).unwrap();
            bytes
        })
    }

    /// Tensors big enough to be split into many chunks give the same bytes on 1 and 3 threads.
    #[test]
    fn encoding_does_not_depend_on_thread_count() {
        let (rows, row) = (1024, 4096); // 4M values: several 1M-value chunks
        let mut state = 0x9e3779b97f4a7c15u64;
        let vals: Vec<f32> = (0..rows * row)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
            })
            .collect();
        let bf16: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        for out in [GgmlType::F16, GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q8_0] {
            let one = encode_with(1, GgmlType::BF16, &bf16, row, out);
            let three = encode_with(3, GgmlType::BF16, &bf16, row, out);
            assert_eq!(
                one.len() as u64,
                out.bytes_for((rows * row) as u64).unwrap()
            );
            assert!(one == three, "{out}: bytes depend on the thread count");
        }
    }
}

#[cfg(test)]
mod nonfinite_tests {
    use super::*;

    /// Every position of one NaN/Inf in every float type, against a plain per-value test.
    #[test]
    fn finds_the_first_nonfinite_value() {
        let n = 700; // several 256-byte blocks plus a tail
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let enc = |v: f32| -> Vec<u8> {
                match ty {
                    GgmlType::F32 => v.to_le_bytes().to_vec(),
                    GgmlType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                    _ => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                }
            };
            let finite: Vec<u8> = (0..n).flat_map(|i| enc(i as f32 * 0.37 - 100.0)).collect();
            assert_eq!(first_nonfinite(ty, &finite), None, "{ty}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for pos in [0, 1, 63, 64, 127, 128, 255, 256, n - 1] {
                    let mut b = finite.clone();
                    let sz = ty.type_size();
                    b[pos * sz..(pos + 1) * sz].copy_from_slice(&enc(bad));
                    // a second one later must not win
                    if pos + 5 < n {
                        b[(pos + 5) * sz..(pos + 6) * sz].copy_from_slice(&enc(bad));
                    }
                    assert_eq!(first_nonfinite(ty, &b), Some(pos), "{ty} {bad} at {pos}");
                }
            }
        }
    }
}

//! Quantization of whole files: a GGUF in, a GGUF out, with llama-quantize's type mixture, tensor
//! order and metadata layout; and the per-tensor encoder shared with checkpoint conversion.
use crate::convert::manifest::{self, Manifest, OutputRecord, TensorRecord};
use crate::convert::plan::{
    is_float_type, mixture, set_quant_keys, vision_quantizable, KEY_FILE_TYPE,
};
use crate::formats::gguf::{DataSink, GgufFile, GgufWriter, TensorInfo, Value};
use crate::ground::dtype::{FileType, GgmlType};
use crate::ground::error::{Error, Result};
use crate::ground::progress::Progress;
use crate::quant::mixture::weight_name_cmp;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    crate::quant::dequantize(ty, bytes, n).map_err(|e| Error::other(e.to_string()))
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
                    .map_err(|e| Error::other(e.to_string()))?;
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
        return Err(Error::other(format!("cannot convert {src_ty}")));
    }
    const CHUNK_VALUES: usize = 1 << 20;
    let in_chunk = src_ty
        .bytes_for(CHUNK_VALUES as u64)
        .ok_or_else(|| Error::other(format!("cannot convert {src_ty}")))?
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
    if src_ty == out {
        sink.put(data)?;
        return Ok(ErrStats::default());
    }
    if is_elementwise(src_ty, out) {
        return encode_float(src_ty, data, out, sink).map(|_| ErrStats::default());
    }
    let in_row = src_ty
        .bytes_for(row_len as u64)
        .ok_or_else(|| Error::other(format!("row length {row_len} does not fit {src_ty} blocks")))?
        as usize;
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
                        crate::quant::quantize(out, &f).map_err(|e| Error::other(e.to_string()))?
                    }
                };
                let back = crate::quant::dequantize(out, &q, f.len())
                    .map_err(|e| Error::other(e.to_string()))?;
                let mut s = ErrStats::default();
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

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub input: PathBuf,
    pub output: Option<PathBuf>,
    /// Where the default-named output goes instead of beside the input (created if missing).
    pub out_dir: Option<PathBuf>,
    pub file_type: Option<FileType>,
    pub vision_type: Option<GgmlType>,
    pub quiet: bool,
    pub allow_nonfinite: bool,
    pub command_line: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeSummary {
    #[serde(serialize_with = "crate::ground::digest::lossy_path")]
    pub input: PathBuf,
    pub output: OutputRecord,
    #[serde(serialize_with = "crate::ground::digest::lossy_path")]
    pub manifest: PathBuf,
    pub file_type: String,
    pub seconds: f64,
    pub peak_rss_bytes: u64,
    pub type_counts: std::collections::BTreeMap<String, usize>,
    pub tensors: Vec<TensorRecord>,
}

/// Default output name: `<name>-<TYPE>.gguf` beside the input, where `<name>` drops a trailing
/// `-F16`/`-F32`/`-BF16` (llama.cpp's naming).
pub fn default_output(input: &Path, tag: &str) -> PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let base = ["-F16", "-F32", "-BF16", "-f16", "-f32", "-bf16"]
        .iter()
        .find_map(|s| stem.strip_suffix(s))
        .unwrap_or(&stem)
        .to_string();
    input.with_file_name(format!("{base}-{tag}.gguf"))
}

/// Quantize a GGUF file (LLM: llama-quantize's mixture; mmproj: only with --vision-type).
pub fn quantize_file(opts: &QuantizeOptions) -> Result<QuantizeSummary> {
    let t0 = Instant::now();
    let g = GgufFile::open(&opts.input)?;
    // Hash the input on another thread while quantizing (it shares the page cache with the map).
    let input_path = opts.input.clone();
    let input_hasher = std::thread::spawn(move || {
        crate::ground::digest::hash_files(std::slice::from_ref(&input_path))
    });
    let arch = g.get_str("general.architecture")?.to_string();
    let is_mmproj = arch == "clip";
    let (ft, tag) = if is_mmproj {
        match (opts.file_type, opts.vision_type) {
            (Some(ft), _) if !is_float_type(ft) => {
                return Err(Error::usage(format!(
                    "{} is an mmproj file: its MMFuser fuser is never quantized and --type/--bits {} would do that; use --vision-type Q8_0 to quantize only the CLIP tower",
                    opts.input.display(),
                    ft.name()
                )))
            }
            (_, Some(GgmlType::Q8_0)) => (FileType::MostlyQ8_0, "Q8_0".to_string()),
            (_, Some(other)) => return Err(Error::usage(format!("--vision-type {other} is not supported (Q8_0 is)"))),
            (_, None) => return Err(Error::usage("an mmproj file is only quantized with --vision-type Q8_0 (the fuser always stays F16)")),
        }
    } else {
        if opts.vision_type.is_some() {
            return Err(Error::usage("--vision-type applies to mmproj files (or checkpoint directories), not to an LLM GGUF"));
        }
        let ft = opts
            .file_type
            .ok_or_else(|| Error::usage("give --bits 8|4 or --type TYPE"))?;
        (ft, ft.name().to_string())
    };
    let beside = default_output(&opts.input, &tag);
    let out_path = match (&opts.output, &opts.out_dir) {
        (Some(o), _) => o.clone(),
        (None, Some(d)) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            d.join(beside.file_name().unwrap_or_default())
        }
        (None, None) => beside,
    };
    if out_path.canonicalize().ok() == opts.input.canonicalize().ok() {
        return Err(Error::usage(
            "the output would overwrite the input; choose another -o",
        ));
    }
    // Temporary files of a killed earlier run in the destination directory (as hf-to-gguf does).
    crate::ground::fsutil::cleanup_stale_temps(match out_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    });
    // Plan types.
    let mut infos: Vec<(TensorInfo, usize)> = g
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.info.clone(), i))
        .collect();
    for (t, _) in &infos {
        if t.ty.is_quantized() {
            return Err(Error::tensor(
                &opts.input,
                &t.name,
                format!(
                    "is already quantized ({}); quantize from an F32/F16/BF16 file",
                    t.ty
                ),
            ));
        }
    }
    let mut meta = g.metadata.clone();
    if is_mmproj {
        for (t, _) in infos.iter_mut() {
            if vision_quantizable(t) && t.ne[0] % 32 == 0 {
                t.ty = GgmlType::Q8_0;
            }
        }
        meta.set(KEY_FILE_TYPE, Value::U32(ft.id()));
    } else {
        let n_layer = g
            .get_u32("llama.block_count")
            .or_else(|_| g.get_u32(&format!("{arch}.block_count")))? as usize;
        let plain: Vec<TensorInfo> = infos.iter().map(|(t, _)| t.clone()).collect();
        for ((t, _), ty) in infos.iter_mut().zip(mixture(ft, &plain, n_layer)) {
            t.ty = ty;
        }
        infos.sort_by(|a, b| weight_name_cmp(&a.0.name, &b.0.name));
        set_quant_keys(&mut meta, ft);
    }
    let mut w = GgufWriter::create(
        &out_path,
        &meta,
        infos.iter().map(|(t, _)| t.clone()).collect(),
    )?;
    let progress = Progress::new(
        g.tensors.iter().map(|t| t.n_bytes).sum(),
        infos.len() as u64,
        opts.quiet,
    );
    let mut records = vec![];
    let mut counts = std::collections::BTreeMap::new();
    for (t, i) in &infos {
        let rt = &g.tensors[*i];
        let data = g.data(rt);
        if !opts.allow_nonfinite {
            if let Some(k) = first_nonfinite(rt.info.ty, data) {
                return Err(Error::tensor(
                    &opts.input,
                    &t.name,
                    format!("element {k} is NaN or infinite"),
                ));
            }
        }
        w.begin_tensor(&t.name)?;
        let stats = encode_tensor(rt.info.ty, data, t.ne[0] as usize, t.ty, &mut w).map_err(
            |e| match e {
                Error::Other(m) => Error::tensor(&opts.input, &t.name, m),
                e => e,
            },
        )?;
        w.end_tensor()?;
        // Keep resident memory near one tensor (a 7B F16 input otherwise ends at 12.6 GiB RSS).
        g.release(rt);
        progress.inc(rt.n_bytes, &t.name);
        *counts.entry(t.ty.name().to_string()).or_insert(0) += 1;
        records.push(TensorRecord {
            source: t.name.clone(),
            source_file: manifest::file_name(&opts.input),
            dtype: rt.info.ty.name().to_string(),
            shape: t.ne.iter().rev().map(|&d| d as usize).collect(),
            gguf: t.name.clone(),
            artefact: if is_mmproj {
                "mmproj".into()
            } else {
                "llm".into()
            },
            ggml_type: t.ty.name().to_string(),
            quant_rel_rms: TensorRecord::quant_error(rt.info.ty, t.ty, stats.rel_rms()),
        });
    }
    progress.finish();
    let (file, bytes, sha256) = w.finish_pending()?;
    let path = file.dest().to_path_buf();
    let output = OutputRecord {
        kind: if is_mmproj {
            "mmproj".into()
        } else {
            "llm".into()
        },
        path: path.clone(),
        bytes,
        sha256,
        file_type: ft.name().into(),
        tensors: infos.len(),
    };
    let inputs = input_hasher
        .join()
        .map_err(|_| Error::other("input hashing thread panicked"))??;
    let m = Manifest::new(
        &opts.command_line,
        "quantize",
        inputs,
        vec![output.clone()],
        records.clone(),
        vec![],
    );
    let mpath = path.with_file_name(format!(
        "{}.manifest.json",
        path.file_stem().unwrap_or_default().to_string_lossy()
    ));
    let manifest_file = m.write_pending(&mpath)?;
    crate::ground::fsutil::commit_all(vec![file, manifest_file])?;
    Ok(QuantizeSummary {
        input: opts.input.clone(),
        output,
        manifest: mpath,
        file_type: ft.name().into(),
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: crate::ground::progress::peak_rss_bytes(),
        type_counts: counts,
        tensors: records,
    })
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

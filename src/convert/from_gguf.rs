//! quantize of a GGUF file: a GGUF in, a GGUF out, with llama-quantize's type mixture, tensor
//! order and metadata layout (planned by `plan_gguf`, written by the emit loop).
use crate::convert::emit::{emit, InputTensor, Put, TensorInput};
use crate::convert::encode::ErrStats;
use crate::convert::manifest::{Manifest, OutputRecord, TensorRecord};
use crate::convert::plan::{is_float_type, plan_gguf};
use crate::convert::recipe::ArtefactKind;
use crate::formats::gguf::GgufFile;
use crate::ground::dtype::{FileType, GgmlType};
use crate::ground::error::{Error, Result};
use crate::ground::progress::{Progress, Unit};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A GGUF file as the emit step's input: its mapped tensors, whole.
struct GgufInput<'a> {
    g: &'a GgufFile,
}

impl TensorInput for GgufInput<'_> {
    fn describe(&self, i: usize) -> InputTensor {
        let t = &self.g.tensors[i];
        InputTensor {
            file: self.g.path.clone(),
            name: t.info.name.clone(),
            dtype: t.info.ty.name().to_string(),
            shape: t.info.ne.iter().rev().map(|&d| d as usize).collect(),
            bytes: t.n_bytes,
        }
    }
    fn feed(
        &mut self,
        i: usize,
        _out: GgmlType,
        put: &mut Put<'_>,
    ) -> Result<(GgmlType, ErrStats)> {
        let t = &self.g.tensors[i];
        Ok((t.info.ty, put(t.info.ty, self.g.data(t), 0)?))
    }
    fn release(&self, i: usize) {
        // Keep resident memory near one tensor (a 7B F16 input otherwise ends at 12.6 GiB RSS).
        self.g.release(&self.g.tensors[i]);
    }
}

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub input: PathBuf,
    pub output: Option<PathBuf>,
    /// Where the default-named output goes instead of beside the input (created if missing).
    pub out_dir: Option<PathBuf>,
    pub file_type: Option<FileType>,
    pub vision_type: Option<GgmlType>,
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
pub fn quantize_file(opts: &QuantizeOptions, progress: &dyn Progress) -> Result<QuantizeSummary> {
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
    let kind = if is_mmproj {
        ArtefactKind::Mmproj
    } else {
        ArtefactKind::Llm
    };
    let plan = plan_gguf(&g, kind, ft, opts.vision_type, out_path)?;
    progress.start(
        &format!("0/{} tensors", plan.tensors.len()),
        g.tensors.iter().map(|t| t.n_bytes).sum(),
        Unit::Bytes,
    );
    let e = emit(
        &plan,
        &mut GgufInput { g: &g },
        opts.allow_nonfinite,
        progress,
    )?;
    progress.finish();
    let (file, output, records) = (e.file, e.output, e.tensors);
    let path = output.path.clone();
    let mut counts = std::collections::BTreeMap::new();
    for r in &records {
        *counts.entry(r.ggml_type.clone()).or_insert(0) += 1;
    }
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

//! The one write loop: any planned artefact, from any input, one tensor at a time. Per tensor:
//! the input hands over its values, NaN/Inf are refused (unless allowed), `encode` turns them into
//! the planned type straight into the writer, errors are given the file and tensor they are
//! about, and a manifest record is kept. hf-to-gguf, one-pass quantize and quantize of a GGUF
//! file differ only in their input (`TensorInput`) and their plan.
use crate::convert::encode::{encode_tensor, first_nonfinite, ErrStats};
use crate::convert::manifest::{self, OutputRecord, TensorRecord};
use crate::convert::plan::ArtefactPlan;
use crate::formats::gguf::{GgufWriter, TensorInfo};
use crate::ground::dtype::GgmlType;
use crate::ground::error::{Error, Result};
use crate::ground::fsutil::AtomicFile;
use crate::ground::progress::Progress;
use std::path::PathBuf;

/// What the manifest says of an input tensor.
pub struct InputTensor {
    /// The file holding it.
    pub file: PathBuf,
    /// Its name in that file.
    pub name: String,
    /// Its stored type, as the manifest spells it.
    pub dtype: String,
    /// Its shape, PyTorch order.
    pub shape: Vec<usize>,
    /// Its bytes in the input (progress).
    pub bytes: u64,
}

/// Receives a tensor's values: (their type, their bytes, the index of the first value).
pub type Put<'a> = dyn FnMut(GgmlType, &[u8], usize) -> Result<ErrStats> + 'a;

/// Where planned tensors come from; `i` is a `PlannedTensor::input`.
pub trait TensorInput {
    fn describe(&self, i: usize) -> InputTensor;
    /// Tensor `i` comes next: start reading it.
    fn prefetch(&self, _i: usize) {}
    /// Hand tensor `i`'s values to `put`, whole or in consecutive pieces (only where encoding to
    /// `out` works value by value). Returns the values' type and the squared-error sums.
    fn feed(&mut self, i: usize, out: GgmlType, put: &mut Put<'_>) -> Result<(GgmlType, ErrStats)>;
    /// Tensor `i` is written: its input pages may go.
    fn release(&self, _i: usize) {}
}

/// An artefact written under its temporary name, with what the manifest records of it.
pub struct Emitted {
    pub output: OutputRecord,
    pub tensors: Vec<TensorRecord>,
    /// Renamed into place by the caller, together with the other files of the run.
    pub file: AtomicFile,
}

/// Write one planned artefact from `input`.
pub fn emit(
    plan: &ArtefactPlan,
    input: &mut dyn TensorInput,
    allow_nonfinite: bool,
    progress: &dyn Progress,
) -> Result<Emitted> {
    let infos: Vec<TensorInfo> = plan.tensors.iter().map(|t| t.info.clone()).collect();
    let mut w = GgufWriter::create(&plan.path, &plan.meta, infos)?;
    let mut records = Vec::with_capacity(plan.tensors.len());
    for (k, t) in plan.tensors.iter().enumerate() {
        if let Some(next) = plan.tensors.get(k + 1) {
            input.prefetch(next.input);
        }
        let d = input.describe(t.input);
        let row_len = t.info.ne.first().map_or(1, |&n| n as usize);
        w.begin_tensor(&t.info.name)?;
        let mut put = |ty: GgmlType, bytes: &[u8], before: usize| -> Result<ErrStats> {
            if let Some(i) = first_nonfinite(ty, bytes).filter(|_| !allow_nonfinite) {
                return Err(Error::tensor(
                    &d.file,
                    &d.name,
                    format!(
                        "element {} is NaN or infinite (pass --allow-nonfinite to convert it anyway)",
                        before + i
                    ),
                ));
            }
            encode_tensor(ty, bytes, row_len, t.info.ty, &mut w)
                .map_err(|e| e.in_tensor(&d.file, &d.name))
        };
        let (src_ty, stats) = input.feed(t.input, t.info.ty, &mut put)?;
        w.end_tensor()?;
        input.release(t.input);
        progress.advance(d.bytes, &t.info.name);
        records.push(TensorRecord {
            source: d.name,
            source_file: manifest::file_name(&d.file),
            dtype: d.dtype,
            shape: d.shape,
            gguf: t.info.name.clone(),
            artefact: plan.kind,
            ggml_type: t.info.ty.name().to_string(),
            quant_rel_rms: TensorRecord::quant_error(src_ty, t.info.ty, stats.rel_rms()),
        });
    }
    let (file, bytes, sha256) = w.finish_pending()?;
    Ok(Emitted {
        output: OutputRecord {
            kind: plan.kind,
            path: file.dest().to_path_buf(),
            bytes,
            sha256,
            file_type: plan.file_type.name().to_string(),
            tensors: plan.tensors.len(),
        },
        tensors: records,
        file,
    })
}

//! hf-to-gguf: stream a checkpoint into the LLM GGUF and the mmproj GGUF, one tensor at a time,
//! and write a manifest (sha256 of inputs and outputs, per-tensor mapping).
pub mod manifest;
pub mod naming;
pub mod plan;
pub mod quantize;
pub mod recipe;
pub mod source;
pub mod synth;

use crate::convert::plan::{is_float_type, plan_artefacts, ArtefactPlan};
use crate::convert::quantize::{first_nonfinite, ErrStats};
use crate::convert::source::{Source, SourceRow};
use crate::formats::checkpoint::stream::ShardStream;
use crate::formats::checkpoint::SrcTensor;
use crate::formats::gguf::{GgufWriter, TensorInfo};
use crate::ground::dtype::{FileType, GgmlType};
use crate::ground::error::{Error, Result};
use crate::ground::fsutil::AtomicFile;
use crate::ground::progress::Progress;
use manifest::{Manifest, OutputRecord, TensorRecord};
use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub checkpoint: PathBuf,
    pub vision_tower: Option<PathBuf>,
    pub out_dir: PathBuf,
    /// F32, F16 or BF16 (hf-to-gguf), or a quantized file type (direct quantization).
    pub file_type: FileType,
    /// Type for the CLIP tower's matrices when quantizing (default: stays F16).
    pub vision_type: Option<GgmlType>,
    pub name: Option<String>,
    pub allow_nonfinite: bool,
    pub quiet: bool,
    pub command_line: Vec<String>,
}

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertSummary {
    pub recipe: String,
    pub outputs: Vec<OutputRecord>,
    #[serde(serialize_with = "crate::ground::digest::lossy_path")]
    pub manifest: PathBuf,
    pub tensors_written: usize,
    pub tensors_dropped: usize,
    pub bytes_written: u64,
    pub seconds: f64,
    pub peak_rss_bytes: u64,
}

/// The model name used in output file names: --name, else the checkpoint directory's name. It
/// must be one plain file-name part: `--name ../x` would write outside the output directory, and
/// a leading dot could collide with our temporary files (which `cleanup_stale_temps` deletes).
pub fn output_name(src: &Source, opts: &ConvertOptions) -> Result<String> {
    let Some(name) = opts.name.clone() else {
        // A directory's own name is one path part already; only a leading dot needs care.
        let derived = src.name.trim_start_matches('.');
        return Ok(if derived.is_empty() { "model" } else { derived }.to_string());
    };
    if name.is_empty()
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0'])
        || name.chars().any(char::is_control)
        || name.len() > 200
    {
        return Err(Error::usage(format!(
            "--name '{}' cannot be used in file names: use 1-200 characters, no '/', '\\' or control characters, not starting with '.'",
            name.escape_debug()
        )));
    }
    Ok(name)
}

/// Whether an artefact takes its tensors in source-file order (see `plan_artefacts`), so that
/// they can come from a `ShardStream`.
fn in_source_order(plan: &ArtefactPlan) -> bool {
    plan.kind == "llm" && is_float_type(plan.file_type)
}

/// Write one artefact to its temporary file. Returns the record for the manifest, per-tensor
/// records and the complete file, still to be committed (renamed into place) by the caller.
/// With a `stream`, tensors it can deliver are taken from it (they must come in file order),
/// the others read through the memory maps.
pub fn write_artefact(
    src: &Source,
    plan: &ArtefactPlan,
    opts: &ConvertOptions,
    progress: &Progress,
    mut stream: Option<&mut ShardStream>,
) -> Result<(OutputRecord, Vec<TensorRecord>, AtomicFile)> {
    let infos: Vec<TensorInfo> = plan.tensors.iter().map(|t| t.info.clone()).collect();
    let mut w = GgufWriter::create(&plan.path, &plan.meta, infos)?;
    let mut records = vec![];
    // One buffer for streamed tensors, reused: a fresh allocation per tensor cost page faults
    // and zeroing of every byte.
    let mut scratch = Vec::new();
    let streaming = stream.is_some();
    let streamed = |r: &SourceRow| streaming.then(|| src.stream_range(r)).flatten();
    for (i, t) in plan.tensors.iter().enumerate() {
        let r: &SourceRow = &src.rows[t.row];
        let range = streamed(r);
        if let Some(next) = plan.tensors.get(i + 1) {
            if streamed(&src.rows[next.row]).is_none() {
                src.prefetch(&src.rows[next.row]);
            }
        }
        let file = src.file_of(r);
        let row_len = *r.row.shape.last().unwrap_or(&1);
        let entry = src.store(r.store).entry(&r.row.src);
        w.begin_tensor(&t.info.name)?;
        // Values `before..` of the tensor, in its source type: refuse NaN/Inf, encode, write.
        let mut put = |ty: GgmlType, bytes: &[u8], before: usize| -> Result<ErrStats> {
            if let Some(i) = first_nonfinite(ty, bytes).filter(|_| !opts.allow_nonfinite) {
                return Err(Error::tensor(&file, &r.row.src, format!("element {} is NaN or infinite (pass --allow-nonfinite to convert it anyway)", before + i)));
            }
            crate::convert::quantize::encode_tensor(ty, bytes, row_len, t.info.ty, &mut w).map_err(
                |e| match e {
                    Error::Other(m) => Error::tensor(&file, &r.row.src, m),
                    e => e,
                },
            )
        };
        let (src_ty, stats) = match (range, stream.as_deref_mut(), entry) {
            // A float cast of a tensor as it lies in the file: straight from the read buffers
            // into the writer, a buffer at a time (no whole-tensor copy: the 250 MiB embedding
            // would have doubled peak memory).
            (Some((f, a, b)), Some(s), Some(e))
                if r.row.transform.is_none()
                    && crate::convert::quantize::is_elementwise(e.ty, t.info.ty) =>
            {
                let size = e.ty.type_size();
                let mut before = 0;
                s.take_each(f, a, b, size, |seg| {
                    put(e.ty, seg, before)?;
                    before += seg.len() / size;
                    Ok(())
                })?;
                (e.ty, ErrStats::default())
            }
            // Rows with a transform (Q/K permutation) need the whole tensor.
            (Some((f, a, b)), Some(s), Some(e)) => {
                s.take_into(f, a, b, &mut scratch)?;
                let whole = SrcTensor {
                    ty: e.ty,
                    shape: e.shape.clone(),
                    data: Cow::Borrowed(&scratch[..]),
                };
                let data = src.transform(r, whole)?;
                (data.ty, put(data.ty, &data.data, 0)?)
            }
            _ => {
                let data = src.read(r)?;
                (data.ty, put(data.ty, &data.data, 0)?)
            }
        };
        w.end_tensor()?;
        if range.is_none() {
            src.store(r.store).release(&r.row.src);
        }
        let src_bytes = entry.map_or(0, |e| (e.range.1 - e.range.0) as u64);
        progress.inc(src_bytes, &t.info.name);
        records.push(TensorRecord {
            source: r.row.src.clone(),
            source_file: manifest::file_name(&file),
            dtype: src.dtype_name(r).to_string(),
            shape: r.row.shape.clone(),
            gguf: t.info.name.clone(),
            artefact: plan.kind.clone(),
            ggml_type: t.info.ty.name().to_string(),
            quant_rel_rms: TensorRecord::quant_error(src_ty, t.info.ty, stats.rel_rms()),
        });
    }
    let (file, bytes, sha) = w.finish_pending()?;
    Ok((
        OutputRecord {
            kind: plan.kind.clone(),
            path: file.dest().to_path_buf(),
            bytes,
            sha256: sha,
            file_type: plan.file_type.name().to_string(),
            tensors: plan.tensors.len(),
        },
        records,
        file,
    ))
}

/// The whole hf-to-gguf (or checkpoint -> quantized) run.
pub fn run(opts: &ConvertOptions) -> Result<ConvertSummary> {
    let t0 = Instant::now();
    let mut src = Source::open(&opts.checkpoint, opts.vision_tower.as_deref())?;
    let name = output_name(&src, opts)?; // a bad --name is refused before anything is created
    crate::ground::fsutil::create_out_dir(&opts.out_dir)?;
    crate::ground::fsutil::cleanup_stale_temps(&opts.out_dir);
    let plans = plan_artefacts(
        &mut src,
        &name,
        opts.file_type,
        opts.vision_type,
        &opts.out_dir,
    )?;
    // Inputs are hashed while converting. A float LLM takes its tensors in file order, so the
    // checkpoint's shards are read once, by a ShardStream that feeds both the hasher and the
    // conversion; other inputs (and every input of a quantizing run) are hashed on a thread of
    // their own that reads the files while the conversion maps them (the page cache shares them).
    let inputs = src.input_files();
    // (Only when the float LLM's tensors lie as-is in the files: a stream nobody takes from
    // would hold its buffers and stall the hashing until the LLM is written.)
    let shards = src.checkpoint_files(); // the first of `inputs`
    let n_streamed = if plans
        .iter()
        .filter(|p| in_source_order(p))
        .flat_map(|p| &p.tensors)
        .any(|t| src.stream_range(&src.rows[t.row]).is_some())
    {
        shards.len()
    } else {
        0
    };
    let mut stream = (n_streamed > 0).then(|| ShardStream::start(shards));
    let rest = inputs[n_streamed..].to_vec();
    let hasher = std::thread::spawn(move || crate::ground::digest::hash_files(&rest));
    let total: u64 = plans
        .iter()
        .flat_map(|p| p.tensors.iter())
        .map(|t| {
            src.store(src.rows[t.row].store)
                .entry(&src.rows[t.row].row.src)
                .map(|e| (e.range.1 - e.range.0) as u64)
                .unwrap_or(0)
        })
        .sum();
    let progress = Progress::new(
        total,
        plans.iter().map(|p| p.tensors.len() as u64).sum(),
        opts.quiet,
    );
    let mut outputs = vec![];
    let mut tensors = vec![];
    // All or nothing: every artefact stays under its temporary name (removed on drop, i.e. on
    // any error) until all of them are complete; only then are they renamed into place. Files
    // of an earlier run in the same directory are untouched by a run that fails.
    let mut pending = vec![];
    for plan in &plans {
        let s = stream.as_mut().filter(|_| in_source_order(plan));
        let (o, t, file) = write_artefact(&src, plan, opts, &progress, s)?;
        if in_source_order(plan) {
            if let Some(s) = stream.as_mut() {
                s.done_taking();
            }
        }
        outputs.push(o);
        tensors.extend(t);
        pending.push(file);
    }
    progress.finish();
    let mut input_hashes = match stream {
        Some(s) => s.finish()?,
        None => vec![],
    };
    input_hashes.extend(
        hasher
            .join()
            .map_err(|_| Error::other("input hashing thread panicked"))??,
    );
    let stem = format!("{name}-{}", opts.file_type.name());
    let m = Manifest::new(
        &opts.command_line,
        &src.recipe.name,
        input_hashes,
        outputs.clone(),
        tensors,
        src.dropped.iter().map(|(_, n)| n.clone()).collect(),
    );
    let manifest_path = opts.out_dir.join(format!("{stem}.manifest.json"));
    pending.push(m.write_pending(&manifest_path)?);
    crate::ground::fsutil::commit_all(pending)?;
    Ok(ConvertSummary {
        recipe: src.recipe.name.clone(),
        tensors_written: outputs.iter().map(|o| o.tensors).sum(),
        tensors_dropped: src.dropped.len(),
        bytes_written: outputs.iter().map(|o| o.bytes).sum(),
        outputs,
        manifest: manifest_path,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: crate::ground::progress::peak_rss_bytes(),
    })
}

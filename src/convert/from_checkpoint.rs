//! hf-to-gguf (and quantize of a checkpoint, in one pass): stream a checkpoint into the LLM GGUF
//! and the mmproj GGUF through the plan and the emit loop, and write a manifest (sha256 of inputs
//! and outputs, per-tensor mapping).

use crate::convert::emit::{emit, InputTensor, Put, TensorInput};
use crate::convert::encode::{is_elementwise, ErrStats};
use crate::convert::manifest::{Manifest, OutputRecord};
use crate::convert::plan::{is_float_type, plan_artefacts, ArtefactPlan};
use crate::convert::recipe::ArtefactKind;
use crate::convert::source::{Source, SourceRow};
use crate::formats::checkpoint::stream::ShardStream;
use crate::formats::checkpoint::SrcTensor;
use crate::ground::dtype::{FileType, GgmlType};
use crate::ground::error::{Error, Result};
use crate::ground::progress::{Progress, Unit};
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
    plan.kind == ArtefactKind::Llm && is_float_type(plan.file_type)
}

/// The bytes a row's tensor takes in its file (progress counts these).
fn stored_bytes(src: &Source, r: &SourceRow) -> u64 {
    src.store(r.store)
        .entry(&r.row.src)
        .map_or(0, |e| (e.range.1 - e.range.0) as u64)
}

/// A checkpoint seen through its recipe, as the emit step's input: tensors it can stream
/// (in file order, from the `ShardStream` that also feeds the input hasher) come from the
/// stream, the others through the memory maps.
struct CheckpointInput<'a> {
    src: &'a Source,
    stream: Option<&'a mut ShardStream>,
    /// One buffer for streamed tensors, reused: a fresh allocation per tensor cost page faults
    /// and zeroing of every byte.
    scratch: Vec<u8>,
}

impl CheckpointInput<'_> {
    /// The stream's (file, start, end) of row `i`, when it comes from the stream.
    fn streamed(&self, i: usize) -> Option<(usize, u64, u64)> {
        self.stream.as_ref()?;
        self.src.stream_range(&self.src.rows[i])
    }
}

impl TensorInput for CheckpointInput<'_> {
    fn describe(&self, i: usize) -> InputTensor {
        let (src, r) = (self.src, &self.src.rows[i]);
        InputTensor {
            file: src.file_of(r),
            name: r.row.src.clone(),
            dtype: src.dtype_name(r).to_string(),
            shape: r.row.shape.clone(),
            bytes: stored_bytes(src, r),
        }
    }

    fn prefetch(&self, i: usize) {
        if self.streamed(i).is_none() {
            self.src.prefetch(&self.src.rows[i]);
        }
    }

    fn feed(&mut self, i: usize, out: GgmlType, put: &mut Put<'_>) -> Result<(GgmlType, ErrStats)> {
        let range = self.streamed(i);
        let src = self.src;
        let r: &SourceRow = &src.rows[i];
        let entry = src.store(r.store).entry(&r.row.src);
        match (range, self.stream.as_deref_mut(), entry) {
            // A float cast of a tensor as it lies in the file: straight from the read buffers
            // into the writer, a buffer at a time (no whole-tensor copy: the 250 MiB embedding
            // would have doubled peak memory).
            (Some((f, a, b)), Some(s), Some(e))
                if r.row.transform.is_none() && is_elementwise(e.ty, out) =>
            {
                let size = e.ty.type_size();
                let mut before = 0;
                s.take_each(f, a, b, size, |seg| {
                    put(e.ty, seg, before)?;
                    before += seg.len() / size;
                    Ok(())
                })?;
                Ok((e.ty, ErrStats::default()))
            }
            // Rows with a transform (Q/K permutation) need the whole tensor.
            (Some((f, a, b)), Some(s), Some(e)) => {
                s.take_into(f, a, b, &mut self.scratch)?;
                let whole = SrcTensor {
                    ty: e.ty,
                    shape: e.shape.clone(),
                    data: Cow::Borrowed(&self.scratch[..]),
                };
                let data = src.transform(r, whole)?;
                Ok((data.ty, put(data.ty, &data.data, 0)?))
            }
            _ => {
                let data = src.read(r)?;
                Ok((data.ty, put(data.ty, &data.data, 0)?))
            }
        }
    }

    fn release(&self, i: usize) {
        if self.streamed(i).is_none() {
            let r = &self.src.rows[i];
            self.src.store(r.store).release(&r.row.src);
        }
    }
}

/// The whole hf-to-gguf (or checkpoint -> quantized) run.
pub fn run(opts: &ConvertOptions, progress: &dyn Progress) -> Result<ConvertSummary> {
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
        progress,
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
        .any(|t| src.stream_range(&src.rows[t.input]).is_some())
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
        .map(|t| stored_bytes(&src, &src.rows[t.input]))
        .sum();
    let n_tensors: usize = plans.iter().map(|p| p.tensors.len()).sum();
    progress.start(&format!("0/{n_tensors} tensors"), total, Unit::Bytes);
    let mut outputs = vec![];
    let mut tensors = vec![];
    // All or nothing: every artefact stays under its temporary name (removed on drop, i.e. on
    // any error) until all of them are complete; only then are they renamed into place. Files
    // of an earlier run in the same directory are untouched by a run that fails.
    let mut pending = vec![];
    for plan in &plans {
        let mut input = CheckpointInput {
            src: &src,
            stream: stream.as_mut().filter(|_| in_source_order(plan)),
            scratch: vec![],
        };
        let e = emit(plan, &mut input, opts.allow_nonfinite, progress)?;
        if in_source_order(plan) {
            if let Some(s) = stream.as_mut() {
                s.done_taking();
            }
        }
        outputs.push(e.output);
        tensors.extend(e.tensors);
        pending.push(e.file);
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

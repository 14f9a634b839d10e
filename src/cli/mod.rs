//! Command-line interface: clap definitions, output formatting, exit codes. No conversion logic.
mod progress;

use crate::convert::from_checkpoint::{self, ConvertOptions};
use crate::convert::from_gguf::{self, QuantizeOptions};
use crate::convert::recipe::ArtefactKind;
use crate::ground::dtype::{FileType, GgmlType};
use crate::ground::error::{Error, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use progress::Bars;
use std::path::{Path, PathBuf};

/// The bundled fixture, used when hf-to-gguf is run without a checkpoint.
pub const FIXTURE_CHECKPOINT: &str = "fixtures/tiny-llava-mmfuser";
pub const FIXTURE_TOWER: &str = "fixtures/tiny-clip";

#[derive(Parser, Debug)]
#[command(
    name = "mmfuser-convert",
    version,
    about = "Convert LLaVA-MMFuser checkpoints to GGUF, quantize them, and verify the result.",
    long_about = "Convert LLaVA-MMFuser (and plain LLaVA-1.5) checkpoints into the two GGUF files llama.cpp-style \
runtimes use: the language model (which stock llama.cpp loads) and an mmproj file (CLIP tower + MMFuser fuser + \
MLP projector). Quantize the language model to Q8_0 / Q4_K_M byte-identically to llama.cpp's llama-quantize, \
keeping the fuser in F16.\n\nExit codes (every verb): 0 success; 1 bad input (a file that is missing, unreadable, malformed or \
not what the recipe expects); 2 usage error (the command line: unknown, missing, \
conflicting or inapplicable options); 3 verify ran and the artefact failed a check.",
    after_help = "Examples:\n  mmfuser-convert hf-to-gguf                       # the bundled tiny fixture -> ./out\n  \
mmfuser-convert hf-to-gguf ~/llava-mmfuser-7b --vision-tower ~/clip-vit-large-patch14-336\n  \
mmfuser-convert quantize --bits 4 out/llava-mmfuser-7b-F16.gguf\n  \
mmfuser-convert quantize --bits 4 ~/llava-mmfuser-7b --vision-tower ~/clip   # checkpoint -> Q4_K_M in one pass"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where a verb writes, the same options on every verb: `-o FILE` where it writes one file,
/// `--out-dir DIR` for the directory; a combination a verb cannot honour is a usage error.
#[derive(Args, Debug, Clone, Default)]
pub struct OutArgs {
    /// Output file, for a verb that writes one file (quantize of a GGUF file; its manifest goes beside it).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Output directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// What a verb prints, the same options on every verb.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct Print {
    /// Errors only: no progress bar, no "wrote ..." lines or tables (the exit code tells the outcome).
    #[arg(short, long)]
    pub quiet: bool,
    /// Print one JSON document on stdout and nothing else there (schemas/: hf-to-gguf-summary,
    /// quantize-summary, verify-report, synth-summary, demo-summary).
    #[arg(long)]
    pub json: bool,
}

/// The directory of a verb that writes several files: `-o` names one file, so it cannot be honoured.
pub fn out_dir_only(verb: &str, o: &OutArgs, default: &str) -> Result<PathBuf> {
    if let Some(f) = &o.output {
        return Err(Error::usage(format!(
            "{verb} writes several files, so -o/--output {} (one file) cannot be honoured; give --out-dir DIR",
            f.display()
        )));
    }
    Ok(o.out_dir.clone().unwrap_or_else(|| PathBuf::from(default)))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutType {
    F16,
    Bf16,
    F32,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Convert a Hugging Face checkpoint directory into <name>-F16.gguf (LLM) and mmproj-<name>-F16.gguf.
    #[command(
        long_about = "Convert a LLaVA-MMFuser (or LLaVA-1.5) checkpoint directory into two GGUF files:\n  \
<name>-<TYPE>.gguf         the LLaMA language model, loadable by stock llama.cpp\n  \
mmproj-<name>-<TYPE>.gguf  CLIP vision tower (only the blocks needed) + MMFuser fuser + MLP projector\n\
and <name>-<TYPE>.manifest.json (sha256 of every input and output, the tensor mapping).\n\n\
Reads safetensors (single or sharded) or PyTorch .bin (single or sharded) in bf16/f16/f32, one tensor at a \
time (memory stays near the largest tensor). Output goes to a temporary file renamed into place when complete: \
on any error nothing is left behind.\n\nWithout CHECKPOINT_DIR, converts the bundled fixture \
(fixtures/tiny-llava-mmfuser with --vision-tower fixtures/tiny-clip)."
    )]
    HfToGguf {
        /// Checkpoint directory (config.json, weights, tokenizer.model). Default: the bundled fixture.
        checkpoint: Option<PathBuf>,
        /// Hugging Face CLIP directory (the model named by mm_vision_tower), if the checkpoint does not embed the tower.
        #[arg(long, value_name = "DIR")]
        vision_tower: Option<PathBuf>,
        /// --out-dir DIR (default ./out) receives the two GGUF files and the manifest.
        #[command(flatten)]
        out: OutArgs,
        /// Type of the 2-D weights (norms, biases and other 1-D tensors stay F32; the fuser stays F16 unless f32).
        #[arg(long, value_enum, default_value = "f16")]
        outtype: OutType,
        /// Model name for file names and general.name (default: the checkpoint directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Convert tensors that contain NaN or Inf instead of failing.
        #[arg(long)]
        allow_nonfinite: bool,
        /// --json: schemas/hf-to-gguf-summary.schema.json.
        #[command(flatten)]
        print: Print,
    },
    /// Quantize an LLM GGUF (or a checkpoint directory, in one pass) to Q8_0, Q4_K_M, ... like llama-quantize.
    #[command(
        long_about = "Quantize the language model byte-identically to llama.cpp's llama-quantize (reference \
quantizers, no importance matrix): the same type per tensor (Q4_K_M keeps output.weight and some attn_v / \
ffn_down layers in Q6_K), the same block bytes, the same metadata.\n\n\
INPUT is an F32/F16/BF16 LLM GGUF, or a checkpoint directory (then conversion and quantization happen in one \
streaming pass with no F16 intermediate, and the mmproj is written alongside).\n\
An mmproj file is only quantized with --vision-type Q8_0, which quantizes the CLIP encoder blocks; the MMFuser \
fuser is never quantized.\n\nOutput of a GGUF input: -o FILE, or <name>-<TYPE>.gguf (<name> without its -F16 suffix) in \
--out-dir DIR, by default beside the input. A checkpoint input writes several files: --out-dir DIR (default ./out)."
    )]
    Quantize {
        /// LLM GGUF file, mmproj GGUF file, or checkpoint directory.
        input: PathBuf,
        #[command(flatten)]
        out: OutArgs,
        /// 8 -> Q8_0, 4 -> Q4_K_M.
        #[arg(long, value_parser = ["8", "4"], conflicts_with = "type")]
        bits: Option<String>,
        /// Explicit llama.cpp file type: Q8_0, Q4_0, Q4_K_S, Q4_K_M, Q6_K, F16.
        #[arg(long = "type", value_name = "TYPE")]
        r#type: Option<String>,
        /// Quantize the CLIP tower's matrices too (mmproj or checkpoint input): Q8_0.
        #[arg(long, value_name = "TYPE")]
        vision_type: Option<String>,
        /// CLIP directory for a checkpoint input (see hf-to-gguf).
        #[arg(long, value_name = "DIR")]
        vision_tower: Option<PathBuf>,
        /// Quantize tensors containing NaN or Inf values anyway (F16 passes them; quantizers still refuse).
        #[arg(long)]
        allow_nonfinite: bool,
        /// Threads (default: all cores). Output bytes do not depend on it.
        #[arg(short = 't', long)]
        threads: Option<usize>,
        /// --json: schemas/quantize-summary.schema.json for a GGUF input (each tensor's type and
        /// relative RMS quantization error), schemas/hf-to-gguf-summary.schema.json for a checkpoint.
        #[command(flatten)]
        print: Print,
    },
    /// The whole pipeline on the bundled fixture: hf-to-gguf, quantize to Q4_K_M, verify (ends with the verify table).
    Demo {
        /// --out-dir DIR (default ./out).
        #[command(flatten)]
        out: OutArgs,
        /// --json: schemas/demo-summary.schema.json.
        #[command(flatten)]
        print: Print,
    },
    /// Run the model from the checkpoint and from the GGUF artefacts on the same probe and compare logits.
    #[command(
        long_about = "Decide whether the artefacts are what conversion makes from this checkpoint, at any scale and \
for any type.\n\n\
Exactness (the verdict): the artefacts' sha256 against the manifest beside them; every metadata key, tensor name, \
shape and type against what hf-to-gguf/quantize would write from the checkpoint; every tensor's bytes against the \
plan's output (our quantizers are byte-identical to llama.cpp's; a mismatch names the tensor and first differing \
block); then the whole model (CLIP, deformable-attention fuser, MLP, LLaMA) run from the artefacts (with their own \
metadata and vocabulary) and from the source passed through the types the artefacts record, compared with one \
tight bound for every type. Any NaN/Inf fails, naming where.\n\n\
Quality (reported; judged only with --tolerance): KL(source float || artefact) over positions (mean, median, p99, \
p99.9, max), top-1 agreement and the mean change in the probability of the source's top token, as \
llama-perplexity --kl-divergence reports them; --exact-only skips this third forward.\n\n\
Default probe: a deterministic synthetic image and the llava_v1 prompt \"Describe the image.\".\n\
Exit codes: 0 pass; 3 the artefact failed a check; 1 bad input (verify could not run); 2 usage error."
    )]
    Verify {
        /// Source checkpoint directory.
        checkpoint: PathBuf,
        /// The LLM GGUF (F32, F16, BF16, Q8_0, Q4_0, Q4_K_S, Q4_K_M, Q6_K).
        #[arg(long, value_name = "FILE")]
        gguf: PathBuf,
        /// The mmproj GGUF.
        #[arg(long, value_name = "FILE")]
        mmproj: PathBuf,
        /// CLIP directory, as for hf-to-gguf.
        #[arg(long, value_name = "DIR")]
        vision_tower: Option<PathBuf>,
        /// Quality gate: bound on the mean KL(source float || artefact) (a finite number >= 0;
        /// without it quality is reported, not judged).
        #[arg(long, value_name = "KL")]
        tolerance: Option<f64>,
        /// Quality gate: bound on the image embeddings' relative RMS error against the float source.
        #[arg(long, value_name = "T")]
        image_tolerance: Option<f64>,
        /// Exactness only: skip the float-source forward and its quality figures.
        #[arg(long)]
        exact_only: bool,
        /// cpu, cuda or auto (auto: CUDA when usable, else CPU).
        #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
        device: String,
        /// A PNG or JPEG, preprocessed as LLaVA does (pad to square, resize, centre crop, normalise).
        /// Repeatable: each --image with the --prompt of the same position (or one of either for all).
        #[arg(long, conflicts_with = "pixel_values")]
        image: Vec<PathBuf>,
        /// Already normalised pixels, a [3,H,W] f32 .npy.
        #[arg(long, value_name = "NPY")]
        pixel_values: Option<PathBuf>,
        /// The question in the llava_v1 template (or a whole prompt containing <image>).
        /// Repeatable (see --image); the report gives per-probe and overall figures.
        #[arg(long, conflicts_with = "input_ids")]
        prompt: Vec<String>,
        /// A JSON list of token ids; -200 marks the image.
        #[arg(long, value_name = "JSON")]
        input_ids: Option<PathBuf>,
        /// Write source.npy and artefact.npy ([positions, vocab] f32 logits) here.
        #[arg(long, value_name = "DIR")]
        dump_logits: Option<PathBuf>,
        /// --json: the report (schemas/verify-report.schema.json) instead of the table.
        #[command(flatten)]
        print: Print,
    },
    /// Run the converted model: image + prompt -> text (tokens streamed to stdout).
    #[command(
        long_about = "Run LLaVA-MMFuser from the GGUF artefacts (--gguf + --mmproj), or from the source checkpoint \
(--checkpoint, for comparison): the image is encoded once (CLIP, deformable-attention fuser, MLP), the question is \
put into the llava_v1 conversation template, and the answer is generated with a KV cache, one position per token, \
streamed to stdout as it comes. Prefill and decode speed and peak memory go to stderr.\n\n\
Greedy with --temp 0 (the default); otherwise temperature, top-k and top-p sampling with a seeded generator. \
--interactive reads further questions from stdin (one per line, an empty line ends), about the same image.\n\
Exit codes: 0 done, 1 bad input, 2 usage error."
    )]
    Generate(GenerateArgs),
    /// Write a synthetic LLaVA-MMFuser checkpoint at real scale (random weights, real names and shapes).
    #[command(
        long_about = "Write a synthetic LLaVA-MMFuser checkpoint with the real tensor names and shapes and seeded \
random values, for benchmarks and scale tests:\n  OUT_DIR/checkpoint/  config.json, bf16 safetensors shards + index, \
tokenizer.model (32000 pieces for 7b/13b)\n  OUT_DIR/clip/        the CLIP vision tower (CLIPVisionModel, f16)\n  \
OUT_DIR/llama/       with --llama-view: the same LLM as a plain LlamaForCausalLM directory (for llama.cpp's converter)"
    )]
    Synth {
        /// Model size: 7b (about 14 GB), 13b (about 26 GB) or tiny (a few MB).
        #[arg(long, value_enum)]
        size: crate::convert::synth::SynthSize,
        /// Output directory (its checkpoint/, clip/ and llama/ subdirectories are replaced); or --out-dir.
        #[arg(value_name = "OUT_DIR")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        out: OutArgs,
        /// Seed of the random values.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write OUT_DIR/llama/, a plain LlamaForCausalLM directory with the same LLM tensors.
        #[arg(long)]
        llama_view: bool,
        /// --json: schemas/synth-summary.schema.json.
        #[command(flatten)]
        print: Print,
    },
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The LLM GGUF (any type quantize writes).
    #[arg(long, value_name = "FILE", requires = "mmproj")]
    gguf: Option<PathBuf>,
    /// The mmproj GGUF.
    #[arg(long, value_name = "FILE", requires = "gguf")]
    mmproj: Option<PathBuf>,
    /// Run the source checkpoint instead of the artefacts.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["gguf", "mmproj"])]
    checkpoint: Option<PathBuf>,
    /// CLIP directory for --checkpoint, as for hf-to-gguf.
    #[arg(long, value_name = "DIR", requires = "checkpoint")]
    vision_tower: Option<PathBuf>,
    /// A PNG or JPEG, preprocessed as LLaVA does (pad to square, resize, centre crop, normalise).
    #[arg(long, conflicts_with = "pixel_values")]
    image: Option<PathBuf>,
    /// Already normalised pixels, a [3,H,W] f32 .npy.
    #[arg(long, value_name = "NPY")]
    pixel_values: Option<PathBuf>,
    /// The question (put into the llava_v1 template after the image), or a user message containing <image>.
    #[arg(long, conflicts_with = "input_ids")]
    prompt: Option<String>,
    /// The whole prompt as a JSON list of token ids; -200 marks the image.
    #[arg(long, value_name = "JSON")]
    input_ids: Option<PathBuf>,
    /// Stop after this many tokens (or at EOS).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Temperature; 0 is greedy.
    // A negative value is read as a value (and refused as one), not as an unknown flag.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temp: f32,
    /// Sample from the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample from the most likely tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or auto (auto: CUDA when usable, else CPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    device: String,
    /// How the KV cache stores keys and values: f32 (decoding with the cache gives the logits of
    /// the whole sequence recomputed) or f16 (as llama.cpp stores them: half the cache's memory,
    /// each key and value rounded to f16).
    #[arg(long, value_name = "TYPE", default_value = "f32",
          value_parser = clap::builder::PossibleValuesParser::new(crate::model::KvType::ALL.map(crate::model::KvType::name)))]
    kv_cache: String,
    /// Further questions about the same image from stdin, one per line (an empty line ends).
    #[arg(long, conflicts_with = "json")]
    interactive: bool,
    /// One JSON document on stdout instead of streamed text (schemas/generate-report.schema.json).
    #[arg(long)]
    json: bool,
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let (dev, line) = crate::runtime::device::select(&a.device)?;
    if a.device != "cpu" {
        eprintln!("{line}");
    }
    let opts = crate::generate::GenerateOptions {
        gguf: a.gguf,
        mmproj: a.mmproj,
        checkpoint: a.checkpoint,
        vision_tower: a.vision_tower,
        image: a.image,
        pixel_values: a.pixel_values,
        prompt: a.prompt,
        input_ids: a.input_ids,
        max_tokens: a.max_tokens,
        sampling: crate::generate::SamplingOptions {
            temperature: a.temp,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        interactive: a.interactive,
        stream: !a.json,
        // clap accepted only the names of KvType::ALL.
        kv_cache: crate::model::KvType::from_name(&a.kv_cache).unwrap_or_default(),
    };
    let stdin = std::io::stdin();
    let r = crate::generate::run(
        &opts,
        &dev,
        &mut stdin.lock(),
        &mut std::io::stdout(),
        &Bars::new(false),
    )?;
    if a.json {
        print_json(&r)?;
    }
    Ok(())
}

fn outtype_file_type(o: OutType) -> FileType {
    match o {
        OutType::F16 => FileType::MostlyF16,
        OutType::Bf16 => FileType::MostlyBF16,
        OutType::F32 => FileType::AllF32,
    }
}

/// Accepted --type names: the quantize targets.
pub const QUANT_TYPES: &[&str] = &["Q8_0", "Q4_0", "Q4_K_S", "Q4_K_M", "Q6_K", "F16"];

fn parse_file_type(bits: Option<&str>, ty: Option<&str>) -> Result<Option<FileType>> {
    match (bits, ty) {
        (Some("8"), None) => Ok(Some(FileType::MostlyQ8_0)),
        (Some("4"), None) => Ok(Some(FileType::MostlyQ4KM)),
        (None, Some(t)) => {
            let ok = QUANT_TYPES.iter().any(|q| q.eq_ignore_ascii_case(t));
            match FileType::from_name(t) {
                Some(ft) if ok => Ok(Some(ft)),
                _ => Err(Error::usage(format!(
                    "--type {t} is not supported; choose one of {}",
                    QUANT_TYPES.join(", ")
                ))),
            }
        }
        (None, None) => Ok(None),
        _ => Err(Error::usage("give either --bits or --type, not both")),
    }
}

fn human_bytes(b: u64) -> String {
    let mb = b as f64 / (1u64 << 20) as f64;
    if mb >= 1024.0 {
        format!("{:.2} GiB", mb / 1024.0)
    } else {
        format!("{mb:.2} MiB")
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| Error::other(e.to_string()))?
    );
    Ok(())
}

fn print_convert(s: &from_checkpoint::ConvertSummary) {
    for o in &s.outputs {
        println!(
            "wrote {}  ({}, {} tensors, {}, sha256 {})",
            o.path.display(),
            o.kind,
            o.tensors,
            human_bytes(o.bytes),
            &o.sha256[..16]
        );
    }
    println!("wrote {}", s.manifest.display());
    println!(
        "recipe {}: {} tensors written, {} dropped (unused vision blocks etc.), {} in {:.2} s, peak memory {}",
        s.recipe,
        s.tensors_written,
        s.tensors_dropped,
        human_bytes(s.bytes_written),
        s.seconds,
        human_bytes(s.peak_rss_bytes)
    );
}

/// The "wrote ..." lines of a conversion, unless -q or --json.
fn report_convert(s: &from_checkpoint::ConvertSummary, print: Print) -> Result<()> {
    if print.json {
        print_json(s)
    } else {
        if !print.quiet {
            print_convert(s);
        }
        Ok(())
    }
}

fn print_quantize(s: &from_gguf::QuantizeSummary) {
    let counts: Vec<String> = s
        .type_counts
        .iter()
        .map(|(k, v)| format!("{v} x {k}"))
        .collect();
    println!(
        "wrote {} ({}, {} tensors: {}, {}) in {:.2} s",
        s.output.path.display(),
        s.file_type,
        s.output.tensors,
        counts.join(", "),
        human_bytes(s.output.bytes),
        s.seconds
    );
    println!("wrote {}", s.manifest.display());
}

/// The bundled fixture (checkpoint, tower): in the working directory when run from the
/// repository root, else next to the sources this binary was built from (`cargo install --path .`).
pub fn fixture_paths() -> Option<(PathBuf, PathBuf)> {
    let here = (
        PathBuf::from(FIXTURE_CHECKPOINT),
        PathBuf::from(FIXTURE_TOWER),
    );
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    let beside = (built.join(FIXTURE_CHECKPOINT), built.join(FIXTURE_TOWER));
    [here, beside]
        .into_iter()
        .find(|(c, t)| c.join("config.json").is_file() && t.join("config.json").is_file())
}

/// The fixture, or a tiny synthetic checkpoint generated into `scratch` when the sources are
/// gone (synth --size tiny: the same layout, random weights).
fn fixture_or_synth(scratch: &Path, quiet: bool) -> Result<(PathBuf, PathBuf)> {
    if let Some(p) = fixture_paths() {
        return Ok(p);
    }
    if !quiet {
        eprintln!(
            "the bundled fixture is not here (nor next to the sources); generating a tiny synthetic checkpoint in {}",
            scratch.display()
        );
    }
    let s = crate::convert::synth::run(
        &crate::convert::synth::SynthOptions {
            size: crate::convert::synth::SynthSize::Tiny,
            out_dir: scratch.to_path_buf(),
            seed: 0,
            llama_view: false,
        },
        &Bars::new(true),
    )?;
    Ok((s.checkpoint, s.clip))
}

/// The whole pipeline's results, for `demo --json` (schemas/demo-summary.schema.json).
#[derive(serde::Serialize)]
struct DemoSummary {
    convert: from_checkpoint::ConvertSummary,
    quantize: from_gguf::QuantizeSummary,
    verify: crate::verify::Report,
}

fn run_demo(out_dir: PathBuf, print: Print, argv: Vec<String>) -> Result<()> {
    let say = !print.quiet && !print.json;
    let scratch = out_dir.join("demo-checkpoint");
    let (ck, tower) = fixture_or_synth(&scratch, !say)?;
    if say {
        println!(
            "== 1/3 hf-to-gguf {} --vision-tower {}",
            ck.display(),
            tower.display()
        );
    }
    let conv = ConvertOptions {
        checkpoint: ck.clone(),
        vision_tower: Some(tower.clone()),
        out_dir: out_dir.clone(),
        file_type: FileType::MostlyF16,
        vision_type: None,
        name: None,
        allow_nonfinite: false,
        command_line: argv.clone(),
    };
    let s = from_checkpoint::run(&conv, &Bars::new(true))?;
    if say {
        print_convert(&s);
    }
    let path_of = |kind: ArtefactKind| {
        s.outputs
            .iter()
            .find(|o| o.kind == kind)
            .map(|o| o.path.clone())
            .ok_or_else(|| Error::other(format!("no {kind} written")))
    };
    let (llm, mmproj) = (path_of(ArtefactKind::Llm)?, path_of(ArtefactKind::Mmproj)?);
    if say {
        println!("\n== 2/3 quantize --bits 4 {}", llm.display());
    }
    let q = from_gguf::quantize_file(
        &QuantizeOptions {
            input: llm,
            output: None,
            out_dir: None,
            file_type: Some(FileType::MostlyQ4KM),
            vision_type: None,
            allow_nonfinite: false,
            command_line: argv.clone(),
        },
        &Bars::new(true),
    )?;
    if say {
        print_quantize(&q);
        println!("\n== 3/3 verify (source checkpoint vs Q4_K_M + F16 mmproj)");
    }
    let opts = crate::verify::VerifyOptions {
        checkpoint: ck,
        gguf: q.output.path.clone(),
        mmproj,
        vision_tower: Some(tower),
        tolerance: None,
        image_tolerance: None,
        exact_only: false,
        image: vec![],
        pixel_values: None,
        prompt: vec![],
        input_ids: None,
        dump_logits: None,
    };
    let r = crate::verify::run(&opts, &argv, &Bars::new(true))?;
    let passed = r.passed;
    if print.json {
        print_json(&DemoSummary {
            convert: s,
            quantize: q,
            verify: r,
        })?;
    } else if say {
        print!("{}", crate::verify::render(&r));
    }
    if passed {
        Ok(())
    } else {
        Err(Error::Failed("verification failed".into()))
    }
}

/// The most worker threads accepted (-t or RAYON_NUM_THREADS): far above any core count, far
/// below what makes thread creation itself fail (EAGAIN) or take seconds.
pub const MAX_THREADS: usize = 1024;

/// The global thread pool from `-t`, else RAYON_NUM_THREADS, checked: rayon itself would panic
/// when it cannot spawn what the environment asks for.
fn init_threads(flag: Option<usize>) -> Result<()> {
    let n = match (flag, std::env::var_os("RAYON_NUM_THREADS")) {
        (Some(n), _) => {
            if n > MAX_THREADS {
                return Err(Error::usage(format!(
                    "-t {n}: at most {MAX_THREADS} threads"
                )));
            }
            n.max(1)
        }
        (None, Some(v)) => {
            let n = v
                .to_str()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .filter(|&n| n <= MAX_THREADS)
                .ok_or_else(|| {
                    Error::usage(format!(
                        "RAYON_NUM_THREADS={} is not a thread count from 0 (all cores) to {MAX_THREADS}",
                        v.to_string_lossy().escape_debug()
                    ))
                })?;
            if n == 0 {
                return Ok(());
            }
            n
        }
        (None, None) => return Ok(()),
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::other(format!("cannot start {n} threads: {e}")))
}

/// A message for the terminal: control characters from file contents or names (an ESC could
/// drive the terminal) are shown escaped; line breaks and tabs stay.
pub fn escape_controls(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' | '\t' => c.to_string(),
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

fn run(cli: Cli, argv: Vec<String>) -> Result<()> {
    crate::quant::dot::Isa::asked().map_err(Error::usage)?;
    if !matches!(cli.command, Command::Quantize { .. }) {
        init_threads(None)?;
    }
    match cli.command {
        Command::HfToGguf {
            checkpoint,
            vision_tower,
            out,
            outtype,
            name,
            allow_nonfinite,
            print,
        } => {
            let out_dir = out_dir_only("hf-to-gguf", &out, "out")?;
            let (checkpoint, vision_tower) = match checkpoint {
                Some(c) => (c, vision_tower),
                None => {
                    let (c, t) = fixture_or_synth(&out_dir.join("demo-checkpoint"), print.quiet)?;
                    if !print.quiet {
                        eprintln!(
                            "no checkpoint given: converting the bundled fixture {} (vision tower {})",
                            c.display(),
                            t.display()
                        );
                    }
                    (c, vision_tower.or(Some(t)))
                }
            };
            let opts = ConvertOptions {
                checkpoint,
                vision_tower,
                out_dir,
                file_type: outtype_file_type(outtype),
                vision_type: None,
                name,
                allow_nonfinite,
                command_line: argv,
            };
            report_convert(
                &from_checkpoint::run(&opts, &Bars::new(print.quiet || print.json))?,
                print,
            )
        }
        Command::Demo { out, print } => run_demo(out_dir_only("demo", &out, "out")?, print, argv),
        Command::Verify {
            checkpoint,
            gguf,
            mmproj,
            vision_tower,
            tolerance,
            image_tolerance,
            exact_only,
            device,
            image,
            pixel_values,
            prompt,
            input_ids,
            dump_logits,
            print,
        } => {
            let (dev, line) = crate::runtime::device::select(&device)?;
            if !print.quiet && device != "cpu" {
                eprintln!("{line}");
            }
            let opts = crate::verify::VerifyOptions {
                checkpoint,
                gguf,
                mmproj,
                vision_tower,
                tolerance,
                image_tolerance,
                exact_only,
                image,
                pixel_values,
                prompt,
                input_ids,
                dump_logits,
            };
            let r =
                crate::verify::run_on(&opts, &argv, &dev, &Bars::new(print.quiet || print.json))?;
            if print.json {
                print_json(&r)?;
            } else if !print.quiet {
                print!("{}", crate::verify::render(&r));
            }
            if r.passed {
                Ok(())
            } else {
                Err(Error::Failed(format!(
                    "verification failed: {}",
                    r.reasons.join("; ")
                )))
            }
        }
        Command::Quantize {
            input,
            out,
            bits,
            r#type,
            vision_type,
            vision_tower,
            allow_nonfinite,
            threads,
            print,
        } => {
            init_threads(threads)?;
            let ft = parse_file_type(bits.as_deref(), r#type.as_deref())?;
            let vt = match vision_type.as_deref() {
                None => None,
                Some(v) => match GgmlType::from_name(v) {
                    Some(GgmlType::Q8_0) => Some(GgmlType::Q8_0),
                    Some(GgmlType::F16) => None,
                    _ => {
                        return Err(Error::usage(format!(
                            "--vision-type {v} is not supported (Q8_0, F16)"
                        )))
                    }
                },
            };
            if input.is_dir() {
                let ft = ft.ok_or_else(|| Error::usage("give --bits 8|4 or --type TYPE"))?;
                let opts = ConvertOptions {
                    checkpoint: input,
                    vision_tower,
                    out_dir: out_dir_only("quantize of a checkpoint directory", &out, "out")?,
                    file_type: ft,
                    vision_type: vt,
                    name: None,
                    allow_nonfinite,
                    command_line: argv,
                };
                return report_convert(
                    &from_checkpoint::run(&opts, &Bars::new(print.quiet || print.json))?,
                    print,
                );
            }
            if vision_tower.is_some() {
                return Err(Error::usage(
                    "--vision-tower applies to a checkpoint directory input",
                ));
            }
            if out.output.is_some() && out.out_dir.is_some() {
                return Err(Error::usage(
                    "give -o FILE or --out-dir DIR, not both (-o names the file itself)",
                ));
            }
            let opts = QuantizeOptions {
                input,
                output: out.output,
                out_dir: out.out_dir,
                file_type: ft,
                vision_type: vt,
                allow_nonfinite,
                command_line: argv,
            };
            let s = from_gguf::quantize_file(&opts, &Bars::new(print.quiet || print.json))?;
            if print.json {
                print_json(&s)
            } else {
                if !print.quiet {
                    print_quantize(&s);
                }
                Ok(())
            }
        }
        Command::Generate(a) => run_generate(a),
        Command::Synth {
            size,
            dir,
            out,
            seed,
            llama_view,
            print,
        } => {
            let out_dir = match (dir, out_dir_only("synth", &out, "")?) {
                (Some(d), o) if o.as_os_str().is_empty() => d,
                (None, o) if !o.as_os_str().is_empty() => o,
                (Some(_), _) => {
                    return Err(Error::usage(
                        "give the output directory once (OUT_DIR or --out-dir)",
                    ))
                }
                (None, _) => {
                    return Err(Error::usage(
                        "give the output directory (OUT_DIR or --out-dir)",
                    ))
                }
            };
            let s = crate::convert::synth::run(
                &crate::convert::synth::SynthOptions {
                    size,
                    out_dir,
                    seed,
                    llama_view,
                },
                &Bars::new(print.quiet || print.json),
            )?;
            if print.json {
                print_json(&s)
            } else {
                if !print.quiet {
                    println!(
                        "wrote {} and {}{} ({:.3e} parameters, {} in {:.1} s, {:.2} GB/s)",
                        s.checkpoint.display(),
                        s.clip.display(),
                        s.llama
                            .as_ref()
                            .map(|l| format!(" and {}", l.display()))
                            .unwrap_or_default(),
                        s.parameters as f64,
                        human_bytes(s.bytes_written),
                        s.seconds,
                        s.bytes_written as f64 / 1e9 / s.seconds.max(1e-9)
                    );
                }
                Ok(())
            }
        }
    }
}

/// Parse arguments, run, print errors; returns the process exit code.
pub fn main() -> i32 {
    // Arguments as OsStrings: paths need not be UTF-8 (clap refuses non-UTF-8 text options,
    // such as --prompt, with a usage error). The manifest records the line lossily.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    crate::ground::fsutil::signals::install();
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 2,
            };
        }
    };
    match run(cli, argv) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", escape_controls(&e.to_string()));
            e.exit_code()
        }
    }
}

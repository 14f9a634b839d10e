//! Command-line interface: clap definitions, output formatting, exit codes. No conversion logic.
use crate::convert::{self, ConvertOptions};
use crate::error::{Error, Result};
use crate::gguf::{FileType, GgmlType};
use crate::quantize::{self, QuantizeOptions};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

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
keeping the fuser in F16.\n\nExit codes: 0 success, 1 bad input or failed check, 2 usage error.",
    after_help = "Examples:\n  mmfuser-convert hf-to-gguf                       # the bundled tiny fixture -> ./out\n  \
mmfuser-convert hf-to-gguf ~/llava-mmfuser-7b --vision-tower ~/clip-vit-large-patch14-336\n  \
mmfuser-convert quantize --bits 4 out/llava-mmfuser-7b-F16.gguf\n  \
mmfuser-convert quantize --bits 4 ~/llava-mmfuser-7b --vision-tower ~/clip   # checkpoint -> Q4_K_M in one pass"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
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
        /// Output directory.
        #[arg(short = 'o', long, value_name = "DIR", default_value = "out")]
        out_dir: PathBuf,
        /// Type of the 2-D weights (norms, biases and other 1-D tensors stay F32; the fuser stays F16 unless f32).
        #[arg(long, value_enum, default_value = "f16")]
        outtype: OutType,
        /// Model name for file names and general.name (default: the checkpoint directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Convert tensors that contain NaN or Inf instead of failing.
        #[arg(long)]
        allow_nonfinite: bool,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
        /// Print a JSON summary on stdout (schema: schemas/hf-to-gguf-summary.schema.json).
        #[arg(long)]
        json: bool,
    },
    /// Quantize an LLM GGUF (or a checkpoint directory, in one pass) to Q8_0, Q4_K_M, ... like llama-quantize.
    #[command(
        long_about = "Quantize the language model byte-identically to llama.cpp's llama-quantize (reference \
quantizers, no importance matrix): the same type per tensor (Q4_K_M keeps output.weight and some attn_v / \
ffn_down layers in Q6_K), the same block bytes, the same metadata.\n\n\
INPUT is an F32/F16/BF16 LLM GGUF, or a checkpoint directory (then conversion and quantization happen in one \
streaming pass with no F16 intermediate, and the mmproj is written alongside).\n\
An mmproj file is only quantized with --vision-type Q8_0, which quantizes the CLIP encoder blocks; the MMFuser \
fuser is never quantized.\n\nDefault output: <name>-<TYPE>.gguf beside the input (<name> without its -F16 suffix)."
    )]
    Quantize {
        /// LLM GGUF file, mmproj GGUF file, or checkpoint directory.
        input: PathBuf,
        /// Output file (GGUF input) .
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
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
        /// Output directory for a checkpoint input.
        #[arg(long, value_name = "DIR", default_value = "out")]
        out_dir: PathBuf,
        /// Quantize tensors containing NaN or Inf values anyway (F16 passes them; quantizers still refuse).
        #[arg(long)]
        allow_nonfinite: bool,
        /// Threads (default: all cores). Output bytes do not depend on it.
        #[arg(short = 't', long)]
        threads: Option<usize>,
        #[arg(short, long)]
        quiet: bool,
        /// Print a JSON summary on stdout, with each tensor's type and relative RMS quantization error.
        #[arg(long)]
        json: bool,
    },
    /// The whole pipeline on the bundled fixture: hf-to-gguf, quantize to Q4_K_M, verify (ends with the verify table).
    Demo {
        /// Output directory.
        #[arg(short = 'o', long, value_name = "DIR", default_value = "out")]
        out_dir: PathBuf,
    },
    /// Run the model from the checkpoint and from the GGUF artefacts on the same probe and compare logits.
    #[command(
        long_about = "Run the whole LLaVA-MMFuser forward pass (CLIP, deformable-attention fuser, MLP, LLaMA) twice \
on the CPU, from the source checkpoint and from the artefacts, on the same image and prompt, and compare.\n\n\
Metrics over all positions: max |diff|, relative RMS error, cosine similarity, mean and max KL divergence of \
the softmaxes, top-1 agreement, top-5 overlap; the same (without the distribution metrics) for the image \
embeddings alone, so a fuser fault is told apart from an LLM fault. First checks the artefacts' sha256 \
against the manifest written beside them, when there is one.\n\n\
Default probe: a deterministic synthetic image and the llava_v1 prompt \"Describe the image.\".\n\
Exit codes: 0 within tolerance, 1 not within tolerance (or sha256 mismatch), 2 usage or input error."
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
        /// Bound on the mean KL divergence (default: per LLM file type, see the README).
        #[arg(long)]
        tolerance: Option<f64>,
        /// Bound on the image embeddings' relative RMS error (default per mmproj type: F32 1e-5,
        /// F16/BF16 1e-2, Q8_0 3e-2), so a broken mmproj fails even under a loose LLM bound.
        #[arg(long, value_name = "T")]
        image_tolerance: Option<f64>,
        /// cpu, cuda or auto (auto: CUDA when usable, else CPU).
        #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
        device: String,
        /// A PNG or JPEG, preprocessed as LLaVA does (pad to square, resize, centre crop, normalise).
        #[arg(long, conflicts_with = "pixel_values")]
        image: Option<PathBuf>,
        /// Already normalised pixels, a [3,H,W] f32 .npy.
        #[arg(long, value_name = "NPY")]
        pixel_values: Option<PathBuf>,
        /// The question in the llava_v1 template (or a whole prompt containing <image>).
        #[arg(long, conflicts_with = "input_ids")]
        prompt: Option<String>,
        /// A JSON list of token ids; -200 marks the image.
        #[arg(long, value_name = "JSON")]
        input_ids: Option<PathBuf>,
        /// Write source.npy and artefact.npy ([positions, vocab] f32 logits) here.
        #[arg(long, value_name = "DIR")]
        dump_logits: Option<PathBuf>,
        /// Print the report as JSON (schemas/verify-report.schema.json) instead of the table.
        #[arg(long)]
        json: bool,
    },
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
        size: crate::synth::SynthSize,
        /// Output directory (its checkpoint/, clip/ and llama/ subdirectories are replaced).
        out_dir: PathBuf,
        /// Seed of the random values.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write OUT_DIR/llama/, a plain LlamaForCausalLM directory with the same LLM tensors.
        #[arg(long)]
        llama_view: bool,
        #[arg(short, long)]
        quiet: bool,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
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

fn print_convert(s: &convert::ConvertSummary) {
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
    if !matches!(cli.command, Command::Quantize { .. }) {
        init_threads(None)?;
    }
    match cli.command {
        Command::HfToGguf {
            checkpoint,
            vision_tower,
            out_dir,
            outtype,
            name,
            allow_nonfinite,
            quiet,
            json,
        } => {
            let (checkpoint, vision_tower) = match checkpoint {
                Some(c) => (c, vision_tower),
                None => {
                    let c = PathBuf::from(FIXTURE_CHECKPOINT);
                    if !c.is_dir() {
                        return Err(Error::usage(format!("no CHECKPOINT_DIR given and the bundled fixture {FIXTURE_CHECKPOINT} is not here (run from the repository root)")));
                    }
                    eprintln!("no checkpoint given: converting the bundled fixture {FIXTURE_CHECKPOINT} (vision tower {FIXTURE_TOWER})");
                    (
                        c,
                        vision_tower.or_else(|| Some(PathBuf::from(FIXTURE_TOWER))),
                    )
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
                quiet,
                command_line: argv,
            };
            let s = convert::run(&opts)?;
            if json {
                print_json(&s)
            } else {
                print_convert(&s);
                Ok(())
            }
        }
        Command::Demo { out_dir } => {
            let ck = PathBuf::from(FIXTURE_CHECKPOINT);
            let tower = PathBuf::from(FIXTURE_TOWER);
            if !ck.is_dir() {
                return Err(Error::usage(format!("the bundled fixture {FIXTURE_CHECKPOINT} is not here (run from the repository root)")));
            }
            println!("== 1/3 hf-to-gguf {FIXTURE_CHECKPOINT} --vision-tower {FIXTURE_TOWER}");
            let conv = ConvertOptions {
                checkpoint: ck.clone(),
                vision_tower: Some(tower.clone()),
                out_dir: out_dir.clone(),
                file_type: FileType::MostlyF16,
                vision_type: None,
                name: None,
                allow_nonfinite: false,
                quiet: true,
                command_line: argv.clone(),
            };
            let s = convert::run(&conv)?;
            print_convert(&s);
            let llm = s
                .outputs
                .iter()
                .find(|o| o.kind == "llm")
                .map(|o| o.path.clone())
                .ok_or_else(|| Error::other("no LLM written"))?;
            let mmproj = s
                .outputs
                .iter()
                .find(|o| o.kind == "mmproj")
                .map(|o| o.path.clone())
                .ok_or_else(|| Error::other("no mmproj written"))?;
            println!("\n== 2/3 quantize --bits 4 {}", llm.display());
            let q = quantize::quantize_file(&QuantizeOptions {
                input: llm,
                output: None,
                file_type: Some(FileType::MostlyQ4KM),
                vision_type: None,
                quiet: true,
                allow_nonfinite: false,
                command_line: argv.clone(),
            })?;
            let counts: Vec<String> = q
                .type_counts
                .iter()
                .map(|(k, v)| format!("{v} x {k}"))
                .collect();
            println!("wrote {} ({})", q.output.path.display(), counts.join(", "));
            println!("\n== 3/3 verify (source checkpoint vs Q4_K_M + F16 mmproj)");
            let opts = crate::verify::VerifyOptions {
                checkpoint: ck,
                gguf: q.output.path.clone(),
                mmproj,
                vision_tower: Some(tower),
                tolerance: None,
                image_tolerance: None,
                image: None,
                pixel_values: None,
                prompt: None,
                input_ids: None,
                dump_logits: None,
            };
            let r = crate::verify::run(&opts, &argv)?;
            print!("{}", crate::verify::render(&r));
            if r.passed {
                Ok(())
            } else {
                Err(Error::Other("verification failed".into()))
            }
        }
        Command::Verify {
            checkpoint,
            gguf,
            mmproj,
            vision_tower,
            tolerance,
            image_tolerance,
            device,
            image,
            pixel_values,
            prompt,
            input_ids,
            dump_logits,
            json,
        } => {
            // verify reports input errors with 2, also an input that shrinks under its map.
            crate::fsutil::signals::set_bus_exit_code(2);
            let dev = crate::device::select(&device)?;
            let opts = crate::verify::VerifyOptions {
                checkpoint,
                gguf,
                mmproj,
                vision_tower,
                tolerance,
                image_tolerance,
                image,
                pixel_values,
                prompt,
                input_ids,
                dump_logits,
            };
            // Everything that stops verify from running is a usage or input error (exit 2),
            // reported with its own message (naming file and tensor), not as a usage line.
            let r = crate::verify::run_on(&opts, &argv, &dev).map_err(|e| match e {
                Error::Usage(_) => e,
                e => Error::CannotCheck(Box::new(e)),
            })?;
            if json {
                print_json(&r)?;
            } else {
                print!("{}", crate::verify::render(&r));
            }
            if r.passed {
                Ok(())
            } else {
                Err(Error::Other("verification failed".into()))
            }
        }
        Command::Quantize {
            input,
            output,
            bits,
            r#type,
            vision_type,
            vision_tower,
            out_dir,
            allow_nonfinite,
            threads,
            quiet,
            json,
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
                if output.is_some() {
                    return Err(Error::usage(
                        "-o names one file; with a checkpoint directory use --out-dir",
                    ));
                }
                let opts = ConvertOptions {
                    checkpoint: input,
                    vision_tower,
                    out_dir,
                    file_type: ft,
                    vision_type: vt,
                    name: None,
                    allow_nonfinite,
                    quiet,
                    command_line: argv,
                };
                let s = convert::run(&opts)?;
                return if json {
                    print_json(&s)
                } else {
                    print_convert(&s);
                    Ok(())
                };
            }
            if vision_tower.is_some() {
                return Err(Error::usage(
                    "--vision-tower applies to a checkpoint directory input",
                ));
            }
            let opts = QuantizeOptions {
                input,
                output,
                file_type: ft,
                vision_type: vt,
                quiet,
                allow_nonfinite,
                command_line: argv,
            };
            let s = quantize::quantize_file(&opts)?;
            if json {
                print_json(&s)
            } else {
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
                Ok(())
            }
        }
        Command::Synth {
            size,
            out_dir,
            seed,
            llama_view,
            quiet,
            json,
        } => {
            let s = crate::synth::run(&crate::synth::SynthOptions {
                size,
                out_dir,
                seed,
                llama_view,
                quiet,
            })?;
            if json {
                print_json(&s)
            } else {
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
    crate::fsutil::signals::install();
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

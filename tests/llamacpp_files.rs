//! "Byte-identical to llama-quantize", checked in CI without llama.cpp: our `quantize` of the
//! fixture LLM against the sha256 of llama.cpp's own files for Q8_0, Q4_0, Q4_K_S, Q4_K_M and Q6_K,
//! stored in fixtures/quant/llamacpp_files.json by fixtures/quant/make_file_refs.py
//! (`llama_model_quantize` through llama-cpp-python, default parameters, on the F32 GGUF that our
//! `hf-to-gguf --outtype f32` makes of the fixture).
//!
//! Per type, two routes must give llama.cpp's file: `quantize F32.gguf --type T` and the one-pass
//! `quantize CHECKPOINT --type T`. Compared:
//! - every tensor (name, type, ne, sha256 of its data, in file order): independent of metadata;
//! - the whole file (sha256 and size): only meaningful on the very input llama.cpp quantized, so
//!   the input's sha256 is stored too. When it differs (the converter now writes other metadata,
//!   say), the test fails and names the script that makes new references: a stale reference
//!   must not turn the whole-file check into a silent pass.
use mmfuser_convert::formats::gguf::GgufFile;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mmfuser-convert");
const REFS: &str = "fixtures/quant/llamacpp_files.json";
const REGENERATE: &str = "cargo build --release && \
     ~/oracle-venv/bin/python fixtures/quant/make_file_refs.py (oracle venv: ../shared/oracle/README.md)";
const TYPES: [&str; 5] = ["Q8_0", "Q4_0", "Q4_K_S", "Q4_K_M", "Q6_K"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let mut c = Command::new(BIN);
    c.current_dir(root());
    for a in args {
        c.arg(a);
    }
    let o = c.output().expect("run mmfuser-convert");
    assert!(
        o.status.success(),
        "{c:?} failed ({}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A line for the log even when the test passes: written to stderr directly, which libtest does
/// not capture, so CI's log shows the comparison for every type.
fn show(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// [name, type, ne, sha256 of the data] per tensor in file order, as make_file_refs.py writes it.
fn tensor_hashes(path: &Path) -> Vec<serde_json::Value> {
    let g = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    g.tensors
        .iter()
        .map(|t| serde_json::json!([t.info.name, t.info.ty.name(), t.info.ne, hex(g.data(t))]))
        .collect()
}

/// Names of the tensors whose entries differ (or are missing on one side).
fn tensor_diffs(ours: &[serde_json::Value], theirs: &serde_json::Value) -> Vec<String> {
    let theirs = theirs.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut bad: Vec<String> = ours
        .iter()
        .zip(theirs)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("ours {a} vs llama.cpp {b}"))
        .collect();
    if ours.len() != theirs.len() {
        bad.push(format!(
            "{} tensors, llama.cpp's file has {}",
            ours.len(),
            theirs.len()
        ));
    }
    bad
}

#[test]
fn quantized_files_are_llama_cpp_s_files() {
    let refs: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join(REFS)).unwrap_or_else(|e| panic!("{REFS}: {e}")),
    )
    .unwrap_or_else(|e| panic!("{REFS}: {e}"));
    let tmp = tempfile::Builder::new()
        .prefix("mmfuser-llamacpp-files-")
        .tempdir()
        .unwrap();
    let d = tmp.path();
    // The input exactly as make_file_refs.py makes it.
    bin(&[
        &"hf-to-gguf",
        &"fixtures/tiny-llava-mmfuser",
        &"--vision-tower",
        &"fixtures/tiny-clip",
        &"--outtype",
        &"f32",
        &"-q",
        &"--out-dir",
        &d,
    ]);
    let input = d.join("tiny-llava-mmfuser-F32.gguf");
    let input_bytes = std::fs::read(&input).unwrap();
    let r_in = &refs["input"];
    let input_same = r_in["sha256"].as_str() == Some(hex(&input_bytes).as_str());
    let input_tensors_same = tensor_diffs(&tensor_hashes(&input), &r_in["tensors"]).is_empty();

    let mut failures = vec![];
    show(format!(
        "llamacpp_files: our quantize vs llama.cpp's files ({REFS}); input {}: {} bytes, sha256 {} ({})",
        input.file_name().unwrap().to_string_lossy(),
        input_bytes.len(),
        hex(&input_bytes),
        if input_same {
            "the file llama.cpp quantized"
        } else {
            "NOT the file llama.cpp quantized"
        }
    ));
    show(format!(
        "  {:<7} {:>9} {:>9}  {:<64}  {:<10} tensors",
        "type", "ours B", "llama B", "sha256 (ours)", "whole file"
    ));
    for t in TYPES {
        let r = &refs["types"][t];
        let ours = d.join(format!("ours-{t}.gguf"));
        bin(&[&"quantize", &input, &"--type", &t, &"-o", &ours, &"-q"]);
        let one_pass_dir = d.join(format!("one-pass-{t}"));
        bin(&[
            &"quantize",
            &"fixtures/tiny-llava-mmfuser",
            &"--vision-tower",
            &"fixtures/tiny-clip",
            &"--type",
            &t,
            &"--out-dir",
            &one_pass_dir,
            &"-q",
        ]);
        let one_pass = one_pass_dir.join(format!("tiny-llava-mmfuser-{t}.gguf"));
        let bytes = std::fs::read(&ours).unwrap();
        let sha = hex(&bytes);
        let (their_sha, their_len) = (
            r["sha256"].as_str().unwrap_or("(missing)"),
            r["bytes"].as_u64().unwrap_or(0),
        );
        let file_same = sha == their_sha && bytes.len() as u64 == their_len;
        let tdiff = tensor_diffs(&tensor_hashes(&ours), &r["tensors"]);
        show(format!(
            "  {t:<7} {:>9} {their_len:>9}  {sha}  {:<10} {}",
            bytes.len(),
            match (input_same, file_same) {
                (_, true) => "identical",
                (true, false) => "DIFFERENT",
                (false, false) => "n/a",
            },
            if tdiff.is_empty() {
                format!("all {} identical", tensor_count(&r["tensors"]))
            } else {
                format!("{} DIFFER", tdiff.len())
            }
        ));
        for x in &tdiff {
            failures.push(format!("{t}: tensor {x}"));
        }
        if input_same && !file_same {
            failures.push(format!(
                "{t}: our file ({} bytes, {sha}) is not llama.cpp's ({their_len} bytes, {their_sha})",
                bytes.len()
            ));
        }
        if std::fs::read(&one_pass).unwrap() != bytes {
            failures.push(format!(
                "{t}: the one-pass file from the checkpoint differs from quantizing the F32 GGUF"
            ));
        }
    }
    if !input_same {
        failures.push(format!(
            "the F32 input is not the file the references were made from (sha256 {} now, {} then; \
             its tensor data {}): the whole files cannot be compared. Make new references: {REGENERATE}",
            hex(&input_bytes),
            r_in["sha256"].as_str().unwrap_or("(missing)"),
            if input_tensors_same {
                "is unchanged, so only metadata changed"
            } else {
                "changed too"
            }
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn tensor_count(v: &serde_json::Value) -> usize {
    v.as_array().map_or(0, Vec::len)
}

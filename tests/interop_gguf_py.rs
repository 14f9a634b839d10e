//! llama.cpp's own Python GGUF library (gguf-py, the `gguf` package) reads what hf-to-gguf writes:
//! converts the fixture with --outtype f16, f32 and bf16 and runs tests/interop/check_gguf.py on
//! the outputs (metadata types as llama.cpp asserts them, every tensor equal to its source after
//! the cast and the Q/K permutation, the manifest and --json summary against schemas/).
//!
//! Python: $MMFUSER_PYTHON (default `python3`) with numpy, gguf==0.19.0 and jsonschema (.ci/run
//! installs them). This test FAILS, it does not skip, when one is missing or gguf is another
//! version (check_gguf.py alone, run by hand, leaves out the schema check without jsonschema).
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mmfuser-convert");
const HINT: &str = "run .ci/run (it installs them into the CI venv), or `pip install gguf==0.19.0 numpy jsonschema` and set MMFUSER_PYTHON to that python";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> String {
    std::env::var("MMFUSER_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// Fail loudly when python, numpy, gguf or jsonschema is missing.
fn require_python(py: &str) {
    let probe = "import sys, numpy, gguf, jsonschema, importlib.metadata as m; print(sys.version.split()[0], 'numpy', numpy.__version__, 'gguf', m.version('gguf'))";
    match Command::new(py).args(["-c", probe]).output() {
        Err(e) => panic!("cannot run the python '{py}' (MMFUSER_PYTHON): {e}. The gguf-py interop test needs python with numpy, gguf and jsonschema: {HINT}"),
        Ok(o) if !o.status.success() => panic!(
            "'{py}' (MMFUSER_PYTHON) lacks numpy, gguf or jsonschema:\n{}\nThe gguf-py interop test needs them: {HINT}",
            String::from_utf8_lossy(&o.stderr).trim_end()
        ),
        Ok(o) => {
            let v = String::from_utf8_lossy(&o.stdout);
            eprintln!("using {py}: python {}", v.trim());
            // The references and the checks are written for this version: another one is a
            // different oracle, not the same test.
            assert!(
                v.split_whitespace().collect::<Vec<_>>().windows(2).any(|w| w == ["gguf", "0.19.0"]),
                "'{py}' (MMFUSER_PYTHON) has {}, but this test is pinned to gguf 0.19.0: {HINT}",
                v.trim()
            );
        }
    }
}

/// Convert the fixture into `out` with `--json`, saving the summary as out/summary.json.
fn convert(out: &Path, outtype: &str) {
    let o = Command::new(BIN)
        .args(["hf-to-gguf"])
        .arg(root().join("fixtures/tiny-llava-mmfuser"))
        .arg("--vision-tower")
        .arg(root().join("fixtures/tiny-clip"))
        .arg("--out-dir")
        .arg(out)
        .args(["--outtype", outtype, "-q", "--json"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "conversion --outtype {outtype} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(out.join("summary.json"), &o.stdout).unwrap();
}

fn check(py: &str, dirs: &[PathBuf]) -> (bool, String) {
    let o = Command::new(py)
        .arg(root().join("tests/interop/check_gguf.py"))
        .arg("--checkpoint")
        .arg(root().join("fixtures/tiny-llava-mmfuser"))
        .arg("--tower")
        .arg(root().join("fixtures/tiny-clip"))
        .arg("--schemas")
        .arg(root().join("schemas"))
        .args(dirs)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.code() == Some(2) {
        panic!("check_gguf.py is missing a package: {text}\n{HINT}");
    }
    (o.status.success(), text)
}

#[test]
fn gguf_py_reads_f16_f32_bf16_conversions() {
    let py = python();
    require_python(&py);
    let tmp = tempfile::Builder::new()
        .prefix("mmfuser-ggufpy-")
        .tempdir()
        .unwrap();
    let mut dirs = vec![];
    for t in ["f16", "f32", "bf16"] {
        let d = tmp.path().join(t);
        convert(&d, t);
        dirs.push(d);
    }
    let (ok, text) = check(&py, &dirs);
    eprintln!("{text}");
    assert!(ok, "tests/interop/check_gguf.py found problems:\n{text}");
    assert!(text.contains("all checks passed"), "{text}");
    assert!(
        !text.contains("jsonschema not installed"),
        "the schema checks did not run:\n{text}"
    );
    assert_eq!(
        text.matches("166 tensors equal to their sources").count(),
        3,
        "{text}"
    );
}

/// The checker is not vacuous: one flipped bit in a tensor's data is reported, naming the tensor.
#[test]
fn gguf_py_check_catches_a_changed_value() {
    let py = python();
    require_python(&py);
    let tmp = tempfile::Builder::new()
        .prefix("mmfuser-ggufpy-")
        .tempdir()
        .unwrap();
    let d = tmp.path().join("f16");
    convert(&d, "f16");
    let llm = d.join("tiny-llava-mmfuser-F16.gguf");
    let g = mmfuser_convert::formats::gguf::GgufFile::open(&llm).unwrap();
    let off = g.tensor("blk.1.attn_k.weight").unwrap().offset as usize + 2 * 1000;
    drop(g);
    let mut b = std::fs::read(&llm).unwrap();
    b[off] ^= 0x01;
    std::fs::write(&llm, b).unwrap();
    let (ok, text) = check(&py, &[d]);
    assert!(!ok, "a changed value went unnoticed:\n{text}");
    assert!(
        text.contains("tensor 'blk.1.attn_k.weight'") && text.contains("1 of 32768 values differ"),
        "{text}"
    );
    assert!(text.contains("sha256 differs from the manifest"), "{text}");
}

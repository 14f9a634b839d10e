//! Interop test of the quantizers against llama.cpp's own Python package `gguf` (gguf-py 0.19.0,
//! code we did not write), run live: CI (`.ci/run`) installs it and exports `MMFUSER_PYTHON`.
//! Without that Python (or without gguf/numpy in it) this test FAILS, it does not skip.
//!
//! The fixture LLM is converted to an F32 GGUF by the binary, then quantized with our
//! `quantize --type T` for T in Q8_0, Q4_0, Q4_K_S, Q4_K_M, Q6_K (their mixtures hold Q8_0, Q4_0,
//! Q4_K, Q5_K and Q6_K tensors); the mmproj (F32, and F16 as `hf-to-gguf` writes it by default) is
//! quantized with `--vision-type Q8_0`. For every output tensor our own dequantization
//! (`mmfuser_convert::quant::dequantize`) is written to `<dir>/<tensor>.npy`, and
//! `tests/interop/check_quant.py` checks, with gguf.GGUFReader only: Q8_0/Q4_0 bytes ==
//! gguf.quants.quantize(source f32); gguf.quants.dequantize(our bytes) == our .npy bit for bit for
//! every quantized type; float tensors unchanged; fuser tensors still F16/F32; and (d) every
//! `quant_rel_rms` in the manifest our `quantize` wrote equals the relative RMS error computed
//! from the source values and gguf.quants.dequantize of our bytes.
//!
//! Then the check is shown able to fail: one byte of a Q4_K tensor (only (b) can see it) and one
//! of a Q8_0 tensor (both (a) and (b)) are flipped in scratch copies, and one manifest value is
//! changed by 1e-6 of itself ((d)); the script must exit non-zero naming each tensor and type.
use mmfuser_convert::formats::gguf::GgufFile;
use mmfuser_convert::ground::dtype::GgmlType;
use mmfuser_convert::quant;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mmfuser-convert");
const LLM_TYPES: [&str; 5] = ["Q8_0", "Q4_0", "Q4_K_S", "Q4_K_M", "Q6_K"];
const FIX_HINT: &str =
    "run .ci/run (it installs them into target/ci-venv and exports MMFUSER_PYTHON), or \
                        `pip install gguf==0.19.0 numpy` and set MMFUSER_PYTHON to that python";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python with gguf + numpy, or a panic that says how to get one.
fn python() -> PathBuf {
    let py = match std::env::var_os("MMFUSER_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!("MMFUSER_PYTHON is not set: this interop test needs a Python with gguf==0.19.0 and numpy; {FIX_HINT}"),
    };
    let o = Command::new(&py)
        .args([
            "-c",
            "import gguf, numpy, gguf.quants; from gguf import GGUFReader; \
             import importlib.metadata as m; v = m.version('gguf'); \
             assert v == '0.19.0', f'gguf {v} installed; this test is pinned to gguf 0.19.0'",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run MMFUSER_PYTHON={}: {e}; {FIX_HINT}",
                py.display()
            )
        });
    assert!(
        o.status.success(),
        "MMFUSER_PYTHON={} cannot import gguf/numpy, or has another gguf version:\n{}\n{FIX_HINT}",
        py.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    py
}

fn bin(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let mut c = Command::new(BIN);
    for a in args {
        c.arg(a);
    }
    let o = c.output().expect("run mmfuser-convert");
    assert!(
        o.status.success(),
        "{c:?} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Our dequantization of every tensor of `gguf`, as `<dir>/<name>.npy` (PyTorch order).
fn write_our_dequant(gguf: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let g = GgufFile::open(gguf).unwrap_or_else(|e| panic!("{}: {e}", gguf.display()));
    for t in &g.tensors {
        let n: u64 = t.info.ne.iter().product();
        let v = quant::dequantize(t.info.ty, g.data(t), n as usize)
            .unwrap_or_else(|e| panic!("{}: {}: {e}", gguf.display(), t.info.name));
        let shape: Vec<usize> = t.info.ne.iter().rev().map(|&d| d as usize).collect();
        mmfuser_convert::formats::npy::write_f32(
            dir.join(format!("{}.npy", t.info.name)),
            &shape,
            &v,
        )
        .unwrap();
    }
}

struct Case {
    label: String,
    source: PathBuf,
    quantized: PathBuf,
    npy: PathBuf,
    /// The manifest `quantize` wrote beside `quantized` (checked by (d)), if any.
    manifest: Option<PathBuf>,
}

/// Where `quantize -o X.gguf` writes its manifest: X.manifest.json.
fn manifest_of(q: &Path) -> PathBuf {
    q.with_extension("manifest.json")
}

struct Out {
    ok: bool,
    text: String,
}

fn check(py: &Path, cases: &[&Case], require: &str) -> Out {
    let mut c = Command::new(py);
    c.arg(root().join("tests/interop/check_quant.py"));
    c.args(["--float-prefix", "mm.fuser.", "--require-types", require]);
    for k in cases {
        c.arg("--case")
            .arg(&k.label)
            .arg(&k.source)
            .arg(&k.quantized)
            .arg(&k.npy);
        if let Some(m) = &k.manifest {
            c.arg("--manifest").arg(&k.label).arg(m);
        }
    }
    let o = c.output().expect("run check_quant.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Out {
        ok: o.status.success(),
        text,
    }
}

/// Copy `src` to `dst` with one byte of tensor `ty`'s first block XOR-ed: byte `at` of block 0 of
/// the first tensor of that type. Returns the tensor's name.
fn flip_one_byte(src: &Path, dst: &Path, ty: GgmlType, at: usize, mask: u8) -> String {
    let g = GgufFile::open(src).unwrap();
    let t = g
        .tensors
        .iter()
        .find(|t| t.info.ty == ty)
        .unwrap_or_else(|| panic!("no {ty} tensor in {}", src.display()));
    let (name, off) = (t.info.name.clone(), t.offset as usize + at);
    drop(g);
    let mut b = std::fs::read(src).unwrap();
    b[off] ^= mask;
    std::fs::write(dst, b).unwrap();
    name
}

#[test]
fn quantizers_match_gguf_py() {
    let py = python();
    let tmp = tempfile::Builder::new()
        .prefix("mmfuser-quant-py-")
        .tempdir()
        .unwrap();
    let d = tmp.path();
    let (f32_dir, f16_dir) = (d.join("f32"), d.join("f16"));
    for (dir, outtype) in [(&f32_dir, "f32"), (&f16_dir, "f16")] {
        bin(&[
            &"hf-to-gguf",
            &root().join("fixtures/tiny-llava-mmfuser"),
            &"--vision-tower",
            &root().join("fixtures/tiny-clip"),
            &"--outtype",
            &outtype,
            &"--out-dir",
            dir,
            &"-q",
        ]);
    }
    let llm = f32_dir.join("tiny-llava-mmfuser-F32.gguf");

    let mut cases = vec![];
    for t in LLM_TYPES {
        let q = d.join(format!("llm-{t}.gguf"));
        bin(&[&"quantize", &llm, &"--type", &t, &"-o", &q, &"-q"]);
        cases.push(Case {
            label: format!("LLM --type {t}"),
            source: llm.clone(),
            manifest: Some(manifest_of(&q)),
            quantized: q,
            npy: d.join(format!("npy-llm-{t}")),
        });
    }
    for (dir, tag) in [(&f32_dir, "F32"), (&f16_dir, "F16")] {
        let src = dir.join(format!("mmproj-tiny-llava-mmfuser-{tag}.gguf"));
        let q = d.join(format!("mmproj-from-{tag}-Q8_0.gguf"));
        bin(&[
            &"quantize",
            &src,
            &"--vision-type",
            &"Q8_0",
            &"-o",
            &q,
            &"-q",
        ]);
        cases.push(Case {
            label: format!("mmproj ({tag}) --vision-type Q8_0"),
            source: src,
            manifest: Some(manifest_of(&q)),
            quantized: q,
            npy: d.join(format!("npy-mmproj-{tag}")),
        });
    }
    for c in &cases {
        write_our_dequant(&c.quantized, &c.npy);
    }

    // 1. Everything agrees with gguf-py.
    let all: Vec<&Case> = cases.iter().collect();
    let out = check(&py, &all, "Q8_0,Q4_0,Q4_K,Q5_K,Q6_K");
    println!("{}", out.text);
    assert!(
        out.ok,
        "check_quant.py found mismatches against gguf-py:\n{}",
        out.text
    );
    assert!(out.text.contains("\nOK"), "{}", out.text);

    // 2. The check can fail: one flipped byte in a Q4_K tensor (a quant byte of block 0, past
    // d, dmin and the 12 scale bytes) and one in a Q8_0 tensor (a quant of block 0, past d).
    let k = cases.iter().find(|c| c.label.ends_with("Q4_K_M")).unwrap();
    let bad_k = d.join("corrupt-Q4_K_M.gguf");
    let k_name = flip_one_byte(&k.quantized, &bad_k, GgmlType::Q4K, 2 + 2 + 12 + 3, 0xff);
    let e = cases
        .iter()
        .find(|c| c.label.ends_with("Q8_0") && c.label.starts_with("LLM"))
        .unwrap();
    let bad_e = d.join("corrupt-Q8_0.gguf");
    let e_name = flip_one_byte(&e.quantized, &bad_e, GgmlType::Q8_0, 2 + 5, 0x01);
    let ck = Case {
        label: "corrupt Q4_K_M".into(),
        source: k.source.clone(),
        quantized: bad_k,
        npy: k.npy.clone(),
        manifest: None,
    };
    let ce = Case {
        label: "corrupt Q8_0".into(),
        source: e.source.clone(),
        quantized: bad_e,
        npy: e.npy.clone(),
        manifest: None,
    };
    // The unchanged Q4_K_M file with one quant_rel_rms of its manifest 1e-6 (relative) off.
    let m_path = k.manifest.clone().expect("the Q4_K_M case has a manifest");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&m_path).unwrap()).unwrap();
    let rec = m["tensors"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["ggml_type"] == "Q4_K")
        .expect("a Q4_K record in the Q4_K_M manifest");
    let m_name = rec["gguf"].as_str().unwrap().to_string();
    let v = rec["quant_rel_rms"].as_f64().expect("a quant_rel_rms");
    rec["quant_rel_rms"] = serde_json::json!(v * (1.0 + 1e-6));
    let bad_m = d.join("corrupt-Q4_K_M.manifest.json");
    std::fs::write(&bad_m, serde_json::to_vec(&m).unwrap()).unwrap();
    let cm = Case {
        label: "corrupt manifest".into(),
        source: k.source.clone(),
        quantized: k.quantized.clone(),
        npy: k.npy.clone(),
        manifest: Some(bad_m),
    };
    let out = check(&py, &[&ck, &ce, &cm], "");
    println!("{}", out.text);
    assert!(
        !out.ok,
        "check_quant.py missed a flipped byte:\n{}",
        out.text
    );
    for needle in [
        format!("[corrupt Q4_K_M] {k_name} (Q4_K): "),
        format!("[corrupt Q8_0] {e_name} (Q8_0): 1 bytes differ from gguf.quants.quantize"),
        format!("[corrupt Q8_0] {e_name} (Q8_0): 1 values of gguf.quants.dequantize differ"),
        format!("[corrupt manifest] {m_name} (Q4_K): manifest quant_rel_rms "),
    ] {
        assert!(
            out.text.contains(&needle),
            "expected {needle:?} in:\n{}",
            out.text
        );
    }
    let n_errors = out.text.lines().filter(|l| l.starts_with("  [")).count();
    assert_eq!(
        n_errors, 4,
        "exactly the four planted mismatches:\n{}",
        out.text
    );
}

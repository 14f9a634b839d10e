//! verify end to end: passes good artefacts at default tolerance, fails sabotaged ones, and the
//! source-side forward matches the fixture's float64 reference (transformers + PyTorch).
#[path = "common/sabotage.rs"]
mod sabotage;
use mmfuser_convert::gguf::GgufFile;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mmfuser-convert");
const CK: &str = "fixtures/tiny-llava-mmfuser";
const TOWER: &str = "fixtures/tiny-clip";

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn convert(dir: &Path) -> (PathBuf, PathBuf) {
    let d = dir.to_str().unwrap();
    let (rc, _, err) = run(&[
        "hf-to-gguf",
        CK,
        "--vision-tower",
        TOWER,
        "--out-dir",
        d,
        "-q",
    ]);
    assert_eq!(rc, 0, "{err}");
    (
        dir.join("tiny-llava-mmfuser-F16.gguf"),
        dir.join("mmproj-tiny-llava-mmfuser-F16.gguf"),
    )
}

fn verify(llm: &Path, mmproj: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let mut args = vec![
        "verify",
        CK,
        "--vision-tower",
        TOWER,
        "--gguf",
        llm.to_str().unwrap(),
        "--mmproj",
        mmproj.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let (rc, out, err) = run(&args);
    let v = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    (rc, v, err)
}

#[test]
fn passes_good_artefacts_at_default_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    for (ty, want_kl_max) in [("F16", 1e-5), ("Q8_0", 1e-3), ("Q4_K_M", 0.15)] {
        let l = if ty == "F16" {
            llm.clone()
        } else {
            let out = dir.path().join(format!("q-{ty}.gguf"));
            let (rc, _, err) = run(&[
                "quantize",
                llm.to_str().unwrap(),
                "--type",
                ty,
                "-o",
                out.to_str().unwrap(),
                "-q",
            ]);
            assert_eq!(rc, 0, "{err}");
            out
        };
        let (rc, r, err) = verify(&l, &mmproj, &[]);
        assert_eq!(rc, 0, "{ty}: {err} {r}");
        assert_eq!(r["passed"], true);
        assert_eq!(r["integrity"][0]["status"], "ok", "{r}");
        let kl = r["logits"]["kl_mean"].as_f64().unwrap();
        assert!(kl <= want_kl_max, "{ty}: KL {kl}");
        // The mmproj is the same F16 file each time: image embeddings exactly equal.
        assert_eq!(r["image_embeddings"]["max_abs_diff"].as_f64().unwrap(), 0.0);
    }
}

#[test]
fn fails_sabotaged_artefacts() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    for (what, l, m) in sabotage::sabotaged_artefacts(dir.path(), &llm, &mmproj) {
        let (rc, r, err) = verify(&l, &m, &[]);
        assert_eq!(rc, 1, "{what} must fail: {err} {r}");
        assert_eq!(r["passed"], false, "{what}");
        let kl = r["logits"]["kl_mean"].as_f64().unwrap();
        assert!(kl > 1e-5, "{what}: KL {kl}");
        if what == "zeroed gamma2" {
            assert!(
                r["image_embeddings"]["rel_rms"].as_f64().unwrap() > 1e-3,
                "fuser fault shows in the image embeddings"
            );
        }
    }
}

#[test]
fn flipped_bit_is_caught_by_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let mut bytes = std::fs::read(&llm).unwrap();
    let n = bytes.len();
    bytes[n - 1000] ^= 0x01;
    std::fs::write(&llm, &bytes).unwrap();
    let (rc, r, _) = verify(&llm, &mmproj, &[]);
    assert_eq!(rc, 1);
    assert_eq!(r["integrity"][0]["status"], "mismatch", "{r}");
}

#[test]
fn source_forward_matches_transformers_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let dump = dir.path().join("dump");
    let (rc, _, err) = verify(
        &llm,
        &mmproj,
        &[
            "--pixel-values",
            "fixtures/reference/pixel_values.npy",
            "--input-ids",
            "fixtures/reference/input_ids.json",
            "--dump-logits",
            dump.to_str().unwrap(),
        ],
    );
    assert_eq!(rc, 0, "{err}");
    let got = mmfuser_convert::npy::read(dump.join("source.npy"))
        .unwrap()
        .to_f64()
        .unwrap();
    let want = mmfuser_convert::npy::read("fixtures/reference/logits.npy")
        .unwrap()
        .to_f64()
        .unwrap();
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0, 0.0);
    for (a, b) in got.iter().zip(&want) {
        num += (a - b) * (a - b);
        den += b * b;
    }
    let rel = (num / den).sqrt();
    assert!(
        rel < 1e-4,
        "source logits vs transformers float64: relative RMS {rel}"
    );
}

#[test]
fn usage_errors_exit_2() {
    // An input error: exit 1 (as in every verb), reported as what it is, naming the file.
    let (rc, _, err) = run(&[
        "verify",
        CK,
        "--gguf",
        "/nonexistent.gguf",
        "--mmproj",
        "/nonexistent2.gguf",
    ]);
    assert_eq!(rc, 1);
    assert!(err.contains("/nonexistent"), "{err}");
    assert!(
        !err.contains("usage:"),
        "an input error shown as a usage error: {err}"
    );
    let (rc, _, err) = run(&["verify", CK]);
    assert_eq!(rc, 2);
    assert!(err.contains("usage") || err.contains("Usage"), "{err}");
}

#[test]
fn json_report_validates_against_schema() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let mut args = vec![
        "verify",
        CK,
        "--vision-tower",
        TOWER,
        "--gguf",
        llm.to_str().unwrap(),
        "--mmproj",
        mmproj.to_str().unwrap(),
        "--json",
    ];
    args.push("--prompt");
    args.push("What is in the picture?");
    let (rc, out, err) = run(&args);
    assert_eq!(rc, 0, "{err}");
    let report = dir.path().join("report.json");
    std::fs::write(&report, out).unwrap();
    let py = std::env::var("MMFUSER_PYTHON")
        .expect("MMFUSER_PYTHON must point at a Python with jsonschema (run .ci/run)");
    let o = Command::new(py)
        .args(["-c", "import json,sys,jsonschema; jsonschema.validate(json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))); print('valid')"])
        .arg(&report)
        .arg("schemas/verify-report.schema.json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `quantize LLM --type TY -o DIR/q-TY.gguf` (writes q-TY.manifest.json beside it).
fn quantize_to(llm: &Path, dir: &Path, ty: &str) -> PathBuf {
    let out = dir.join(format!("q-{ty}.gguf"));
    let (rc, _, err) = run(&[
        "quantize",
        llm.to_str().unwrap(),
        "--type",
        ty,
        "-o",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(rc, 0, "{err}");
    out
}

/// Flip one bit in the middle of every tensor's data (and one in the metadata) of the mmproj, the
/// F16 LLM and a Q4_K_M LLM, one at a time: the manifest's sha256 catches each one.
#[test]
fn flipped_bit_in_any_tensor_is_caught_by_the_manifest() {
    use mmfuser_convert::verify::check_integrity;
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let q4 = quantize_to(&llm, dir.path(), "Q4_K_M");
    let mut n = 0;
    for path in [&mmproj, &llm, &q4] {
        assert_eq!(
            check_integrity(path).unwrap().status,
            "ok",
            "{}",
            path.display()
        );
        let g = GgufFile::open(path).unwrap();
        let mut spots: Vec<(String, usize)> = g
            .tensors
            .iter()
            .map(|t| (t.info.name.clone(), (t.offset + t.n_bytes / 2) as usize))
            .collect();
        spots.push(("metadata".into(), 40));
        drop(g);
        let orig = std::fs::read(path).unwrap();
        for (i, (what, at)) in spots.iter().enumerate() {
            let mut b = orig.clone();
            b[*at] ^= 1 << (i % 8);
            std::fs::write(path, &b).unwrap();
            let r = check_integrity(path).unwrap();
            assert_eq!(r.status, "mismatch", "{}: bit in {what}", path.display());
            n += 1;
        }
        std::fs::write(path, &orig).unwrap();
        assert_eq!(check_integrity(path).unwrap().status, "ok");
    }
    assert!(n > 180, "{n}");

    // End to end: verify fails (exit 1) naming the mismatch, for the mmproj and for a quantized LLM.
    for (l, m, which) in [(&q4, &mmproj, 1usize), (&q4, &mmproj, 0)] {
        let victim = if which == 0 { l } else { m };
        let orig = std::fs::read(victim).unwrap();
        let g = GgufFile::open(victim).unwrap();
        let t = &g.tensors[g.tensors.len() / 2];
        let at = (t.offset + t.n_bytes / 3) as usize;
        drop(g);
        let mut b = orig.clone();
        b[at] ^= 0x10;
        std::fs::write(victim, &b).unwrap();
        let (rc, r, err) = verify(l, m, &[]);
        assert_eq!(rc, 1, "{err} {r}");
        assert_eq!(r["integrity"][which]["status"], "mismatch", "{r}");
        assert_eq!(r["integrity"][1 - which]["status"], "ok", "{r}");
        assert!(
            r["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x.as_str().unwrap().contains("sha256")),
            "{r}"
        );
        std::fs::write(victim, &orig).unwrap();
    }
}

/// With the manifests removed, a perturbed tensor (one tensor of a Q4_K_M LLM, one CLIP matrix of
/// the mmproj) is still caught, through the logits and the image embeddings.
#[test]
fn perturbed_tensor_without_manifest_is_caught_by_the_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let q4 = quantize_to(&llm, dir.path(), "Q4_K_M");
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".manifest.json") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let (rc, r, err) = verify(&q4, &mmproj, &[]);
    assert_eq!(rc, 0, "unperturbed Q4_K_M must pass: {err} {r}");
    assert_eq!(r["integrity"][0]["status"], "no-manifest");
    let base_kl = r["logits"]["kl_mean"].as_f64().unwrap();

    // The Q4_K_M LLM: every block of one tensor gets its scale's sign bit flipped (d is the
    // first f16 of each 144-byte Q4_K block), i.e. the tensor is negated.
    let pert = dir.path().join("q4-perturbed.gguf");
    sabotage::sabotage(&q4, &pert, &|n| n.to_string(), &|name, g, data| {
        if name == "blk.0.ffn_up.weight" {
            let t = g.tensor(name).unwrap();
            assert_eq!(t.info.ty.name(), "Q4_K");
            for blk in data.chunks_mut(144) {
                blk[1] ^= 0x80;
                blk[3] ^= 0x80;
            }
        }
    });
    let (rc, r, err) = verify(&pert, &mmproj, &[]);
    assert_eq!(rc, 1, "{err} {r}");
    assert_eq!(r["integrity"][0]["status"], "no-manifest");
    let kl = r["logits"]["kl_mean"].as_f64().unwrap();
    assert!(
        kl > r["tolerance_kl_mean"].as_f64().unwrap() && kl > 2.0 * base_kl,
        "KL {kl} vs {base_kl}"
    );

    // The mmproj: one CLIP attention matrix negated; the image embeddings show it. (Checked with
    // the F16 LLM: verify's pass/fail is the logits' KL alone, and with a Q4_K_M LLM this fault
    // measures KL 6.6e-2, inside Q4_K_M's 0.15, although the image embeddings are 16% off.)
    let pm = dir.path().join("mmproj-perturbed.gguf");
    sabotage::sabotage(&mmproj, &pm, &|n| n.to_string(), &|name, _, data| {
        if name == "v.blk.2.attn_v.weight" {
            for i in (1..data.len()).step_by(2) {
                data[i] ^= 0x80;
            }
        }
    });
    let (rc, r, err) = verify(&llm, &pm, &[]);
    assert_eq!(rc, 1, "{err} {r}");
    assert_eq!(r["integrity"][1]["status"], "no-manifest");
    assert!(
        r["image_embeddings"]["rel_rms"].as_f64().unwrap() > 1e-2,
        "{r}"
    );
}

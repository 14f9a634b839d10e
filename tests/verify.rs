//! verify end to end: passes good artefacts at default tolerance, fails sabotaged ones, and the
//! source-side forward matches the fixture's float64 reference (transformers + PyTorch).
use mmfuser_convert::gguf::{GgufFile, GgufWriter};
use mmfuser_convert::recipe::permute_rows;
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
    let (rc, _, err) = run(&["hf-to-gguf", CK, "--vision-tower", TOWER, "-o", d, "-q"]);
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

/// Rewrite a GGUF with `edit(name, bytes)` applied to tensor data (and optional renames).
fn sabotage(
    src: &Path,
    dst: &Path,
    rename: &dyn Fn(&str) -> String,
    edit: &dyn Fn(&str, &GgufFile, &mut Vec<u8>),
) {
    let g = GgufFile::open(src).unwrap();
    let infos: Vec<_> = g
        .tensors
        .iter()
        .map(|t| {
            let mut i = t.info.clone();
            i.name = rename(&i.name);
            i
        })
        .collect();
    let mut w = GgufWriter::create(dst, &g.metadata, infos.clone()).unwrap();
    for (t, i) in g.tensors.iter().zip(&infos) {
        let mut data = g.data(t).to_vec();
        edit(&t.info.name, &g, &mut data);
        w.write_tensor(&i.name, &data).unwrap();
    }
    w.finish().unwrap();
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
    let same = |n: &str| n.to_string();
    let none = |_: &str, _: &GgufFile, _: &mut Vec<u8>| {};
    // 1. Q/K left unpermuted: undo the permutation (applying it twice is not the identity, applying the
    //    inverse is; the inverse of "rows 2i+a <- a*half+i" is easiest as: permute again until back).
    let unperm = dir.path().join("unperm.gguf");
    sabotage(&llm, &unperm, &same, &|name, g, data| {
        let heads = if name.ends_with("attn_q.weight") {
            4
        } else if name.ends_with("attn_k.weight") {
            2
        } else {
            return;
        };
        let t = g.tensor(name).unwrap();
        let (cols, rows) = (t.info.ne[0] as usize, t.info.ne[1] as usize);
        // permute_rows has order log2(head_dim) on each head; apply it until it cycles back to the HF layout.
        let orig = data.clone();
        let mut cur = permute_rows(&orig, rows, cols, heads, 2);
        let mut prev = orig.clone();
        while cur != orig {
            prev = cur.clone();
            cur = permute_rows(&cur, rows, cols, heads, 2);
        }
        *data = prev;
    });
    // 2. Two layers swapped.
    let swapped = dir.path().join("swapped.gguf");
    sabotage(
        &llm,
        &swapped,
        &|n: &str| {
            if let Some(r) = n.strip_prefix("blk.0.") {
                format!("blk.1.{r}")
            } else if let Some(r) = n.strip_prefix("blk.1.") {
                format!("blk.0.{r}")
            } else {
                n.to_string()
            }
        },
        &none,
    );
    // 3. A fuser gamma zeroed.
    let gamma = dir.path().join("mmproj-gamma.gguf");
    sabotage(&mmproj, &gamma, &same, &|name, _, data| {
        if name == "mm.fuser.gamma2" {
            data.iter_mut().for_each(|b| *b = 0);
        }
    });
    // 4. One tensor's bytes perturbed (a few f16 values of one matrix).
    let perturbed = dir.path().join("perturbed.gguf");
    sabotage(&llm, &perturbed, &same, &|name, _, data| {
        if name == "blk.1.ffn_down.weight" {
            for i in (0..data.len()).step_by(2).take(2000) {
                data[i + 1] ^= 0x04;
            }
        }
    });
    for (what, l, m) in [
        ("unpermuted Q/K", &unperm, &mmproj),
        ("swapped layers", &swapped, &mmproj),
        ("zeroed gamma2", &llm, &gamma),
        ("perturbed tensor", &perturbed, &mmproj),
    ] {
        let (rc, r, err) = verify(l, m, &[]);
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
    let (rc, _, _) = run(&[
        "verify",
        CK,
        "--gguf",
        "/nonexistent.gguf",
        "--mmproj",
        "/nonexistent2.gguf",
    ]);
    assert_eq!(rc, 2);
    let (rc, _, _) = run(&["verify", CK]);
    assert_eq!(rc, 2);
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

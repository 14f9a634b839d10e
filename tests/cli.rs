//! The command-line contract shared by every verb: `-o/--output FILE` and `--out-dir DIR` (an
//! error for what a verb cannot honour), `-q` (errors only), `--json` (one document alone on
//! stdout, valid against its schema in schemas/, checked with the jsonschema package), and one
//! exit-code rule (0 success, 1 bad input, 2 usage error, 3 verify: a failed check).
use crate::common::*;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

fn os(a: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    a.iter().map(|x| x.as_ref().to_os_string()).collect()
}

/// Validate `doc` against schemas/`schema` with the jsonschema package.
fn assert_valid(doc: &serde_json::Value, schema: &str, dir: &Path) {
    let f = dir.join(format!("{schema}.doc.json"));
    std::fs::write(&f, serde_json::to_vec(doc).unwrap()).unwrap();
    let py = std::env::var("MMFUSER_PYTHON")
        .expect("MMFUSER_PYTHON must point at a Python with jsonschema (run .ci/run)");
    let o = Command::new(py)
        .args(["-c", "import json,sys,jsonschema; jsonschema.validate(json.load(open(sys.argv[1])), json.load(open(sys.argv[2])))"])
        .arg(&f)
        .arg(root().join("schemas").join(schema))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{schema}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// stdout must be exactly one JSON document.
fn json_doc(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "{}: stdout is not one JSON document ({e}):\n{}",
            r.what, r.stdout
        )
    })
}

/// The fixture converted to F16 in `out`: (LLM, mmproj).
fn f16(out: &Path) -> (PathBuf, PathBuf) {
    convert(&ckpt(), Some(&tower()), out, &[]).ok();
    (
        out.join("tiny-llava-mmfuser-F16.gguf"),
        out.join("mmproj-tiny-llava-mmfuser-F16.gguf"),
    )
}

fn verify_args(llm: &Path, mmproj: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut a = os(&[
        &"verify",
        &ckpt(),
        &"--vision-tower",
        &tower(),
        &"--gguf",
        &llm,
        &"--mmproj",
        &mmproj,
        &"--device",
        &"cpu",
    ]);
    a.extend(extra.iter().map(OsString::from));
    a
}

#[test]
fn json_alone_on_stdout_for_every_verb() {
    let tmp = tempdir();
    let t = tmp.path();
    let r = convert(&ckpt(), Some(&tower()), &t.join("a"), &["--json"]).ok();
    assert_valid(&json_doc(&r), "hf-to-gguf-summary.schema.json", t);
    let llm = t.join("a/tiny-llava-mmfuser-F16.gguf");
    let mmproj = t.join("a/mmproj-tiny-llava-mmfuser-F16.gguf");

    let r = run(os(&[&"quantize", &llm, &"--bits", &"8", &"--json"]), t).ok();
    let q = json_doc(&r);
    assert_valid(&q, "quantize-summary.schema.json", t);
    assert_eq!(q["file_type"], "Q8_0");

    let r = run(
        os(&[
            &"quantize",
            &ckpt(),
            &"--vision-tower",
            &tower(),
            &"--bits",
            &"8",
            &"--out-dir",
            &t.join("c"),
            &"--json",
        ]),
        t,
    )
    .ok();
    assert_valid(&json_doc(&r), "hf-to-gguf-summary.schema.json", t);

    let r = run(verify_args(&llm, &mmproj, &["--json"]), t).ok();
    assert_valid(&json_doc(&r), "verify-report.schema.json", t);

    let r = run(
        os(&[
            &"synth",
            &"--size",
            &"tiny",
            &"--out-dir",
            &t.join("s"),
            &"--json",
        ]),
        t,
    )
    .ok();
    assert_valid(&json_doc(&r), "synth-summary.schema.json", t);

    let r = run(os(&[&"demo", &"--out-dir", &t.join("d"), &"--json"]), t).ok();
    let d = json_doc(&r);
    assert_valid(&d, "demo-summary.schema.json", t);
    assert_valid(&d["convert"], "hf-to-gguf-summary.schema.json", t);
    assert_valid(&d["quantize"], "quantize-summary.schema.json", t);
    assert_valid(&d["verify"], "verify-report.schema.json", t);
    assert_eq!(d["verify"]["passed"], true);
}

#[test]
fn quiet_prints_errors_only() {
    let tmp = tempdir();
    let t = tmp.path();
    let (llm, mmproj) = f16(&t.join("a"));
    let runs = [
        os(&[
            &"hf-to-gguf",
            &ckpt(),
            &"--vision-tower",
            &tower(),
            &"--out-dir",
            &t.join("b"),
            &"-q",
        ]),
        os(&[&"quantize", &llm, &"--bits", &"8", &"-q"]),
        os(&[
            &"quantize",
            &ckpt(),
            &"--vision-tower",
            &tower(),
            &"--bits",
            &"8",
            &"--out-dir",
            &t.join("c"),
            &"-q",
        ]),
        verify_args(&llm, &mmproj, &["-q"]),
        os(&[&"synth", &"--size", &"tiny", &t.join("s"), &"-q"]),
        os(&[&"demo", &"--out-dir", &t.join("d"), &"-q"]),
    ];
    for a in runs {
        let r = run(a, t).ok();
        assert_eq!(
            (r.stdout.as_str(), r.stderr.as_str()),
            ("", ""),
            "{}",
            r.what
        );
    }
    // an error still says what is wrong
    let r = run(
        os(&[&"quantize", &t.join("missing.gguf"), &"--bits", &"8", &"-q"]),
        t,
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stdout.is_empty() && r.stderr.contains("missing.gguf"),
        "{}",
        r.stderr
    );
}

#[test]
fn output_options_are_one_set() {
    let tmp = tempdir();
    let t = tmp.path();
    let (llm, _) = f16(&t.join("a"));
    let before = dir_names(&t.join("a"));
    // quantize IN.gguf --out-dir D writes into D, not beside the input
    let d = t.join("d");
    run(
        os(&[&"quantize", &llm, &"--bits", &"8", &"--out-dir", &d, &"-q"]),
        t,
    )
    .ok();
    assert_eq!(
        dir_names(&d),
        [
            "tiny-llava-mmfuser-Q8_0.gguf",
            "tiny-llava-mmfuser-Q8_0.manifest.json"
        ]
    );
    assert_eq!(
        dir_names(&t.join("a")),
        before,
        "nothing written beside the input"
    );
    // -o FILE names the file itself
    let f = t.join("e/x.gguf");
    std::fs::create_dir_all(t.join("e")).unwrap();
    run(
        os(&[&"quantize", &llm, &"--bits", &"8", &"-o", &f, &"-q"]),
        t,
    )
    .ok();
    assert!(f.is_file());
    // what cannot be honoured is a usage error, and nothing is written
    let out = t.join("never");
    let cases: Vec<(Vec<OsString>, &str)> = vec![
        (
            os(&[
                &"quantize",
                &llm,
                &"--bits",
                &"8",
                &"-o",
                &out.join("y.gguf"),
                &"--out-dir",
                &out,
            ]),
            "not both",
        ),
        (
            os(&[
                &"hf-to-gguf",
                &ckpt(),
                &"--vision-tower",
                &tower(),
                &"-o",
                &out,
            ]),
            "--out-dir",
        ),
        (
            os(&[
                &"quantize",
                &ckpt(),
                &"--vision-tower",
                &tower(),
                &"--bits",
                &"8",
                &"-o",
                &out.join("y.gguf"),
            ]),
            "--out-dir",
        ),
        (os(&[&"demo", &"-o", &out]), "--out-dir"),
        (
            os(&[&"synth", &"--size", &"tiny", &out, &"--out-dir", &out]),
            "once",
        ),
    ];
    for (a, needle) in cases {
        let r = run(a, t);
        assert_rejected(&r, 2, &out, &[], &[needle]);
        assert!(!out.exists(), "{}", r.what);
    }
}

/// One rule for every verb: 0 success, 1 bad input, 2 usage error, 3 a check that ran and failed
/// (verify), so that a failed artefact is never mistaken for a verify that could not run.
#[test]
fn exit_codes_follow_one_rule() {
    let tmp = tempdir();
    let t = tmp.path();
    let (llm, mmproj) = f16(&t.join("a"));
    let missing = t.join("missing");
    let out = t.join("o");
    let one = |a: Vec<OsString>, code: i32| {
        let r = run(a, t);
        assert_eq!(r.code, code, "{}\n{}", r.what, r.stderr);
        assert!(
            r.stderr.contains("error") && !r.stderr.contains("panicked"),
            "{}",
            r.stderr
        );
    };
    // a missing input: 1, in every verb
    one(os(&[&"hf-to-gguf", &missing, &"--out-dir", &out]), 1);
    one(os(&[&"quantize", &missing, &"--bits", &"8"]), 1);
    one(verify_args(&missing, &mmproj, &[]), 1);
    one(
        os(&[
            &"verify",
            &missing,
            &"--gguf",
            &llm,
            &"--mmproj",
            &mmproj,
            &"--device",
            &"cpu",
        ]),
        1,
    );
    // usage errors: 2, in every verb
    one(os(&[&"hf-to-gguf", &ckpt(), &"--outtype", &"q9"]), 2);
    one(os(&[&"quantize", &llm, &"--bits", &"5"]), 2);
    one(os(&[&"quantize", &llm]), 2);
    one(os(&[&"quantize", &mmproj, &"--bits", &"4"]), 2); // an mmproj takes --vision-type
    one(
        verify_args(&llm, &mmproj, &["--prompt", "x", "--input-ids", "ids.json"]),
        2,
    );
    one(os(&[&"synth", &"--size", &"tiny"]), 2);
    one(os(&[&"demo", &"--no-such-flag"]), 2);
    // an unknown instruction set is refused by name, not run as the default
    let r = run_with(
        verify_args(&llm, &mmproj, &["-q"]),
        t,
        &[("MMFUSER_CPU_ISA", "avx-2")],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("MMFUSER_CPU_ISA=avx-2") && r.stderr.contains("scalar, avx2 or avx512"),
        "{}",
        r.stderr
    );
    // a check that ran and failed: 3
    let q = t.join("q.gguf");
    run(
        os(&[&"quantize", &llm, &"--bits", &"4", &"-o", &q, &"-q"]),
        t,
    )
    .ok();
    one(verify_args(&q, &mmproj, &["--tolerance", "1e-12", "-q"]), 3);
    assert!(!out.exists());
    // and the help says so (verify's once said "1 fail, 2 usage or input error")
    let help = run(os(&[&"verify", &"--help"]), t);
    assert_eq!(help.code, 0);
    for said in [
        "0 pass",
        "3 the artefact failed a check",
        "1 bad input",
        "2 usage error",
    ] {
        assert!(help.stdout.contains(said), "{said}: {}", help.stdout);
    }
}

//! Command-line arguments: usage errors (exit 2) on the parsing commands, and odd but valid
//! arguments (non-UTF-8 paths).
use super::*;

fn non_utf8(prefix: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    OsString::from_vec([prefix.as_bytes(), b"\xff"].concat())
}

/// A command line that must be refused as a usage error: exit 2, no panic, every needle on
/// stderr, nothing written.
struct UsageCase {
    name: &'static str,
    args: Vec<OsString>,
    needles: &'static [&'static str],
}

#[test]
fn usage_errors() {
    let a = artefacts();
    let tmp = tempdir();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let llm = a.llm.clone().into_os_string();
    let usage =
        |name: &'static str, args: Vec<OsString>, needles: &'static [&'static str]| UsageCase {
            name,
            args,
            needles,
        };
    let list = vec![
        usage(
            "quantize without a type",
            args([
                "quantize".into(),
                llm.clone(),
                "-o".into(),
                out.join("x.gguf").into_os_string(),
            ]),
            &["--bits"],
        ),
        usage(
            "quantize --bits 3",
            args(["quantize".into(), llm.clone(), "--bits".into(), "3".into()]),
            &["3"],
        ),
        usage(
            "quantize --type Q9_9",
            args([
                "quantize".into(),
                llm.clone(),
                "--type".into(),
                "Q9_9".into(),
            ]),
            &["Q9_9"],
        ),
        usage(
            "quantize --vision-type on an LLM",
            args([
                "quantize".into(),
                llm.clone(),
                "--vision-type".into(),
                "Q8_0".into(),
                "-o".into(),
                out.join("x.gguf").into_os_string(),
            ]),
            &["--vision-type"],
        ),
        usage(
            "quantize onto its own input",
            args([
                "quantize".into(),
                llm.clone(),
                "--type".into(),
                "Q8_0".into(),
                "-o".into(),
                llm.clone(),
            ]),
            &["overwrite"],
        ),
        usage(
            "verify without --mmproj",
            args([
                "verify".into(),
                common::ckpt().into_os_string(),
                "--gguf".into(),
                llm.clone(),
            ]),
            &["--mmproj"],
        ),
        usage(
            "hf-to-gguf --outtype q9",
            args([
                "hf-to-gguf".into(),
                common::ckpt().into_os_string(),
                "--out-dir".into(),
                out.clone().into_os_string(),
                "--outtype".into(),
                "q9".into(),
            ]),
            &["q9"],
        ),
    ];
    let mut cases = Cases::default();
    for c in list {
        let r = run(c.args, tmp.path());
        cases.n += 1;
        if r.code != 2
            || r.stderr.contains("panicked")
            || !c.needles.iter().all(|n| r.stderr.contains(n))
            || !dir_names(&out).is_empty()
        {
            cases
                .failed
                .push(format!("{}: exit {} stderr {}", c.name, r.code, r.stderr));
        }
    }
    assert_eq!(dir_names(&a.dir).len(), 3, "{:?}", dir_names(&a.dir));
    cases.finish("usage errors");
}

#[test]
fn issue16_cases() {
    run_rows("issue 16, arguments", issue16_rows());
}

fn issue16_rows() -> Vec<Row> {
    use super::probe::grey_png;
    vec![
        // 2 and 13. Arguments.
        Row {
            case: "non-UTF-8 --prompt is a usage error / verify",
            cmd: |e| verify16(e, vec!["--prompt".into(), non_utf8("What")]),
            env: &[],
            code: 2,
            needles: &["UTF-8"],
            keep: &[],
        },
        Row {
            case: "non-UTF-8 checkpoint directory and -o / hf-to-gguf converts",
            cmd: |e| {
                let ck = e.root.join(non_utf8("ck"));
                std::fs::rename(&e.ck, &ck).unwrap();
                args([
                    "hf-to-gguf".into(),
                    os(&ck),
                    "--vision-tower".into(),
                    os(&e.tower),
                    "--out-dir".into(),
                    os(&e.out.join(non_utf8("o"))),
                    "--name".into(),
                    "m".into(),
                    "-q".into(),
                ])
            },
            env: &[],
            code: 0,
            needles: &[],
            keep: &["o\u{fffd}"],
        },
        Row {
            case: "non-UTF-8 --image path / verify runs",
            cmd: |e| {
                let p = e.root.join(non_utf8("img"));
                std::fs::write(&p, grey_png(8, 6, true)).unwrap();
                verify16(e, vec!["--image".into(), os(&p)])
            },
            env: &[],
            code: 0,
            needles: &[],
            keep: &[],
        },
        Row {
            case: "-t 100000 / quantize",
            cmd: |e| {
                let mut a = quantize_to(e, &e.out.join("q.gguf"));
                a.extend(args(["-t", "100000"]));
                a
            },
            env: &[],
            code: 2,
            needles: &["-t 100000", "1024"],
            keep: &[],
        },
        Row {
            case: "RAYON_NUM_THREADS=100000 / quantize",
            cmd: |e| quantize_to(e, &e.out.join("q.gguf")),
            env: &[("RAYON_NUM_THREADS", "100000")],
            code: 2,
            needles: &["RAYON_NUM_THREADS=100000"],
            keep: &[],
        },
        Row {
            case: "RAYON_NUM_THREADS=100000 / hf-to-gguf",
            cmd: hf,
            env: &[("RAYON_NUM_THREADS", "100000")],
            code: 2,
            needles: &["RAYON_NUM_THREADS=100000"],
            keep: &[],
        },
        Row {
            case: "--name with a newline / hf-to-gguf",
            cmd: |e| {
                let mut a = hf(e);
                a.extend(args(["--name", "a\nb"]));
                a
            },
            env: &[],
            code: 2,
            needles: &["--name", "a\\nb"],
            keep: &[],
        },
        Row {
            case: "--name with an ANSI escape / hf-to-gguf",
            cmd: |e| {
                let mut a = hf(e);
                a.extend(args(["--name", "m\u{1b}[31m"]));
                a
            },
            env: &[],
            code: 2,
            needles: &["--name", "control characters"],
            keep: &[],
        },
    ]
}

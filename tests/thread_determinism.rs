//! The output bytes do not depend on the number of threads (issue "Real scale"): hf-to-gguf and
//! one-pass quantization with 1 thread and with 3 threads give byte-identical files.
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mmfuser-convert");

fn run(args: &[&str], threads: &str) {
    let o = Command::new(BIN)
        .args(args)
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn same_bytes_for_every_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("t1"), tmp.path().join("t3"));
    for (dir, threads) in [(&a, "1"), (&b, "3")] {
        let d = dir.to_str().unwrap();
        run(
            &[
                "hf-to-gguf",
                "fixtures/tiny-llava-mmfuser",
                "--vision-tower",
                "fixtures/tiny-clip",
                "--out-dir",
                d,
                "-q",
            ],
            threads,
        );
        for t in ["Q4_K_M", "Q8_0", "Q6_K"] {
            run(
                &[
                    "quantize",
                    "fixtures/tiny-llava-mmfuser",
                    "--vision-tower",
                    "fixtures/tiny-clip",
                    "--type",
                    t,
                    "--out-dir",
                    d,
                    "-q",
                ],
                threads,
            );
        }
        run(
            &[
                "quantize",
                &format!("{d}/mmproj-tiny-llava-mmfuser-F16.gguf"),
                "--vision-type",
                "Q8_0",
                "-q",
            ],
            threads,
        );
    }
    for f in [
        "tiny-llava-mmfuser-F16.gguf",
        "mmproj-tiny-llava-mmfuser-F16.gguf",
        "tiny-llava-mmfuser-Q4_K_M.gguf",
        "tiny-llava-mmfuser-Q8_0.gguf",
        "tiny-llava-mmfuser-Q6_K.gguf",
        "mmproj-tiny-llava-mmfuser-Q8_0.gguf",
    ] {
        assert!(
            read(&a.join(f)) == read(&b.join(f)),
            "{f} differs between 1 and 3 threads"
        );
    }
}

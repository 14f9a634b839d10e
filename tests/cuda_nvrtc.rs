//! The CUDA path on a machine without a GPU (CI):
//! - every kernel module compiles with NVRTC for sm_80 and sm_90 when the NVRTC library loads
//!   (.ci/run installs the `nvidia-cuda-nvrtc` wheel and sets MMFUSER_REQUIRE_NVRTC=1, which
//!   turns a missing NVRTC into a failure instead of a skip);
//! - the PTX cache round-trips;
//! - `--device auto` falls back to the CPU with a one-line note and `--device cuda` is a usage
//!   error (exit 2) with a one-line message when no GPU is usable (where one is, both use it).
use crate::common::skip;
use mmfuser_convert::cuda::{self, kernels};
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mmfuser-convert");
const CK: &str = "fixtures/tiny-llava-mmfuser";
const TOWER: &str = "fixtures/tiny-clip";

/// True when the test may run; false (after saying so) when NVRTC is missing and not required.
fn nvrtc_or_skip(test: &str) -> bool {
    if kernels::nvrtc_present() {
        return true;
    }
    if std::env::var("MMFUSER_REQUIRE_NVRTC").as_deref() == Ok("1") {
        panic!(
            "MMFUSER_REQUIRE_NVRTC=1 but the NVRTC library (libnvrtc.so) cannot be loaded: \
             install the nvidia-cuda-nvrtc wheel and put its lib folder on LD_LIBRARY_PATH (.ci/run does)"
        );
    }
    skip::skip(
        test,
        "no NVRTC library (libnvrtc.so) loads here; .ci/run installs one and sets \
         MMFUSER_REQUIRE_NVRTC=1, which makes this a failure",
    );
    false
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_kernel_compiles_for_sm80_and_sm90") {
        return;
    }
    let (major, minor) = kernels::nvrtc_version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    for arch in ["sm_80", "sm_90"] {
        for m in kernels::MODULES {
            let ptx = kernels::compile_ptx(m, arch).unwrap_or_else(|e| panic!("{e}"));
            let target = format!(".target {arch}");
            assert!(ptx.contains(&target), "{}: no {target} in the PTX", m.name);
            for f in m.functions {
                assert!(
                    ptx.contains(&format!(".entry {f}(")),
                    "kernels/{}.cu: no kernel named {f} for {arch}",
                    m.name
                );
            }
            // The mat-vec / dequant kernels keep their per-unit arrays in registers.
            if m.name == "quant" {
                assert!(
                    !ptx.contains(".local"),
                    "kernels/quant.cu for {arch} uses local memory (a register array spilled)"
                );
            }
        }
    }
    // Every kernel the backend loads is declared by exactly one module.
    let mut all: Vec<&str> = kernels::MODULES
        .iter()
        .flat_map(|m| m.functions.iter().copied())
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "a kernel name is declared twice");
}

#[test]
fn a_broken_kernel_reports_the_nvrtc_log() {
    if !nvrtc_or_skip("a_broken_kernel_reports_the_nvrtc_log") {
        return;
    }
    let bad = kernels::KernelModule {
        name: "broken",
        source: "extern \"C\" __global__ void k(float* y) { y[0] = undefined_thing; }",
        functions: &["k"],
    };
    let e = kernels::compile_ptx(&bad, "sm_90").unwrap_err();
    assert!(e.contains("undefined_thing"), "{e}");
    assert!(e.contains("kernels/broken.cu"), "{e}");
}

#[test]
fn ptx_cache_round_trips() {
    if !nvrtc_or_skip("ptx_cache_round_trips") {
        return;
    }
    // The cache folder comes from MMFUSER_CACHE_DIR, which is process-wide, and other tests of
    // this binary open the backend (which reads it): the check runs in a copy of this test
    // binary started for this test alone, with the variable set in that process only.
    const CHILD: &str = "MMFUSER_TEST_PTX_CACHE_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let dir = std::env::var_os("MMFUSER_CACHE_DIR").expect("set by the parent run");
        ptx_cache_check(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // libtest names tests by module path without the crate's name.
    let name = format!(
        "{}::ptx_cache_round_trips",
        module_path!().split_once("::").unwrap().1
    );
    let o = Command::new(std::env::current_exe().unwrap())
        .args([name.as_str(), "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .env("MMFUSER_CACHE_DIR", dir.path())
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success(),
        "{name} in its own process:\n{out}\n{err}"
    );
    assert!(
        out.contains("test result: ok. 1 passed") && !err.contains("SKIPPED"),
        "{name} did not run in its own process:\n{out}\n{err}"
    );
}

/// The round trip itself, in a process whose MMFUSER_CACHE_DIR is `dir`.
fn ptx_cache_check(dir: &Path) {
    let m = &kernels::MODULES[0];
    let (a, hit_a) = kernels::ptx_cached(m, "sm_90").unwrap();
    let (b, hit_b) = kernels::ptx_cached(m, "sm_90").unwrap();
    assert!(!hit_a && hit_b, "first compile, then the cache");
    assert_eq!(a, b);
    let files: Vec<_> = std::fs::read_dir(dir.join("ptx")).unwrap().collect();
    assert_eq!(files.len(), 1);
    // Another architecture is another entry.
    let (_, hit_c) = kernels::ptx_cached(m, "sm_80").unwrap();
    assert!(!hit_c);
}

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn verify_args(dir: &Path, device: &str) -> Vec<String> {
    let d = dir.to_str().unwrap();
    vec![
        "verify".into(),
        CK.into(),
        "--vision-tower".into(),
        TOWER.into(),
        "--gguf".into(),
        format!("{d}/tiny-llava-mmfuser-F16.gguf"),
        "--mmproj".into(),
        format!("{d}/mmproj-tiny-llava-mmfuser-F16.gguf"),
        "--json".into(),
        "--device".into(),
        device.into(),
    ]
}

#[test]
fn device_choice_without_and_with_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
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
    // In-process: opening the backend never panics, whatever is installed.
    let opened = cuda::CudaBackend::open();
    let cuda_ok = opened.is_ok();
    drop(opened);
    let go = |dev: &str| {
        let a = verify_args(dir.path(), dev);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run(&a)
    };
    let (rc, out, err) = go("auto");
    assert_eq!(rc, 0, "auto must pass on the fixture: {err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    let (rc_c, out_c, err_c) = go("cuda");
    assert!(!err_c.contains("panicked"), "{err_c}");
    if cuda_ok {
        assert_eq!(r["device"], "cuda", "auto picks the GPU: {err}");
        assert_eq!(rc_c, 0, "{err_c}");
        let rc: serde_json::Value = serde_json::from_str(&out_c).unwrap();
        assert_eq!(rc["device"], "cuda");
        assert!(
            err_c.contains("cuda memory:"),
            "memory use is reported: {err_c}"
        );
    } else {
        assert_eq!(r["device"], "cpu");
        let notes: Vec<&str> = err.lines().filter(|l| l.contains("CUDA")).collect();
        assert_eq!(notes.len(), 1, "one line says why not CUDA: {err}");
        assert!(notes[0].contains("running on the CPU"), "{err}");
        assert_eq!(
            rc_c, 2,
            "--device cuda without a GPU is a usage error: {err_c}"
        );
        assert!(out_c.is_empty(), "{out_c}");
        assert_eq!(err_c.trim_end().lines().count(), 1, "one line: {err_c}");
        assert!(err_c.contains("--device cuda"), "{err_c}");
    }
    let (rc, out, _) = go("cpu");
    assert_eq!(rc, 0);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["device"], "cpu");
}

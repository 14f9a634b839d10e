//! Helpers shared by the integration tests that run the built binary on broken copies of the
//! fixtures: running it (optionally under an address-space limit), checking that a refused input
//! leaves nothing behind, and a minimal safetensors reader/writer.
#![allow(dead_code)]
use serde_json::{json, Value as Json};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod sabotage;
pub mod skip;

pub const BIN: &str = env!("CARGO_BIN_EXE_mmfuser-convert");

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
pub fn fixture(p: &str) -> PathBuf {
    root().join("fixtures").join(p)
}
pub fn ckpt() -> PathBuf {
    fixture("tiny-llava-mmfuser")
}
pub fn tower() -> PathBuf {
    fixture("tiny-clip")
}
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mmfuser-hf2gguf-")
        .tempdir()
        .expect("tempdir")
}

// ---------------------------------------------------------------------------------------------
// Running the binary

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Run {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "{} failed with exit {}\nstdout:\n{}\nstderr:\n{}",
            self.what, self.code, self.stdout, self.stderr
        );
        self
    }
}

/// Address space the binary may use in these tests: a hostile count or length that makes it try
/// a huge allocation then aborts it (a signal, not exit 1), which fails the test.
pub const MEMORY_LIMIT: u64 = 2 << 30;
/// A run that takes longer is killed (a hang on hostile input fails the test, it does not stall it).
pub const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Run the binary in `cwd` under [`MEMORY_LIMIT`] (with glibc arenas and rayon threads capped so
/// that the limit does not depend on the machine's core count).
pub fn run(args: Vec<OsString>, cwd: &Path) -> Run {
    run_with(args, cwd, &[])
}

/// [`run`] with extra environment variables.
pub fn run_with(args: Vec<OsString>, cwd: &Path, env: &[(&str, &str)]) -> Run {
    run_cmd(args, cwd, env, None)
}

/// [`run`] with `limit_fsize` (RLIMIT_FSIZE, bytes; SIGXFSZ ignored so a write past it fails
/// with EFBIG like a full disk).
pub fn run_cmd(
    args: Vec<OsString>,
    cwd: &Path,
    env: &[(&str, &str)],
    limit_fsize: Option<u64>,
) -> Run {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let what = format!(
        "mmfuser-convert {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cmd = Command::new(BIN);
    cmd.args(&args)
        .current_dir(cwd)
        .env("MALLOC_ARENA_MAX", "2")
        .env("RAYON_NUM_THREADS", "2");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let set = |res, v: u64| {
                let r = libc::rlimit {
                    rlim_cur: v,
                    rlim_max: v,
                };
                if libc::setrlimit(res, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(libc::RLIMIT_AS, MEMORY_LIMIT)?;
            if let Some(f) = limit_fsize {
                set(libc::RLIMIT_FSIZE, f)?;
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("run the binary");
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut b = vec![];
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut b);
            }
            String::from_utf8_lossy(&b).into_owned()
        })
    };
    use std::io::Read;
    let out = drain(child.stdout.take().map(|x| Box::new(x) as _));
    let err = drain(child.stderr.take().map(|x| Box::new(x) as _));
    let t0 = std::time::Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > RUN_TIMEOUT {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let mut stderr = err.join().unwrap();
    if timed_out {
        stderr += &format!("\n[test harness: killed after {RUN_TIMEOUT:?}]");
    }
    Run {
        // Killed by a signal (an abort on a failed allocation, a stack overflow): 128 + signal.
        code: status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        stdout: out.join().unwrap(),
        stderr,
        what,
    }
}

/// Arguments from strings and paths.
pub fn args<I, S>(a: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    a.into_iter().map(Into::into).collect()
}

/// `hf-to-gguf CKPT [--vision-tower TOWER] -o OUT -q EXTRA...`, run from `OUT`'s parent.
pub fn convert(ckpt: &Path, tower: Option<&Path>, out: &Path, extra: &[&str]) -> Run {
    let mut a: Vec<OsString> = vec!["hf-to-gguf".into(), ckpt.into()];
    if let Some(t) = tower {
        a.push("--vision-tower".into());
        a.push(t.into());
    }
    a.push("--out-dir".into());
    a.push(out.into());
    a.push("-q".into());
    a.extend(extra.iter().map(OsString::from));
    run(a, out.parent().unwrap())
}

pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

/// The run must fail with `code`, print an `error:` naming every `needles` string on stderr, not
/// panic, and leave `out` exactly as it was (`keep`: the files that were there before; no
/// artefact, manifest or temporary file).
pub fn assert_rejected(r: &Run, code: i32, out: &Path, keep: &[&str], needles: &[&str]) {
    let ctx = format!(
        "{}\nexit {}\nstdout:\n{}\nstderr:\n{}",
        r.what, r.code, r.stdout, r.stderr
    );
    eprintln!("[exit {}] {}", r.code, r.stderr.trim_end()); // shown with --nocapture
    assert_eq!(r.code, code, "wrong exit code: {ctx}");
    assert!(!r.stderr.contains("panicked"), "the binary panicked: {ctx}");
    if code == 1 {
        assert!(
            r.stderr.contains("error:"),
            "no 'error:' line on stderr: {ctx}"
        );
    }
    for n in needles {
        assert!(r.stderr.contains(n), "stderr does not mention {n:?}: {ctx}");
    }
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(
        dir_names(out),
        want,
        "files left in the output directory: {ctx}"
    );
}

pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &dst.join(e.file_name()));
        } else {
            std::fs::copy(&p, dst.join(e.file_name())).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal safetensors reader/writer (8-byte little-endian header length, JSON header with
// dtype / shape / data_offsets relative to the data section, then the data).

#[derive(Clone, Debug)]
pub struct StTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub struct StFile {
    pub metadata: Option<Json>,
    /// In data order.
    pub tensors: Vec<StTensor>,
}

pub fn st_dtype_size(d: &str) -> usize {
    match d {
        "BF16" | "F16" | "I16" => 2,
        "F32" | "I32" => 4,
        "F64" | "I64" => 8,
        "U8" | "I8" | "BOOL" => 1,
        other => panic!("test helper: dtype {other}"),
    }
}

impl StFile {
    pub fn read(path: &Path) -> StFile {
        let b = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let header: Json = serde_json::from_slice(&b[8..8 + n]).unwrap();
        let data = &b[8 + n..];
        let mut metadata = None;
        let mut tensors = vec![];
        let mut starts = vec![];
        for (k, v) in header.as_object().unwrap() {
            if k == "__metadata__" {
                metadata = Some(v.clone());
                continue;
            }
            let off: Vec<usize> = v["data_offsets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            starts.push(off[0]);
            tensors.push(StTensor {
                name: k.clone(),
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect(),
                data: data[off[0]..off[1]].to_vec(),
            });
        }
        let mut idx: Vec<usize> = (0..tensors.len()).collect();
        idx.sort_by_key(|&i| starts[i]);
        let tensors = idx.into_iter().map(|i| tensors[i].clone()).collect();
        StFile { metadata, tensors }
    }

    /// Header JSON with contiguous offsets in `tensors` order.
    pub fn header(&self) -> Json {
        let mut h = serde_json::Map::new();
        if let Some(m) = &self.metadata {
            h.insert("__metadata__".into(), m.clone());
        }
        let mut off = 0usize;
        for t in &self.tensors {
            h.insert(t.name.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.data.len()]}));
            off += t.data.len();
        }
        Json::Object(h)
    }

    pub fn data(&self) -> Vec<u8> {
        self.tensors
            .iter()
            .flat_map(|t| t.data.iter().copied())
            .collect()
    }

    pub fn write(&self, path: &Path) {
        write_st_raw(path, &self.header(), &self.data());
    }

    pub fn get_mut(&mut self, name: &str) -> &mut StTensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }
}

/// Write a safetensors file from a header (written as given, padded with spaces to 8 bytes, its
/// length prefix always consistent) and a data section.
pub fn write_st_raw(path: &Path, header: &Json, data: &[u8]) {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

pub fn edit_json(path: &Path, f: impl FnOnce(&mut Json)) {
    let mut j: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut j);
    std::fs::write(path, serde_json::to_string_pretty(&j).unwrap()).unwrap();
}

pub fn edit_index(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, Json>)) {
    edit_json(&dir.join("model.safetensors.index.json"), |j| {
        f(j["weight_map"].as_object_mut().unwrap())
    });
}

pub const SHARD1: &str = "model-00001-of-00002.safetensors";
pub const SHARD2: &str = "model-00002-of-00002.safetensors";

/// A copy of the checkpoint fixture in `tmp/ckpt`, and an empty `tmp/out`.
pub fn broken_copy(tmp: &Path) -> (PathBuf, PathBuf) {
    let c = tmp.join("ckpt");
    copy_dir(&ckpt(), &c);
    let out = tmp.join("out");
    std::fs::create_dir(&out).unwrap();
    (c, out)
}

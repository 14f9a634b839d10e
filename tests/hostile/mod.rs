//! Issue #5: broken and hostile inputs. Every input here is generated from the fixtures
//! (truncations at every section boundary, rewritten headers, crafted pickles and zip archives,
//! patched GGUF fields), never a committed blob. Each is given to every command that parses it
//! (hf-to-gguf, quantize with a checkpoint or a GGUF, verify with --gguf / --mmproj), and each
//! run must:
//! - exit 1 (2 for usage errors; 3 where verify's check itself fails),
//! - print a clear `error:` naming the file (and the tensor, where there is one),
//! - not panic (no "panicked", no exit 101) and not die of a signal,
//! - leave no output file behind (not even a temporary one),
//! - stay within `common::MEMORY_LIMIT` of address space (a count that makes it allocate
//!   terabytes aborts the process, which fails the test).
//!
//! One module per theme. A test is a table of cases, one row each, run by one loop that goes on
//! past a failing case and fails at the end listing every failing case by name. Attacks on a
//! parser alone (no fixture, no CLI) are beside the parser: the `hostile_tests` module at the end
//! of its file under src/formats/.
use crate::common::{self, *};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Arguments: usage errors and odd but valid command lines.
mod arguments;
/// Safetensors shards, their index, checkpoint contents, non-finite weights.
mod checkpoint;
/// config.json, the tower's config.json and preprocessor_config.json.
mod config;
/// Writing safely (kills, signals, a full disk, a read-only destination, concurrent writers) and
/// files that are not regular files or are far too big.
mod filesystem;
/// GGUF files given to quantize and verify.
mod gguf;
/// verify's probe inputs: --pixel-values (.npy), --image, --input-ids.
mod probe;
/// PyTorch .bin archives (zip + pickle).
mod pytorch;

const BIN_CKPT: &str = "tiny-llava-mmfuser-bin";

// ---------------------------------------------------------------------------------------------
// Collecting failures

/// The failures of one table (all cases run; the test fails at the end listing every one).
#[derive(Default)]
struct Cases {
    n: usize,
    failed: Vec<String>,
}

impl Cases {
    /// Check one run: exit `code`, `error:` naming all `needles`, no panic or signal, and `out`
    /// holding exactly `keep`.
    fn check(
        &mut self,
        case: &str,
        r: &Run,
        code: i32,
        out: &Path,
        keep: &[&str],
        needles: &[&str],
    ) {
        self.n += 1;
        let mut why = vec![];
        if r.code != code {
            why.push(format!("exit {} (want {code})", r.code));
        }
        if r.stderr.contains("panicked") || r.code == 101 {
            why.push("panicked".into());
        }
        if !r.stderr.contains("error:") && code != 0 {
            why.push("no 'error:' on stderr".into());
        }
        for n in needles {
            if !r.stderr.contains(n) {
                why.push(format!("stderr does not name {n:?}"));
            }
        }
        let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
        want.sort();
        let got = dir_names(out);
        if got != want {
            why.push(format!(
                "left in {}: {got:?} (want {want:?})",
                out.display()
            ));
        }
        eprintln!("[{case}] exit {}: {}", r.code, r.stderr.trim_end());
        if !why.is_empty() {
            self.failed.push(format!(
                "{case}: {}\n    {}\n    stderr: {}",
                why.join("; "),
                r.what,
                r.stderr.trim_end()
            ));
        }
    }
    fn finish(self, what: &str) {
        eprintln!("{what}: {} runs", self.n);
        assert!(
            self.failed.is_empty(),
            "{} of {} {what} runs failed:\n{}",
            self.failed.len(),
            self.n,
            self.failed.join("\n")
        );
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn os(p: &Path) -> OsString {
    p.as_os_str().to_os_string()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------------
// Checkpoint cases: a broken copy of the sharded safetensors fixture (with its vision tower) or
// of the .bin fixture, converted by hf-to-gguf and by quantize (checkpoint -> Q8_0 in one pass).

struct Ck {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    ckpt: PathBuf,
    tower: Option<PathBuf>,
}

/// A copy of the safetensors fixture and of the tower in a new temporary directory.
fn st_copy() -> Ck {
    let tmp = tempdir();
    let root = tmp.path().to_path_buf();
    let ckpt = root.join("ckpt");
    let t = root.join("tower");
    copy_dir(&common::ckpt(), &ckpt);
    copy_dir(&common::tower(), &t);
    Ck {
        _tmp: tmp,
        root,
        ckpt,
        tower: Some(t),
    }
}

/// A copy of the PyTorch .bin fixture (its CLIP tower is embedded).
fn bin_copy() -> Ck {
    let tmp = tempdir();
    let root = tmp.path().to_path_buf();
    let ckpt = root.join("ckpt");
    copy_dir(&fixture(BIN_CKPT), &ckpt);
    Ck {
        _tmp: tmp,
        root,
        ckpt,
        tower: None,
    }
}

/// The fixture converted to F16 GGUFs (LLM, mmproj) in a fresh directory.
struct Artefacts {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    llm: PathBuf,
    mmproj: PathBuf,
}

fn artefacts() -> Artefacts {
    let tmp = tempdir();
    let dir = tmp.path().join("base");
    convert(&common::ckpt(), Some(&common::tower()), &dir, &[]).ok();
    Artefacts {
        llm: dir.join("tiny-llava-mmfuser-F16.gguf"),
        mmproj: dir.join("mmproj-tiny-llava-mmfuser-F16.gguf"),
        dir,
        _tmp: tmp,
    }
}

thread_local! {
    /// The fixture's F16 artefacts (verify needs a --gguf and an --mmproj to get as far as
    /// reading the checkpoint), converted once per test thread and removed when it ends.
    static GOOD: std::cell::OnceCell<Artefacts> = const { std::cell::OnceCell::new() };
}

fn good_artefacts() -> (PathBuf, PathBuf) {
    GOOD.with(|g| {
        let a = g.get_or_init(artefacts);
        (a.llm.clone(), a.mmproj.clone())
    })
}

/// Run hf-to-gguf, quantize --bits 8 and (`with_verify`) verify on the checkpoint; all must
/// refuse it (exit 1, every verb's code for bad input).
fn refuse_ckpt(cases: &mut Cases, case: &str, ck: &Ck, needles: &[&str], with_verify: bool) {
    let out = ck.root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut tower = vec![];
    if let Some(t) = &ck.tower {
        tower = vec![OsString::from("--vision-tower"), t.into()];
    }
    let mut a = args(["hf-to-gguf".into(), ck.ckpt.clone().into_os_string()]);
    a.extend(tower.clone());
    a.extend(args([
        "--out-dir".into(),
        out.clone().into_os_string(),
        "-q".into(),
    ]));
    let r = run(a, &ck.root);
    cases.check(&format!("{case} / hf-to-gguf"), &r, 1, &out, &[], needles);
    let mut a = args(["quantize", "--bits", "8", "-q"]);
    a.push(ck.ckpt.clone().into());
    a.extend(tower.clone());
    a.extend(args(["--out-dir".into(), out.clone().into_os_string()]));
    let r = run(a, &ck.root);
    cases.check(&format!("{case} / quantize"), &r, 1, &out, &[], needles);
    if with_verify {
        let (g, m) = good_artefacts();
        let mut a = args(["verify".into(), ck.ckpt.clone().into_os_string()]);
        a.extend(tower);
        a.extend(args([
            OsString::from("--gguf"),
            g.into(),
            "--mmproj".into(),
            m.into(),
            "--device".into(),
            "cpu".into(),
        ]));
        let r = run(a, &ck.root);
        cases.check(&format!("{case} / verify"), &r, 1, &out, &[], needles);
    }
}

type CkEdit = Box<dyn Fn(&Ck)>;

/// One broken checkpoint: a fresh copy of a fixture (`from`), broken by `brk`, then refused by
/// every verb that reads it ([`refuse_ckpt`]), each error naming every needle.
struct CkCase {
    name: String,
    from: fn() -> Ck,
    brk: CkEdit,
    needles: Vec<String>,
    /// verify too (it needs the checkpoint to get as far as the broken part).
    verify: bool,
    /// Run on the same copy after the refusals.
    after: Option<CkEdit>,
}

impl CkCase {
    fn new(
        name: impl Into<String>,
        from: fn() -> Ck,
        brk: impl Fn(&Ck) + 'static,
        needles: &[&str],
    ) -> CkCase {
        CkCase {
            name: name.into(),
            from,
            brk: Box::new(brk),
            needles: needles.iter().map(|s| s.to_string()).collect(),
            verify: true,
            after: None,
        }
    }

    /// hf-to-gguf and quantize only, not verify.
    fn no_verify(mut self) -> CkCase {
        self.verify = false;
        self
    }

    /// `f` runs on the same broken copy after the refusals.
    fn then(mut self, f: impl Fn(&Ck) + 'static) -> CkCase {
        self.after = Some(Box::new(f));
        self
    }
}

/// Run every case of the table; `each` runs after each case with its name.
fn refuse_ckpts_then(what: &str, list: Vec<CkCase>, each: impl Fn(&str)) {
    let mut cases = Cases::default();
    for c in list {
        let ck = (c.from)();
        (c.brk)(&ck);
        refuse_ckpt(&mut cases, &c.name, &ck, &strs(&c.needles), c.verify);
        if let Some(after) = &c.after {
            after(&ck);
        }
        each(&c.name);
    }
    cases.finish(what);
}

fn refuse_ckpts(what: &str, list: Vec<CkCase>) {
    refuse_ckpts_then(what, list, |_| {})
}

// ---------------------------------------------------------------------------------------------
// One command on a hostile input

/// Returns the command line and the directory whose listing is checked afterwards.
type Setup<'a> = Box<dyn Fn(&Path) -> (Vec<OsString>, PathBuf) + 'a>;

/// One command line: `setup` writes the case's input under a fresh empty directory (also the
/// command's working directory). The run must exit `code`, name every needle on stderr, and
/// leave the returned directory holding exactly `keep`.
struct CmdCase<'a> {
    name: String,
    setup: Setup<'a>,
    code: i32,
    keep: Vec<String>,
    needles: Vec<String>,
}

impl<'a> CmdCase<'a> {
    fn new(
        name: impl Into<String>,
        setup: impl Fn(&Path) -> (Vec<OsString>, PathBuf) + 'a,
        code: i32,
        keep: &[&str],
        needles: &[&str],
    ) -> CmdCase<'a> {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        CmdCase {
            name: name.into(),
            setup: Box::new(setup),
            code,
            keep: own(keep),
            needles: own(needles),
        }
    }
}

fn run_cmds(what: &str, list: Vec<CmdCase>) {
    let mut cases = Cases::default();
    for c in list {
        let tmp = tempdir();
        let (a, dir) = (c.setup)(tmp.path());
        let r = run(a, tmp.path());
        cases.check(&c.name, &r, c.code, &dir, &strs(&c.keep), &strs(&c.needles));
    }
    cases.finish(what);
}

// ---------------------------------------------------------------------------------------------
// Single command lines (issue #16, robustness, second round): one row per case.

/// What a row's command may use, fresh per row: copies of the safetensors checkpoint and its
/// tower, the fixture's F16 artefacts, and an empty output directory.
struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    ck: PathBuf,
    tower: PathBuf,
    llm: PathBuf,
    mmproj: PathBuf,
    out: PathBuf,
}

fn env16() -> Env {
    let c = st_copy();
    let (g, m) = good_artefacts();
    let art = c.root.join("art");
    std::fs::create_dir(&art).unwrap();
    let (llm, mmproj) = (art.join(file_name(&g)), art.join(file_name(&m)));
    std::fs::copy(&g, &llm).unwrap();
    std::fs::copy(&m, &mmproj).unwrap();
    let out = c.root.join("out");
    std::fs::create_dir(&out).unwrap();
    Env {
        root: c.root.clone(),
        ck: c.ckpt.clone(),
        tower: c.tower.clone().unwrap(),
        _tmp: c._tmp,
        llm,
        mmproj,
        out,
    }
}

/// One case: `cmd` builds the hostile input inside `e.root` and returns the command line. The
/// run must exit `code`, name every needle on stderr, leave `e.out` holding exactly `keep`,
/// change no input, finish within [`ROW_TIME`] and not die of a signal (common::run also caps
/// its address space at common::MEMORY_LIMIT).
struct Row {
    case: &'static str,
    cmd: fn(&Env) -> Vec<OsString>,
    env: &'static [(&'static str, &'static str)],
    code: i32,
    needles: &'static [&'static str],
    keep: &'static [&'static str],
}

const ROW_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Run every row, each in a fresh [`Env`]; fails at the end listing every failing row.
fn run_rows(what: &str, rows: Vec<Row>) {
    let mut cases = Cases::default();
    for row in rows {
        let e = env16();
        let a = (row.cmd)(&e);
        let before = inputs(&e.root, &e.out);
        let t0 = std::time::Instant::now();
        let r = run_with(a, &e.root, row.env);
        let took = t0.elapsed();
        cases.check(row.case, &r, row.code, &e.out, row.keep, row.needles);
        let mut why = vec![];
        if took > ROW_TIME {
            why.push(format!("took {took:?}"));
        }
        if r.stderr.contains('\u{1b}') {
            why.push("a raw ESC reached stderr".into());
        }
        if inputs(&e.root, &e.out) != before {
            why.push("an input changed".into());
        }
        if !why.is_empty() {
            cases
                .failed
                .push(format!("{}: {}", row.case, why.join("; ")));
        }
    }
    cases.finish(what);
}

fn hf(e: &Env) -> Vec<OsString> {
    args([
        "hf-to-gguf".into(),
        os(&e.ck),
        "--vision-tower".into(),
        os(&e.tower),
        "--out-dir".into(),
        os(&e.out),
        "-q".into(),
    ])
}

fn verify_with(e: &Env, gguf: &Path, mmproj: &Path, extra: Vec<OsString>) -> Vec<OsString> {
    let mut a = args([
        "verify".into(),
        os(&e.ck),
        "--vision-tower".into(),
        os(&e.tower),
        "--gguf".into(),
        os(gguf),
        "--mmproj".into(),
        os(mmproj),
        "--device".into(),
        "cpu".into(),
    ]);
    a.extend(extra);
    a
}

fn verify16(e: &Env, extra: Vec<OsString>) -> Vec<OsString> {
    verify_with(e, &e.llm, &e.mmproj, extra)
}

fn quantize_to(e: &Env, dest: &Path) -> Vec<OsString> {
    args([
        "quantize".into(),
        "--bits".into(),
        "8".into(),
        os(&e.llm),
        "-o".into(),
        os(dest),
        "-q".into(),
    ])
}

fn put(e: &Env, name: &str, bytes: &[u8]) -> PathBuf {
    let p = e.root.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Regular files under `dir` (but `skip`) with their bytes: the inputs, which no run may change.
fn inputs(dir: &Path, skip: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let m = std::fs::symlink_metadata(&p).unwrap();
        if p == skip {
            continue;
        } else if m.is_dir() {
            v.extend(inputs(&p, skip));
        } else if m.is_file() {
            let b = if m.len() > (64 << 20) {
                vec![] // a sparse giant: its size is compared below
            } else {
                std::fs::read(&p).unwrap()
            };
            v.push((p, [b, m.len().to_le_bytes().to_vec()].concat()));
        }
    }
    v.sort();
    v
}

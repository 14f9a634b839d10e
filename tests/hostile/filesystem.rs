//! Writing safely: SIGKILL and termination signals mid-write, a full disk, a read-only
//! destination, inputs that change under the reader, concurrent writers, a planted symlink;
//! and files that are not regular files, or far too big.
use super::*;
use mmfuser_convert::formats::gguf::GgufFile;
use serde_json::{json, Value as Json};

const TEMP_MARK: &str = mmfuser_convert::ground::fsutil::TEMP_MARK;

fn temps(dir: &Path) -> Vec<String> {
    dir_names(dir)
        .into_iter()
        .filter(|n| n.starts_with(TEMP_MARK))
        .collect()
}

/// Every file of `dir` (but temporary ones) with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    dir_names(dir)
        .into_iter()
        .filter(|n| !n.starts_with(TEMP_MARK))
        .map(|n| {
            let b = std::fs::read(dir.join(&n)).unwrap();
            (n, b)
        })
        .collect()
}

/// The fixture with intermediate_size 16384: 48 MiB of seeded random (finite) BF16 FFN weights,
/// so that writing its artefacts takes long enough to be interrupted. Named `ckpt` like the
/// small copies, so both write the same output names.
fn big_checkpoint(root: &Path) -> PathBuf {
    let c = root.join("ckpt");
    copy_dir(&common::ckpt(), &c);
    let n_ff = 16384usize;
    edit_json(&c.join("config.json"), |j| {
        j["intermediate_size"] = json!(n_ff)
    });
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for shard in [SHARD1, SHARD2] {
        let mut st = StFile::read(&c.join(shard));
        for t in st.tensors.iter_mut().filter(|t| t.name.contains(".mlp.")) {
            t.shape = if t.name.contains("down_proj") {
                vec![256, n_ff]
            } else {
                vec![n_ff, 256]
            };
            t.data = (0..n_ff * 256)
                .flat_map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                    half::bf16::from_f32(v).to_le_bytes()
                })
                .collect();
        }
        st.write(&c.join(shard));
    }
    c
}

/// Start the binary and SIGKILL it as soon as one of its temporary files in `out` has data.
/// Returns the killed process's id. Retries (up to 5 times) if a run finishes before it is seen.
fn kill_mid_write(a: &[OsString], cwd: &Path, out: &Path, before: &[(String, Vec<u8>)]) -> u32 {
    use std::os::unix::process::ExitStatusExt;
    for _ in 0..5 {
        let mut child = std::process::Command::new(BIN)
            .args(a)
            .current_dir(cwd)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mark = format!("{TEMP_MARK}{pid}-");
        let killed = loop {
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            let writing = std::fs::read_dir(out)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    e.file_name().to_string_lossy().starts_with(&mark)
                        && e.metadata().map(|m| m.len() > 0).unwrap_or(false)
                });
            if writing {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                break true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        let status = child.wait().unwrap();
        if killed {
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
            return pid;
        }
        // It finished first: put the directory back as it was and start over.
        eprintln!("run finished before it could be killed; retrying");
        for n in dir_names(out) {
            std::fs::remove_file(out.join(n)).unwrap();
        }
        for (n, b) in before {
            std::fs::write(out.join(n), b).unwrap();
        }
    }
    panic!("{a:?} always finished before a temporary file was seen");
}

/// After a SIGKILL mid-write: every file of `before` unchanged, nothing else under a final name,
/// and the killed run's temporary file obviously junk (`.mmfuser-partial-<pid>-<name>`).
fn assert_killed_run_left_previous(out: &Path, before: &[(String, Vec<u8>)], pid: u32) {
    let after = snapshot(out);
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&after),
        names(before),
        "files under final names changed"
    );
    for ((n, a), (_, b)) in after.iter().zip(before) {
        assert!(a == b, "{n} changed by the killed run");
    }
    let t = temps(out);
    assert!(
        !t.is_empty()
            && t.iter()
                .all(|n| n.starts_with(&format!("{TEMP_MARK}{pid}-"))),
        "temporary files: {t:?}"
    );
}

#[test]
fn sigkill_mid_write_leaves_previous_file_or_nothing() {
    let tmp = tempdir();
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let small_ck = small.join("ckpt");
    copy_dir(&common::ckpt(), &small_ck);
    let big_root = tmp.path().join("big");
    std::fs::create_dir(&big_root).unwrap();
    let big = big_checkpoint(&big_root);
    let tower = common::tower();
    let os = |p: &Path| p.as_os_str().to_os_string();

    // 1. hf-to-gguf into an empty directory: killed, it leaves no file under a final name.
    let out1 = tmp.path().join("out1");
    std::fs::create_dir(&out1).unwrap();
    let a1 = vec![
        "hf-to-gguf".into(),
        os(&big),
        "--vision-tower".into(),
        os(&tower),
        "--out-dir".into(),
        os(&out1),
        "-q".into(),
    ];
    let pid = kill_mid_write(&a1, tmp.path(), &out1, &[]);
    assert_killed_run_left_previous(&out1, &[], pid);
    // The next run removes the dead run's temporary file, but not a live writer's, judged by
    // its lock, not its pid (issue #16 item 8): here a writer in another PID namespace, whose
    // pid means nothing here, holds it; and an unlocked one with our own (live) pid is stale.
    let live = format!("{TEMP_MARK}4000000000-other.gguf");
    std::fs::write(out1.join(&live), b"still being written").unwrap();
    let held = std::fs::File::open(out1.join(&live)).unwrap();
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) },
        0
    );
    let unlocked = format!("{TEMP_MARK}{}-other.gguf", std::process::id());
    std::fs::write(out1.join(&unlocked), b"left behind").unwrap();
    run(a1.clone(), tmp.path()).ok();
    assert_eq!(temps(&out1), vec![live.clone()]);
    drop(held);
    assert_eq!(snapshot(&out1).len(), 3, "{:?}", dir_names(&out1));
    GgufFile::open(out1.join("ckpt-F16.gguf")).unwrap();

    // 2. Checkpoint -> Q4_K_M in one pass over a previous conversion: the previous files stay.
    let out2 = tmp.path().join("out2");
    let q = |ck: &Path| {
        vec![
            "quantize".into(),
            os(ck),
            "--type".into(),
            "Q4_K_M".into(),
            "--vision-tower".into(),
            os(&tower),
            "--out-dir".into(),
            os(&out2),
            "-q".into(),
        ]
    };
    run(q(&small_ck), tmp.path()).ok();
    let before = snapshot(&out2);
    assert_eq!(before.len(), 3);
    let pid = kill_mid_write(&q(&big), tmp.path(), &out2, &before);
    assert_killed_run_left_previous(&out2, &before, pid);
    run(q(&big), tmp.path()).ok();
    assert!(temps(&out2).is_empty(), "{:?}", dir_names(&out2));
    assert_ne!(snapshot(&out2), before);

    // 3. GGUF -> Q4_K_M over a previous output (quantize must clean up too).
    let out3 = tmp.path().join("out3");
    std::fs::create_dir(&out3).unwrap();
    let dest = out3.join("model-Q4_K_M.gguf");
    let qf = |input: &Path| {
        vec![
            "quantize".into(),
            os(input),
            "--type".into(),
            "Q4_K_M".into(),
            "-o".into(),
            os(&dest),
            "-q".into(),
        ]
    };
    run(qf(&out1.join("ckpt-F16.gguf")), tmp.path()).ok(); // the big model, as "previous"
    let before = snapshot(&out3);
    // Killed while quantizing the big model again (the same bytes would be written: compare
    // against a copy that differs, the small model's output, to see that nothing was renamed).
    let small_out = tmp.path().join("small-out");
    convert(&small_ck, Some(&tower), &small_out, &[]).ok();
    run(qf(&small_out.join("ckpt-F16.gguf")), tmp.path()).ok();
    let before_small = snapshot(&out3);
    assert_ne!(before, before_small);
    let pid = kill_mid_write(
        &qf(&out1.join("ckpt-F16.gguf")),
        tmp.path(),
        &out3,
        &before_small,
    );
    assert_killed_run_left_previous(&out3, &before_small, pid);
    run(qf(&out1.join("ckpt-F16.gguf")), tmp.path()).ok();
    assert!(
        temps(&out3).is_empty(),
        "quantize did not remove the dead run's temporary file: {:?}",
        dir_names(&out3)
    );
    let gguf = |v: Vec<(String, Vec<u8>)>| {
        v.into_iter()
            .find(|x| x.0 == "model-Q4_K_M.gguf")
            .unwrap()
            .1
    };
    assert!(
        gguf(snapshot(&out3)) == gguf(before),
        "the rerun differs from the first big run"
    );
    std::fs::remove_file(out1.join(&live)).unwrap();
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Mount a tmpfs at `dir` with `opts`. These cases need root or CAP_SYS_ADMIN (CI runs as
/// root); where mounting is refused the test fails, naming the way to run it, rather than
/// skipping and reporting "ok" for cases that never ran.
fn mount_tmpfs(dir: &Path, opts: &str) -> Mount {
    std::fs::create_dir_all(dir).unwrap();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
        .arg(dir)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "cannot mount a tmpfs at {} ({}): the full-disk and read-only cases need root or \
         CAP_SYS_ADMIN; as another user run them in a user namespace: \
         `unshare -rm cargo test --release --test integration -- hostile::`",
        dir.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Mount(dir.to_path_buf())
}

fn pages(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len().div_ceil(4096) * 4096
}

/// How a [`DiskCase`] runs out of space.
enum Limit {
    /// RLIMIT_FSIZE, bytes (EFBIG, as on a full disk): works without privileges.
    FileSize(u64),
    /// A tmpfs of this many bytes mounted as the output directory.
    Tmpfs(u64),
}

/// One write that runs out of space: `cmd` (given the output directory) must fail with exit 1
/// naming every needle and leave the directory empty.
struct DiskCase<'a> {
    name: &'static str,
    limit: Limit,
    cmd: &'a dyn Fn(&Path) -> Vec<OsString>,
    needles: &'static [&'static str],
}

#[test]
fn full_disk_leaves_nothing() {
    let mut cases = Cases::default();
    let tmp = tempdir();
    let base = tmp.path().join("base");
    convert(&common::ckpt(), Some(&common::tower()), &base, &[]).ok();
    let llm = base.join("tiny-llava-mmfuser-F16.gguf");
    let mmproj = base.join("mmproj-tiny-llava-mmfuser-F16.gguf");
    let hf = |out: &Path| {
        args([
            os(Path::new("hf-to-gguf")),
            os(&common::ckpt()),
            "--vision-tower".into(),
            os(&common::tower()),
            "--out-dir".into(),
            os(out),
            "-q".into(),
        ])
    };
    let quant = |out: &Path| {
        args([
            os(Path::new("quantize")),
            os(&llm),
            "--type".into(),
            "Q8_0".into(),
            "-o".into(),
            os(&out.join("q.gguf")),
            "-q".into(),
        ])
    };
    let quant_ckpt = |out: &Path| {
        let mut q = args([
            os(Path::new("quantize")),
            os(&common::ckpt()),
            "--bits".into(),
            "4".into(),
            "--vision-tower".into(),
            os(&common::tower()),
        ]);
        q.extend(args(["--out-dir".into(), os(out), "-q".into()]));
        q
    };
    let both = pages(&llm) + pages(&mmproj);
    let no_space: &[&str] = &["No space left on device"];
    let list = [
        DiskCase {
            name: "RLIMIT_FSIZE 1 MiB / hf-to-gguf",
            limit: Limit::FileSize(1 << 20),
            cmd: &hf,
            needles: &["File too large"],
        },
        DiskCase {
            name: "RLIMIT_FSIZE 512 KiB / quantize",
            limit: Limit::FileSize(512 << 10),
            cmd: &quant,
            needles: &["File too large", "q.gguf"],
        },
        // A small tmpfs: full before the LLM is written, after the LLM, and after both GGUFs
        // (the manifest does not fit). In each case nothing is left.
        DiskCase {
            name: "tmpfs 2 MiB: the LLM does not fit / hf-to-gguf",
            limit: Limit::Tmpfs(2 << 20),
            cmd: &hf,
            needles: no_space,
        },
        DiskCase {
            name: "tmpfs the LLM fits, the mmproj does not / hf-to-gguf",
            limit: Limit::Tmpfs(pages(&llm) + (64 << 10)),
            cmd: &hf,
            needles: no_space,
        },
        DiskCase {
            name: "tmpfs both GGUFs fit, the manifest does not / hf-to-gguf",
            limit: Limit::Tmpfs(both + 8192),
            cmd: &hf,
            needles: no_space,
        },
        // quantize (a GGUF, and a checkpoint in one pass) onto a 512 KiB tmpfs.
        DiskCase {
            name: "tmpfs 512 KiB / quantize",
            limit: Limit::Tmpfs(512 << 10),
            cmd: &quant,
            needles: no_space,
        },
        DiskCase {
            name: "tmpfs 512 KiB / quantize checkpoint",
            limit: Limit::Tmpfs(512 << 10),
            cmd: &quant_ckpt,
            needles: no_space,
        },
    ];
    for (i, c) in list.iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        // A mount stays until the directory's listing has been checked.
        let (_mount, fsize) = match c.limit {
            Limit::FileSize(n) => {
                std::fs::create_dir(&dir).unwrap();
                (None, Some(n))
            }
            Limit::Tmpfs(n) => (Some(mount_tmpfs(&dir, &format!("size={n}"))), None),
        };
        let r = run_cmd((c.cmd)(&dir), tmp.path(), &[], fsize);
        cases.check(c.name, &r, 1, &dir, &[], c.needles);
    }
    // A previous conversion in place, and a rerun whose manifest does not fit: the manifest is
    // written (under its temporary name) before any rename, so the previous artefacts and
    // manifest survive byte for byte.
    let dir = tmp.path().join("tmpfs-rerun");
    {
        let _m = mount_tmpfs(&dir, "size=64m");
        let r = run(hf(&dir), tmp.path());
        assert_eq!(r.code, 0, "first run: {}", r.stderr);
        let snapshot = |d: &Path| -> Vec<(String, Vec<u8>)> {
            dir_names(d)
                .into_iter()
                .map(|n| {
                    let b = std::fs::read(d.join(&n)).unwrap();
                    (n, b)
                })
                .collect()
        };
        let before = snapshot(&dir);
        let used: u64 = before.iter().map(|(n, _)| pages(&dir.join(n))).sum();
        let manifest = before
            .iter()
            .find(|(n, _)| n.ends_with(".manifest.json"))
            .map(|(_, b)| b.len() as u64)
            .unwrap();
        assert!(manifest > 4096, "the manifest must not fit in one page");
        let size = used + both + 4096;
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {} to {size} bytes", dir.display());
        let r = run(hf(&dir), tmp.path());
        let keep: Vec<String> = before.iter().map(|(n, _)| n.clone()).collect();
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        cases.check(
            "tmpfs rerun, the new manifest does not fit / hf-to-gguf",
            &r,
            1,
            &dir,
            &keep,
            &["No space left on device"],
        );
        assert!(
            snapshot(&dir) == before,
            "the previous conversion changed after a failed rerun"
        );
    }
    cases.finish("full disk");
}

#[test]
fn read_only_destination_leaves_nothing() {
    let tmp = tempdir();
    let base = tmp.path().join("base");
    convert(&common::ckpt(), Some(&common::tower()), &base, &[]).ok();
    let llm = base.join("tiny-llava-mmfuser-F16.gguf");
    let dir = tmp.path().join("ro");
    // Root ignores permission bits, so a read-only mount is the only honest test as root.
    let is_root = unsafe { libc::geteuid() } == 0;
    let (_mount, needle) = if is_root {
        (
            Some(mount_tmpfs(&dir, "ro,size=1m")),
            "Read-only file system",
        )
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        (None, "Permission denied")
    };
    // `a` run against the read-only directory: refused naming why, nothing written.
    let ro = |name: &str, a: Vec<OsString>| {
        let dir = dir.clone();
        CmdCase::new(name, move |_| (a.clone(), dir.clone()), 1, &[], &[needle])
    };
    let list = vec![
        ro(
            "hf-to-gguf -o RO",
            args([
                os(Path::new("hf-to-gguf")),
                os(&common::ckpt()),
                "--vision-tower".into(),
                os(&common::tower()),
                "--out-dir".into(),
                os(&dir),
                "-q".into(),
            ]),
        ),
        ro(
            "hf-to-gguf -o RO/sub",
            args([
                os(Path::new("hf-to-gguf")),
                os(&common::ckpt()),
                "--vision-tower".into(),
                os(&common::tower()),
                "--out-dir".into(),
                os(&dir.join("sub")),
                "-q".into(),
            ]),
        ),
        ro(
            "quantize -o RO/q.gguf",
            args([
                os(Path::new("quantize")),
                os(&llm),
                "--type".into(),
                "Q4_K_M".into(),
                "-o".into(),
                os(&dir.join("q.gguf")),
                "-q".into(),
            ]),
        ),
        ro(
            "quantize CKPT --out-dir RO",
            args([
                os(Path::new("quantize")),
                os(&common::ckpt()),
                "--bits".into(),
                "8".into(),
                "--vision-tower".into(),
                os(&common::tower()),
                "--out-dir".into(),
                os(&dir),
                "-q".into(),
            ]),
        ),
    ];
    run_cmds("read-only destination", list);
    if !is_root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// The temporary file's name is predictable (`.mmfuser-partial-<pid>-<name>`): a symlink planted
/// under it in a shared output directory must not make the writer write through it.
#[test]
fn planted_symlink_at_the_temporary_name_is_not_followed() {
    use mmfuser_convert::ground::fsutil::{write_atomic, AtomicFile};
    let tmp = tempdir();
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let out = tmp.path().join("shared");
    std::fs::create_dir(&out).unwrap();
    let dest = out.join("model.gguf");
    let planted = out.join(format!("{TEMP_MARK}{}-model.gguf", std::process::id()));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    write_atomic(&dest, b"new artefact").unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::read(&dest).unwrap(), b"new artefact");
    assert!(!planted.exists() && planted.symlink_metadata().is_err());
    // Dropped without commit: the temporary file goes, the victim stays.
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    drop(AtomicFile::create(&dest).unwrap());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(planted.symlink_metadata().is_err());
}

#[test]
fn issue16_cases() {
    run_rows("issue 16, special and oversized files", issue16_rows());
}

fn mkfifo(p: &Path) -> PathBuf {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {p:?}"
    );
    p.to_path_buf()
}

/// A file of `len` bytes that takes no disk space (a hole): the size alone must refuse it.
fn sparse(p: &Path, len: u64) {
    std::fs::File::create(p).unwrap().set_len(len).unwrap();
}

fn issue16_rows() -> Vec<Row> {
    vec![
        // 3. Every input of verify is checked to be a regular file (a FIFO hung it forever).
        Row {
            case: "FIFO as --gguf / verify",
            cmd: |e| {
                let f = mkfifo(&e.root.join("fifo.gguf"));
                verify_with(e, &f, &e.mmproj, vec![])
            },
            env: &[],
            code: 1,
            needles: &["fifo.gguf", "not a regular file"],
            keep: &[],
        },
        Row {
            case: "FIFO as --mmproj / verify",
            cmd: |e| {
                let f = mkfifo(&e.root.join("fifo-mmproj.gguf"));
                verify_with(e, &e.llm, &f, vec![])
            },
            env: &[],
            code: 1,
            needles: &["fifo-mmproj.gguf", "not a regular file"],
            keep: &[],
        },
        Row {
            case: "FIFO as --image / verify",
            cmd: |e| {
                let f = mkfifo(&e.root.join("fifo.png"));
                verify16(e, args(["--image".into(), os(&f)]))
            },
            env: &[],
            code: 1,
            needles: &["fifo.png", "not a regular file"],
            keep: &[],
        },
        Row {
            case: "FIFO as --pixel-values / verify",
            cmd: |e| {
                let f = mkfifo(&e.root.join("fifo.npy"));
                verify16(e, args(["--pixel-values".into(), os(&f)]))
            },
            env: &[],
            code: 1,
            needles: &["fifo.npy", "not a regular file"],
            keep: &[],
        },
        Row {
            case: "FIFO as --input-ids / verify",
            cmd: |e| {
                let f = mkfifo(&e.root.join("fifo.json"));
                verify16(e, args(["--input-ids".into(), os(&f)]))
            },
            env: &[],
            code: 1,
            needles: &["fifo.json", "not a regular file"],
            keep: &[],
        },
        Row {
            case: "/dev/zero as --input-ids / verify",
            cmd: |e| verify16(e, args(["--input-ids", "/dev/zero"])),
            env: &[],
            code: 1,
            needles: &["/dev/zero", "not a regular file"],
            keep: &[],
        },
        Row {
            case: "FIFO as tokenizer.model / hf-to-gguf",
            cmd: |e| {
                std::fs::remove_file(e.ck.join("tokenizer.model")).unwrap();
                mkfifo(&e.ck.join("tokenizer.model"));
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["tokenizer.model", "not a regular file"],
            keep: &[],
        },
        Row {
            case: "FIFO named *.manifest.json beside the artefacts / verify passes",
            cmd: |e| {
                mkfifo(&e.llm.with_file_name("x.manifest.json"));
                verify16(e, vec![])
            },
            env: &[],
            code: 0,
            needles: &[],
            keep: &[],
        },
        // 4. Destinations that exist and are not regular files.
        Row {
            case: "quantize -o a FIFO",
            cmd: |e| quantize_to(e, &mkfifo(&e.out.join("dest.gguf"))),
            env: &[],
            code: 1,
            needles: &["dest.gguf", "named pipe", "refusing to replace"],
            keep: &["dest.gguf"],
        },
        Row {
            case: "quantize -o a character device (as root: would replace it)",
            cmd: |e| {
                let p = e.out.join("null");
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                let dev = libc::makedev(1, 3);
                let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, dev) };
                assert_eq!(made, 0, "mknod needs root (CI runs as root)");
                quantize_to(e, &p)
            },
            env: &[],
            code: 1,
            needles: &["null", "a device", "refusing to replace"],
            keep: &["null"],
        },
        Row {
            case: "quantize -o a directory",
            cmd: |e| {
                std::fs::create_dir(e.out.join("d.gguf")).unwrap();
                quantize_to(e, &e.out.join("d.gguf"))
            },
            env: &[],
            code: 1,
            needles: &["d.gguf", "a directory"],
            keep: &["d.gguf"],
        },
        Row {
            case: "hf-to-gguf -o a regular file (not 'File exists')",
            cmd: |e| {
                std::fs::remove_dir(&e.out).unwrap();
                std::fs::write(&e.out, b"x").unwrap();
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["out", "is a regular file"],
            keep: &[],
        },
        Row {
            case: "hf-to-gguf -o a symlink loop (not 'File exists')",
            cmd: |e| {
                std::fs::remove_dir(&e.out).unwrap();
                std::os::unix::fs::symlink(&e.out, &e.out).unwrap();
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["out", "symbolic link loop"],
            keep: &[],
        },
        // 5. JSON inputs are size-capped before they are read (sparse: no disk used).
        Row {
            case: "config.json of 200 MB / hf-to-gguf",
            cmd: |e| {
                sparse(&e.ck.join("config.json"), 200 << 20);
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["config.json", "209715200 bytes"],
            keep: &[],
        },
        Row {
            case: "model.safetensors.index.json of 200 MB / hf-to-gguf",
            cmd: |e| {
                sparse(&e.ck.join("model.safetensors.index.json"), 200 << 20);
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["model.safetensors.index.json", "bytes"],
            keep: &[],
        },
        Row {
            case: "tower preprocessor_config.json of 200 MB / hf-to-gguf",
            cmd: |e| {
                sparse(&e.tower.join("preprocessor_config.json"), 200 << 20);
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["preprocessor_config.json", "bytes"],
            keep: &[],
        },
        Row {
            case: "tokenizer.json of 200 MB (no tokenizer.model) / hf-to-gguf",
            cmd: |e| {
                std::fs::remove_file(e.ck.join("tokenizer.model")).unwrap();
                sparse(&e.ck.join("tokenizer.json"), 200 << 20);
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["tokenizer.json", "bytes"],
            keep: &[],
        },
        Row {
            case: "tokenizer_config.json of 200 MB / hf-to-gguf",
            cmd: |e| {
                sparse(&e.ck.join("tokenizer_config.json"), 200 << 20);
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["tokenizer_config.json", "bytes"],
            keep: &[],
        },
        Row {
            case: "added_tokens.json of 200 MB / hf-to-gguf",
            cmd: |e| {
                sparse(&e.ck.join("added_tokens.json"), 200 << 20);
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["added_tokens.json", "bytes"],
            keep: &[],
        },
        Row {
            case: "--input-ids of 200 MB / verify",
            cmd: |e| {
                let p = e.root.join("ids.json");
                sparse(&p, 200 << 20);
                verify16(e, args(["--input-ids".into(), os(&p)]))
            },
            env: &[],
            code: 1,
            needles: &["ids.json", "bytes"],
            keep: &[],
        },
    ]
}

/// Start the binary and send `sig` as soon as one of its temporary files in `out` has data;
/// returns its exit status and stderr. Retries (up to 5 times) if a run finishes first.
fn signal_mid_write(
    a: &[OsString],
    cwd: &Path,
    out: &Path,
    sig: i32,
    mut on_write: impl FnMut(u32),
) -> (std::process::ExitStatus, String) {
    for _ in 0..5 {
        let mut child = std::process::Command::new(BIN)
            .args(a)
            .current_dir(cwd)
            .env("RAYON_NUM_THREADS", "2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mark = format!("{TEMP_MARK}{pid}-");
        let mut sent = false;
        let t0 = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() && t0.elapsed() < RUN_TIMEOUT {
            let writing = std::fs::read_dir(out)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    e.file_name().to_string_lossy().starts_with(&mark)
                        && e.metadata().map(|m| m.len() > 0).unwrap_or(false)
                });
            if writing && !sent {
                on_write(pid);
                if sig != 0 {
                    unsafe { libc::kill(pid as i32, sig) };
                }
                sent = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        if sent {
            return (
                out.status,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        eprintln!("run finished before its temporary file was seen; retrying");
        for n in dir_names(out_dir_of(a)) {
            let _ = std::fs::remove_file(out_dir_of(a).join(n));
        }
    }
    panic!("{a:?} always finished before a temporary file was seen");
}

/// The value after -o / --out-dir in a command line.
fn out_dir_of(a: &[OsString]) -> &Path {
    let i = a
        .iter()
        .position(|x| x == "-o" || x == "--out-dir")
        .unwrap();
    Path::new(&a[i + 1])
}

/// Issue #16 item 10: SIGINT, SIGTERM and SIGHUP mid-write remove the partial files; the
/// process still ends by that signal (as the shell expects).
#[test]
fn termination_signals_remove_partial_files() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempdir();
    let big = big_checkpoint(tmp.path());
    for (name, sig) in [
        ("SIGINT", libc::SIGINT),
        ("SIGTERM", libc::SIGTERM),
        ("SIGHUP", libc::SIGHUP),
    ] {
        let out = tmp.path().join(format!("out-{name}"));
        std::fs::create_dir(&out).unwrap();
        let a = args([
            "hf-to-gguf".into(),
            os(&big),
            "--vision-tower".into(),
            os(&common::tower()),
            "--out-dir".into(),
            os(&out),
            "-q".into(),
        ]);
        let (status, stderr) = signal_mid_write(&a, tmp.path(), &out, sig, |_| {});
        assert_eq!(status.signal(), Some(sig), "{name}: {status:?} {stderr}");
        assert_eq!(dir_names(&out), Vec::<String>::new(), "{name} left files");
    }
}

/// Shorten the file at `path` to `len` bytes in place (as another process truncating it would).
fn cut(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// `big_checkpoint` converted to F16 under `root`: (checkpoint, LLM GGUF, mmproj GGUF).
fn big_f16_files(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let big = big_checkpoint(root);
    let f16 = root.join("f16");
    convert(&big, Some(&common::tower()), &f16, &[]).ok();
    let (llm, mmproj) = (f16.join("ckpt-F16.gguf"), f16.join("mmproj-ckpt-F16.gguf"));
    assert!(llm.is_file() && mmproj.is_file());
    (big, llm, mmproj)
}

/// Issue #16 item 7: an input GGUF that shrinks while quantize maps it (SIGBUS) gives an error
/// naming it, exit 1, and no partial file; the process is not killed by the signal.
#[test]
fn input_shrinking_during_quantize_is_an_error() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempdir();
    let (_, input, _) = big_f16_files(tmp.path());
    let out = tmp.path().join("q");
    std::fs::create_dir(&out).unwrap();
    let a = args([
        "quantize".into(),
        "--type".into(),
        "Q4_K_M".into(),
        os(&input),
        "-o".into(),
        os(&out.join("ckpt-Q4_K_M.gguf")),
        "-q".into(),
    ]);
    let len = std::fs::metadata(&input).unwrap().len();
    let pristine = tmp.path().join("pristine.gguf");
    std::fs::copy(&input, &pristine).unwrap();
    // On a loaded machine the cut can come after quantize has read its last byte: that run
    // succeeds (exit 0, nothing to detect), so it is run again from an intact input.
    for _ in 0..5 {
        std::fs::copy(&pristine, &input).unwrap();
        // Keep the header and tensor infos, drop most of the data.
        let (status, stderr) = signal_mid_write(&a, tmp.path(), &out, 0, |_| cut(&input, len / 8));
        assert_eq!(status.signal(), None, "killed by a signal: {stderr}");
        if status.code() == Some(0) {
            eprintln!("quantize had read its input before the cut; retrying");
            for n in dir_names(&out) {
                std::fs::remove_file(out.join(n)).unwrap();
            }
            continue;
        }
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("ckpt-F16.gguf") && stderr.contains("shrank"),
            "{stderr}"
        );
        assert_eq!(dir_names(&out), Vec::<String>::new());
        return;
    }
    panic!("quantize always read its whole input before the cut");
}

/// Issue #16 item 7, verify: the artefact shrinks once verify has mapped it. Whether the cut
/// lands under a read of the map (SIGBUS) or before a length check, verify ends with exit 1
/// naming the file; it is never killed by the signal.
#[test]
fn input_shrinking_during_verify_is_an_error() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempdir();
    let (big, input, mmproj) = big_f16_files(tmp.path());
    let len = std::fs::metadata(&input).unwrap().len();
    let mut child = std::process::Command::new(BIN)
        .args(args([
            "verify".into(),
            os(&big),
            "--vision-tower".into(),
            os(&common::tower()),
            "--gguf".into(),
            os(&input),
            "--mmproj".into(),
            os(&mmproj),
            "--exact-only".into(),
            "-q".into(),
        ]))
        .current_dir(tmp.path())
        .env("RAYON_NUM_THREADS", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let maps = format!("/proc/{}/maps", child.id());
    let needle = input.to_string_lossy().into_owned();
    let t0 = std::time::Instant::now();
    let mut cut_done = false;
    while child.try_wait().unwrap().is_none() && t0.elapsed() < RUN_TIMEOUT {
        if std::fs::read_to_string(&maps).is_ok_and(|m| m.contains(&needle)) {
            cut(&input, len / 8);
            cut_done = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        cut_done,
        "verify never mapped the artefact: {:?} {stderr}",
        out.status
    );
    assert_eq!(out.status.signal(), None, "killed by a signal: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ckpt-F16.gguf"), "{stderr}");
    eprintln!(
        "verify on a shrinking artefact: {}",
        stderr.trim().replace('\n', " / ")
    );
}

/// Issue #16 item 9: two runs writing the same names into one directory at once. Whichever
/// commits last, the files on disk are one run's complete set: each output's sha256 is the one
/// its manifest beside it records.
#[test]
fn concurrent_writers_leave_a_consistent_set() {
    let tmp = tempdir();
    let a = tmp.path().join("a");
    copy_dir(&common::ckpt(), &a);
    // A second checkpoint with other bytes (one norm weight changed) and the same output names.
    let b = tmp.path().join("b");
    copy_dir(&common::ckpt(), &b);
    let mut st = StFile::read(&b.join(SHARD2));
    let t = st
        .tensors
        .iter_mut()
        .find(|t| t.name.ends_with("norm.weight"))
        .unwrap();
    t.data[0] ^= 1;
    st.write(&b.join(SHARD2));
    let out = tmp.path().join("out");
    let cmd = |ck: &Path| {
        let mut c = std::process::Command::new(BIN);
        c.args([
            os(Path::new("hf-to-gguf")),
            os(ck),
            "--vision-tower".into(),
            os(&common::tower()),
            "--out-dir".into(),
            os(&out),
            "--name".into(),
            "m".into(),
            "-q".into(),
        ])
        .current_dir(tmp.path())
        .env("RAYON_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
        c
    };
    for round in 0..25 {
        let (pa, pb) = (cmd(&a).spawn().unwrap(), cmd(&b).spawn().unwrap());
        for p in [pa, pb] {
            let o = p.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let m: Json =
            serde_json::from_slice(&std::fs::read(out.join("m-F16.manifest.json")).unwrap())
                .unwrap();
        for o in m["outputs"].as_array().unwrap() {
            let p = out.join(Path::new(o["path"].as_str().unwrap()).file_name().unwrap());
            let (_, sha) = mmfuser_convert::ground::digest::sha256_file(&p).unwrap();
            assert_eq!(
                sha,
                o["sha256"].as_str().unwrap(),
                "round {round}: {} is not the file its manifest describes",
                p.display()
            );
        }
        assert!(temps(&out).is_empty(), "{:?}", dir_names(&out));
    }
}

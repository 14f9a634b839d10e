//! Writing files safely: everything goes to a temporary file in the destination directory
//! and is renamed into place only when complete, so a crash or an error never leaves a
//! half-written file under the final name.
use crate::ground::error::{Error, IoContext, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Prefix of every temporary file we create; `cleanup_stale_temps` removes old ones.
pub const TEMP_MARK: &str = ".mmfuser-partial-";

/// Alignment for direct I/O (covers 512-byte and 4 KiB logical blocks) and the page size.
pub const PAGE: usize = 4096;
/// Set to 1 to read and write through the page cache (comparisons, odd filesystems).
pub const ENV_NO_DIRECT: &str = "MMFUSER_NO_DIRECT_IO";

/// Direct I/O unless the environment says MMFUSER_NO_DIRECT_IO=1.
pub fn direct_io_wanted() -> bool {
    std::env::var(ENV_NO_DIRECT).map_or(true, |v| v != "1")
}

/// Switch O_DIRECT on an open file; false where the filesystem refuses it.
#[cfg(target_os = "linux")]
pub fn set_direct(f: &File, on: bool) -> bool {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor we own only reads or changes status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return false;
        }
        let want = if on {
            flags | libc::O_DIRECT
        } else {
            flags & !libc::O_DIRECT
        };
        libc::fcntl(fd, libc::F_SETFL, want) == 0
    }
}

#[cfg(not(target_os = "linux"))]
pub fn set_direct(_f: &File, _on: bool) -> bool {
    false
}

/// A page-aligned buffer of fixed capacity (a multiple of PAGE) holding `len` bytes: a window
/// into an over-allocated Vec (alignment without unsafe code). Direct I/O reads and writes it.
pub struct PageBuf {
    raw: Vec<u8>,
    off: usize,
    cap: usize,
    pub len: usize,
}

impl PageBuf {
    pub fn new(cap: usize) -> Self {
        debug_assert!(cap.is_multiple_of(PAGE));
        let raw = vec![0u8; cap + PAGE];
        let off = raw.as_ptr().align_offset(PAGE);
        PageBuf {
            raw,
            off,
            cap,
            len: 0,
        }
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    pub fn data(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
    /// The data padded with stale bytes to a whole number of pages (for a direct write).
    pub fn padded(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len.next_multiple_of(PAGE)]
    }
    /// The whole buffer, for a read into it.
    pub fn all_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.cap]
    }
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.raw[self.off + self.len..self.off + self.cap]
    }
    pub fn is_full(&self) -> bool {
        self.len == self.cap
    }
}

/// Fill `buf` from `offset` of `f` (less only at the end of the file): the direct-I/O read under
/// the checkpoint stream. Returns the bytes read; switches `f` (and `direct`) to cached reads if
/// the filesystem refuses a direct one or a short read leaves an unaligned position.
pub fn read_full_at(
    f: &mut std::fs::File,
    direct: &mut bool,
    offset: u64,
    buf: &mut PageBuf,
) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let space = buf.all_mut();
    let mut got = 0;
    while got < space.len() {
        match f.read_at(&mut space[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A short direct read leaves an unaligned position; so does a refusing filesystem.
            Err(e) if *direct && e.raw_os_error() == Some(libc::EINVAL) => {
                set_direct(f, false);
                *direct = false;
            }
            Err(e) => return Err(e),
        }
        if *direct && !got.is_multiple_of(PAGE) && got < space.len() {
            set_direct(f, false);
            *direct = false;
        }
    }
    Ok(got)
}

/// Drop the mapped pages covering bytes `start..end` of a read-only file map from this process:
/// they stay in the page cache and a later access re-reads them. Keeps resident memory near
/// what is in use while a large mapped file is read piece by piece. `start` need not be
/// page-aligned (the page holding it is dropped too; a neighbour's use just re-reads it).
pub fn drop_mapped_pages(map: &memmap2::Mmap, start: usize, end: usize) {
    let s = start / PAGE * PAGE;
    if end > s {
        // SAFETY: a read-only map of clean file pages; dropping them only forces a re-read.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, end - s) };
    }
}

/// An error while writing `dest` through its temporary file: named by the file the user asked
/// for, with the temporary name (already removed by then) as a detail.
pub fn write_error(dest: &Path, tmp: &Path, e: std::io::Error) -> Error {
    let note = format!(
        "{e} (while writing its temporary file {}, now removed)",
        tmp.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    Error::io(dest, std::io::Error::new(e.kind(), note))
}

/// What a path that exists but cannot be used is, for messages: a symlink loop, or its kind.
fn describe_existing(path: &Path) -> Option<String> {
    let lmeta = std::fs::symlink_metadata(path).ok()?;
    let kind = match std::fs::metadata(path) {
        Err(e) if lmeta.file_type().is_symlink() && e.raw_os_error() == Some(libc::ELOOP) => {
            return Some("a symbolic link loop".into())
        }
        Err(_) => return None, // a dangling link: nothing there yet
        Ok(m) => m.file_type(),
    };
    use std::os::unix::fs::FileTypeExt;
    Some(
        if kind.is_dir() {
            "a directory"
        } else if kind.is_file() {
            "a regular file"
        } else if kind.is_fifo() {
            "a named pipe"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        }
        .into(),
    )
}

/// Refuse an output file name that exists as anything but a regular file: the rename would
/// replace a device node (`-o /dev/null` as root), a FIFO or a directory entry of another kind.
pub fn check_dest(dest: &Path) -> Result<()> {
    match describe_existing(dest) {
        Some(k) if k != "a regular file" => Err(Error::input(
            dest,
            format!(
                "exists and is {k}; refusing to replace it (give a regular file or a new name)"
            ),
        )),
        _ => Ok(()),
    }
}

/// Create the output directory (and its parents), with a clear message when the path is
/// taken by something else (a file, a symlink loop) instead of the OS's "File exists".
pub fn create_out_dir(dir: &Path) -> Result<()> {
    match describe_existing(dir) {
        Some(k) if k == "a directory" => Ok(()),
        Some(k) => Err(Error::input(
            dir,
            format!("output directory: the path exists and is {k}"),
        )),
        None => std::fs::create_dir_all(dir).at(dir),
    }
}

/// A file being written. Dropped without `commit` => the temporary file is removed.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<File>,
    /// Where the temporary name is registered for removal on a fatal signal.
    slot: Option<usize>,
}

impl AtomicFile {
    pub fn create(dest: impl AsRef<Path>) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest
            .file_name()
            .ok_or_else(|| Error::input(&dest, "destination has no file name"))?
            .to_string_lossy()
            .to_string();
        check_dest(&dest)?;
        let tmp = dir.join(format!("{TEMP_MARK}{}-{name}", std::process::id()));
        // A new file, never an existing one: the name is predictable, so in a shared directory
        // a symlink planted under it would otherwise make us write through it. One left by an
        // earlier process with our (reused) pid is removed (the link itself, not its target).
        let create = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
        };
        let mut tries = 0;
        let file = loop {
            let file = match create() {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::remove_file(&tmp).at(&tmp)?;
                    create()
                }
                r => r,
            }
            .at(&tmp)?;
            // The lock tells other runs (in any PID namespace) that this file is live. A
            // cleaner may have locked and removed it between our create and our lock: then
            // the name no longer leads to our file, and we start again.
            lock(&file, true).at(&tmp)?;
            if same_file(&file, &tmp) {
                break file;
            }
            tries += 1;
            if tries == 3 {
                return Err(Error::io(
                    &tmp,
                    std::io::Error::other("temporary file removed as soon as created"),
                ));
            }
        };
        let slot = signals::register_temp(&tmp);
        Ok(AtomicFile {
            tmp,
            dest,
            file: Some(file),
            slot,
        })
    }
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file is open until commit")
    }
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }
    pub fn dest(&self) -> &Path {
        &self.dest
    }
    /// A write error, named by the destination (see [`write_error`]).
    pub fn error(&self, e: std::io::Error) -> Error {
        write_error(&self.dest, &self.tmp, e)
    }
    /// Flush, fsync and rename into place (the file stays open, and so locked, until renamed).
    pub fn commit(mut self) -> Result<PathBuf> {
        let f = self.file.take().expect("commit once");
        let done = match f.sync_all() {
            Err(e) => Err(write_error(&self.dest, &self.tmp, e)),
            Ok(()) => check_dest(&self.dest)
                .and_then(|_| std::fs::rename(&self.tmp, &self.dest).at(&self.dest)),
        };
        if done.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        signals::unregister_temp(self.slot.take());
        drop(f);
        done.map(|_| self.dest.clone())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            let _ = std::fs::remove_file(&self.tmp);
            signals::unregister_temp(self.slot.take());
            drop(f);
        }
    }
}

/// flock: exclusive, without waiting (`nonblocking`) or waiting for it.
fn lock(f: &impl std::os::fd::AsRawFd, nonblocking: bool) -> std::io::Result<()> {
    let op = libc::LOCK_EX | if nonblocking { libc::LOCK_NB } else { 0 };
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether `path` still names the open file `f` (same device and inode).
fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file().flush()
    }
}

/// Open an input file for reading, refusing anything but a regular file (after symlinks): a
/// named pipe would block the open forever, a device or directory cannot be mapped. The open
/// itself does not block (O_NONBLOCK, cleared again), so a file swapped for a FIFO between the
/// check and the open is refused too: the kind is judged on the opened descriptor.
pub fn open_input(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).at(path)?;
    refuse_non_file(path, &meta)?;
    let f = open_nonblocking(path).at(path)?;
    refuse_non_file(path, &f.metadata().at(path)?)?;
    Ok(f)
}

fn refuse_non_file(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    if meta.is_file() {
        return Ok(());
    }
    let kind = if meta.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    Err(Error::input(path, format!("is {kind} (expected a file)")))
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor we own only changes status flags.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

/// Size caps of inputs read whole into memory (each far above any real file of its kind): a
/// larger file is refused before it is read, so memory stays bounded.
pub const CAP_CONFIG: u64 = 16 << 20; // config.json, preprocessor_config.json, ...
pub const CAP_INDEX: u64 = 64 << 20; // *.index.json
pub const CAP_TOKENIZER: u64 = 64 << 20; // tokenizer.json, tokenizer.model
pub const CAP_PROBE: u64 = 64 << 20; // verify's --input-ids, --pixel-values

/// Read a whole regular file of at most `cap` bytes (see [`open_input`]).
pub fn read_input(path: &Path, cap: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = open_input(path)?;
    let len = f.metadata().at(path)?.len();
    let too_big = |n: u64| {
        Error::input(
            path,
            format!("is {n} bytes; more than the {cap} bytes accepted for this file"),
        )
    };
    if len > cap {
        return Err(too_big(len));
    }
    let mut v = Vec::with_capacity(len as usize);
    f.take(cap + 1).read_to_end(&mut v).at(path)?;
    if v.len() as u64 > cap {
        return Err(too_big(v.len() as u64)); // it grew while being read
    }
    Ok(v)
}

/// [`read_input`] as UTF-8 text.
pub fn read_input_text(path: &Path, cap: u64) -> Result<String> {
    String::from_utf8(read_input(path, cap)?)
        .map_err(|e| Error::input(path, format!("is not UTF-8 text: {e}")))
}

/// Write a whole small file atomically.
pub fn write_atomic(dest: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(dest)?;
    if let Err(e) = f.write_all(bytes) {
        return Err(f.error(e));
    }
    f.commit()?;
    Ok(())
}

/// Rename complete files into place, in order. If one rename fails, the ones already renamed
/// are removed again, so a set of files (artefacts + their manifest) appears all or nothing.
/// Every file was fully written and fsynced before the first rename, so what can still fail
/// here is a rename alone (rare: no data is written).
pub fn commit_all(files: Vec<AtomicFile>) -> Result<Vec<PathBuf>> {
    // One writer at a time renames a set into a directory: two runs writing the same names
    // would otherwise interleave (one run's LLM with the other's manifest). The lock is on the
    // directory itself (nothing is created); a second run waits for the first's renames.
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| match f.dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let mut held = vec![];
    for d in &dirs {
        let f = File::open(d).at(d)?;
        lock(&f, false).at(d)?;
        held.push(f);
    }
    // A fatal signal during the renames waits for the set to be complete (see `signals`).
    let _hold = signals::hold();
    let r = commit_renames(files);
    drop(held);
    r
}

fn commit_renames(files: Vec<AtomicFile>) -> Result<Vec<PathBuf>> {
    let mut done: Vec<PathBuf> = vec![];
    for f in files {
        match f.commit() {
            Ok(p) => done.push(p),
            Err(e) => {
                for p in &done {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Remove temporary files left by a killed earlier run: those no process holds the lock of
/// (a live writer, in any PID namespace, keeps its temporary file locked until it renames it).
pub fn cleanup_stale_temps(dir: &Path) -> Vec<PathBuf> {
    let mut removed = vec![];
    let Ok(rd) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().starts_with(TEMP_MARK) {
            continue;
        }
        let path = e.path();
        // The lock (when there is one) is held until the file is gone: no writer claims it meanwhile.
        if let Some(_lock) = stale(&path) {
            if std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

/// A temporary file nobody holds: we get its lock (and it is still the file under that name);
/// Some(the locked file). Anything but a regular file under our prefix (a planted link or
/// FIFO) is never a writer's: Some(None).
fn stale(path: &Path) -> Option<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Some(None),
        Err(_) => return None,
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    (lock(&f, true).is_ok() && same_file(&f, path)).then_some(Some(f))
}

/// Fatal signals. SIGINT, SIGTERM and SIGHUP remove this process's temporary files and then
/// end it as the signal would have. SIGBUS, raised when a memory-mapped input shrinks while it
/// is read, is reported against that file, the temporary files are removed and the process
/// exits with 1, the code of every bad input (`Error::exit_code`). The handlers only use async-signal-safe calls
/// (unlink, write, _exit, raise) on paths registered beforehand as C strings.
pub mod signals {
    use std::ffi::{c_char, c_int, c_void, CString};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicUsize, Ordering::SeqCst};

    const SLOTS: usize = 64;
    const MAPS: usize = 256;
    #[allow(clippy::declare_interior_mutable_const)]
    const NULL: AtomicPtr<c_char> = AtomicPtr::new(std::ptr::null_mut());
    #[allow(clippy::declare_interior_mutable_const)]
    const ZERO: AtomicUsize = AtomicUsize::new(0);
    /// Temporary files to remove on a fatal signal.
    static TEMPS: [AtomicPtr<c_char>; SLOTS] = [NULL; SLOTS];
    /// Memory-mapped inputs: start, length, path (a ring, newest last).
    static MAP_START: [AtomicUsize; MAPS] = [ZERO; MAPS];
    static MAP_LEN: [AtomicUsize; MAPS] = [ZERO; MAPS];
    static MAP_PATH: [AtomicPtr<c_char>; MAPS] = [NULL; MAPS];
    static MAP_NEXT: AtomicUsize = AtomicUsize::new(0);
    /// Set while a set of files is being renamed into place; a signal then waits for it.
    static HOLDING: AtomicBool = AtomicBool::new(false);
    static PENDING: AtomicI32 = AtomicI32::new(0);

    fn c_path(p: &Path) -> *mut c_char {
        CString::new(p.as_os_str().as_bytes())
            .map(CString::into_raw)
            .unwrap_or(std::ptr::null_mut())
    }

    /// Remember a temporary file for removal on a fatal signal (None when all slots are used).
    pub fn register_temp(p: &Path) -> Option<usize> {
        let c = c_path(p);
        for (i, s) in TEMPS.iter().enumerate() {
            if s.compare_exchange(std::ptr::null_mut(), c, SeqCst, SeqCst)
                .is_ok()
            {
                return Some(i);
            }
        }
        // SAFETY: `c` came from CString::into_raw above and was not stored.
        drop(unsafe { CString::from_raw(c) });
        None
    }

    /// Forget a temporary file (renamed or removed). The string is not freed: a handler running
    /// on another thread may be reading it (a few bytes per output file).
    pub fn unregister_temp(slot: Option<usize>) {
        if let Some(i) = slot {
            TEMPS[i].store(std::ptr::null_mut(), SeqCst);
        }
    }

    /// Remember a memory map of an input file, so that a SIGBUS inside it names the file.
    pub fn register_map(start: *const u8, len: usize, p: &Path) {
        let i = MAP_NEXT.fetch_add(1, SeqCst) % MAPS;
        MAP_LEN[i].store(0, SeqCst);
        MAP_PATH[i].store(c_path(p), SeqCst); // the old string leaks (see unregister_temp)
        MAP_START[i].store(start as usize, SeqCst);
        MAP_LEN[i].store(len, SeqCst);
    }

    /// While held, SIGINT/SIGTERM/SIGHUP wait (the renames of one set finish first).
    pub struct Hold(());
    pub fn hold() -> Hold {
        HOLDING.store(true, SeqCst);
        Hold(())
    }
    impl Drop for Hold {
        fn drop(&mut self) {
            HOLDING.store(false, SeqCst);
            let sig = PENDING.swap(0, SeqCst);
            if sig != 0 {
                die(sig);
            }
        }
    }

    fn unlink_temps() {
        for s in &TEMPS {
            let p = s.load(SeqCst);
            if !p.is_null() {
                // SAFETY: a NUL-terminated string that is never freed.
                unsafe { libc::unlink(p) };
            }
        }
    }

    fn write_err(b: &[u8]) {
        // SAFETY: write(2) of a valid buffer.
        unsafe { libc::write(2, b.as_ptr() as *const c_void, b.len()) };
    }

    /// Remove the temporary files, then end as `sig` would by default.
    fn die(sig: c_int) {
        unlink_temps();
        // SAFETY: resetting a disposition and raising are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }

    extern "C" fn on_term(sig: c_int) {
        if HOLDING.load(SeqCst) {
            PENDING.store(sig, SeqCst);
            return;
        }
        die(sig);
    }

    extern "C" fn on_bus(sig: c_int, info: *mut libc::siginfo_t, _: *mut c_void) {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
        let addr = unsafe { (*info).si_addr() } as usize;
        let n = MAP_NEXT.load(SeqCst);
        let found = (0..MAPS.min(n)).map(|k| (n - 1 - k) % MAPS).find(|&i| {
            let (s, l) = (MAP_START[i].load(SeqCst), MAP_LEN[i].load(SeqCst));
            l > 0 && addr >= s && addr - s < l
        });
        let Some(i) = found else {
            // Not one of our inputs: a real fault, which must not be hidden.
            // SAFETY: as in `die`; returning re-runs the faulting access with the default action.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
            return;
        };
        unlink_temps();
        write_err(b"error: ");
        let p = MAP_PATH[i].load(SeqCst);
        if !p.is_null() {
            // SAFETY: a NUL-terminated string that is never freed.
            let len = unsafe { libc::strlen(p) };
            write_err(unsafe { std::slice::from_raw_parts(p as *const u8, len) });
        }
        write_err(b": the file shrank while it was being read (SIGBUS on its memory map); nothing was written\n");
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(1) };
    }

    /// Install the handlers (once, at start).
    pub fn install() {
        // SAFETY: sigaction with handlers that only make async-signal-safe calls.
        unsafe {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_term as extern "C" fn(c_int) as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction =
                on_bus as extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
    }
}

/// Map an input file read-only and register the map, so that a SIGBUS (the file shrank under
/// us) is reported against the file instead of killing the process without a word.
pub fn map_input(file: &File, path: &Path) -> Result<memmap2::Mmap> {
    // SAFETY: a read-only map of a file we only read; a concurrent truncation raises SIGBUS,
    // which `signals` turns into an error naming the file.
    let map = unsafe { memmap2::Mmap::map(file) }.at(path)?;
    signals::register_map(map.as_ptr(), map.len(), path);
    Ok(map)
}

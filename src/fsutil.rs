//! Writing files safely: everything goes to a temporary file in the destination directory
//! and is renamed into place only when complete, so a crash or an error never leaves a
//! half-written file under the final name.
use crate::error::{Error, IoContext, Result};
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

/// A file being written. Dropped without `commit` => the temporary file is removed.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<File>,
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
        let file = match create() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&tmp).at(&tmp)?;
                create()
            }
            r => r,
        }
        .at(&tmp)?;
        Ok(AtomicFile {
            tmp,
            dest,
            file: Some(file),
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
    /// Flush, fsync and rename into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        let f = self.file.take().expect("commit once");
        if let Err(e) = f.sync_all() {
            return Err(write_error(&self.dest, &self.tmp, e));
        }
        drop(f);
        std::fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
        Ok(self.dest.clone())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
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
/// named pipe would block the open forever, a device or directory cannot be mapped.
pub fn open_input(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).at(path)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Error::input(path, format!("is {kind} (expected a file)")));
    }
    File::open(path).at(path)
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

/// Remove temporary files left by a killed earlier run (their process no longer exists).
pub fn cleanup_stale_temps(dir: &Path) -> Vec<PathBuf> {
    let mut removed = vec![];
    let Ok(rd) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(TEMP_MARK) else {
            continue;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive && std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

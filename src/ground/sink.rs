//! The byte stream under the GGUF writer (and `synth`'s safetensors): a fixed pool of page-aligned
//! buffers that the producer fills, a thread that sha256-hashes them (unless made `unhashed`), and
//! a thread that writes them with direct I/O.
//!
//! Why not a `BufWriter`: at 7B scale, copying 13 GB through the page cache (write() into freshly
//! allocated cache pages, then writeback) cost as much CPU as the conversion itself; O_DIRECT
//! DMA's straight from our buffers, and recycling a few buffers means no page faults or zeroing.
//! Hashing and writing on two threads overlap with the producer and with each other (a direct
//! write blocks until the device has the data).
//!
//! Direct I/O needs the buffer address, length and file offset aligned to the device block: full
//! buffers are multiples of [`PAGE`] and written at multiples of it; the last, partial buffer is
//! written padded to a page and the file is then cut to its true length. Where the filesystem
//! refuses O_DIRECT (tmpfs, some network filesystems) the same code writes through the cache.
use crate::ground::fsutil::{direct_io_wanted, set_direct, AtomicFile, PageBuf, PAGE};
use sha2::{Digest, Sha256};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// One buffer; a multiple of PAGE and of every element size (2, 4 bytes).
pub const CHUNK: usize = 8 << 20;
/// Buffers in flight: one being filled, one being hashed, one being written, one spare.
const BUFFERS: usize = 4;

/// What the two threads leave behind: the file (None after a write error), bytes, digest, error.
pub struct SinkEnd {
    pub file: Option<AtomicFile>,
    /// None when the sink was made without hashing (or the hashing thread failed).
    pub sha256: Option<Sha256>,
    pub error: Option<std::io::Error>,
    /// Whether any buffer went out with direct I/O.
    pub direct: bool,
}

/// The writer thread's result: the file (None after an error), the error, whether any buffer
/// went out with direct I/O.
type WriterEnd = (Option<AtomicFile>, Option<std::io::Error>, bool);

pub struct Sink {
    cur: Option<PageBuf>,
    to_hash: Option<SyncSender<PageBuf>>,
    pool: Receiver<PageBuf>,
    hasher: Option<JoinHandle<Option<Sha256>>>,
    writer: Option<JoinHandle<WriterEnd>>,
}

impl Sink {
    /// Hashed; direct I/O unless MMFUSER_NO_DIRECT_IO=1.
    pub fn new(file: AtomicFile) -> Self {
        Self::with_options(file, direct_io_wanted(), true)
    }

    /// Not hashed (bulk data nobody records a digest of: `synth`); direct I/O as in `new`.
    pub fn unhashed(file: AtomicFile) -> Self {
        Self::with_options(file, direct_io_wanted(), false)
    }

    pub fn with_options(mut file: AtomicFile, try_direct: bool, hash: bool) -> Self {
        let (to_hash, hash_rx) = sync_channel::<PageBuf>(BUFFERS);
        let (to_write, write_rx) = sync_channel::<PageBuf>(BUFFERS);
        let (to_pool, pool) = sync_channel::<PageBuf>(BUFFERS);
        for _ in 1..BUFFERS {
            to_pool.send(PageBuf::new(CHUNK)).expect("pool has room");
        }
        let hasher = std::thread::spawn(move || {
            let mut h = hash.then(Sha256::new);
            for b in hash_rx {
                if let Some(h) = h.as_mut() {
                    h.update(b.data());
                }
                if to_write.send(b).is_err() {
                    break; // the writer stopped on an error; join reports it
                }
            }
            h
        });
        let writer = std::thread::spawn(move || {
            let mut direct = try_direct && set_direct(file.file(), true);
            let mut any_direct = false;
            let mut pos = 0u64;
            let mut padded = false;
            for mut b in write_rx {
                if let Err(e) = write_at(file.file(), &mut direct, pos, &b, &mut padded) {
                    return (None, Some(e), false); // dropping `file` removes the temporary file
                }
                any_direct |= direct;
                pos += b.len as u64;
                b.len = 0;
                let _ = to_pool.send(b);
            }
            if padded {
                if let Err(e) = file.file().set_len(pos) {
                    return (None, Some(e), false);
                }
            }
            if direct {
                set_direct(file.file(), false);
            }
            (Some(file), None, any_direct)
        });
        Sink {
            cur: Some(PageBuf::new(CHUNK)),
            to_hash: Some(to_hash),
            pool,
            hasher: Some(hasher),
            writer: Some(writer),
        }
    }

    /// The buffer being filled; None once the threads have stopped on an error.
    pub fn current(&mut self) -> Option<&mut PageBuf> {
        self.cur.as_mut()
    }

    /// Record `n` bytes written into `current().spare()`; hands a full buffer on.
    /// False once the threads have stopped on an error (see `join`).
    pub fn advance(&mut self, n: usize) -> bool {
        let Some(cur) = self.cur.as_mut() else {
            return false;
        };
        cur.len += n;
        debug_assert!(cur.len <= cur.capacity());
        !cur.is_full() || self.send()
    }

    fn send(&mut self) -> bool {
        let Some(cur) = self.cur.take() else {
            return false;
        };
        if cur.len == 0 {
            self.cur = Some(cur);
            return true;
        }
        if self.to_hash.as_ref().is_none_or(|tx| tx.send(cur).is_err()) {
            return false;
        }
        self.cur = self.pool.recv().ok();
        self.cur.is_some()
    }

    /// Append a copy of `bytes`.
    pub fn put(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let Some(cur) = self.cur.as_mut() else {
                return false;
            };
            let spare = cur.spare();
            let k = spare.len().min(bytes.len());
            spare[..k].copy_from_slice(&bytes[..k]);
            bytes = &bytes[k..];
            if !self.advance(k) {
                return false;
            }
        }
        true
    }

    /// Append `n` bytes produced in place, straight into the buffers: `fill(offset, dst)` writes
    /// the data's bytes `offset..offset + dst.len()`, every `dst` a whole number of `unit`s (the
    /// element size), so a producer never sees a split element. Ok(false) once the threads have
    /// stopped on an error (see `join`); `fill`'s own error is passed on.
    pub fn put_with<E>(
        &mut self,
        n: usize,
        unit: usize,
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let unit = unit.max(1);
        let mut done = 0;
        while done < n {
            let Some(cur) = self.cur.as_mut() else {
                return Ok(false);
            };
            let spare = cur.spare();
            let k = (spare.len() / unit * unit).min(n - done);
            if k == 0 {
                // Less than one element of room left in this buffer: go through a small copy.
                let mut one = vec![0u8; unit.min(n - done)];
                fill(done, &mut one)?;
                if !self.put(&one) {
                    return Ok(false);
                }
                done += one.len();
                continue;
            }
            fill(done, &mut spare[..k])?;
            if !self.advance(k) {
                return Ok(false);
            }
            done += k;
        }
        Ok(true)
    }

    /// Send what is buffered, stop both threads and collect the file and the digest.
    pub fn join(&mut self) -> SinkEnd {
        let sent = self.send();
        self.to_hash = None;
        let hashed = self.hasher.take().map(JoinHandle::join);
        let hasher_ok = matches!(hashed, Some(Ok(_)));
        let sha256 = hashed.and_then(Result::ok).flatten();
        let (file, error, direct) = match self.writer.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => (
                None,
                Some(std::io::Error::other("writer thread failed")),
                false,
            ),
        };
        let error = match (error, sent, &file, hasher_ok) {
            (Some(e), ..) => Some(e),
            (None, true, Some(_), true) => None,
            _ => Some(std::io::Error::other("writer thread failed")),
        };
        SinkEnd {
            file,
            sha256,
            error,
            direct,
        }
    }
}

impl Drop for Sink {
    /// Wait for the threads, so that an abandoned file's temporary copy is gone before we return.
    fn drop(&mut self) {
        self.cur = None;
        self.to_hash = None;
        if let Some(h) = self.hasher.take() {
            let _ = h.join();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Positional write of one buffer: direct while offsets and lengths allow, else through the cache.
fn write_at(
    f: &mut std::fs::File,
    direct: &mut bool,
    pos: u64,
    b: &PageBuf,
    padded: &mut bool,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if *direct && pos.is_multiple_of(PAGE as u64) {
        let data = b.padded();
        match f.write_all_at(data, pos) {
            Ok(()) => {
                *padded |= data.len() != b.len;
                return Ok(());
            }
            // The filesystem or device refused this alignment: the rest goes through the cache
            // (rewriting this buffer from its start, so a partial direct write is covered).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                set_direct(f, false);
                *direct = false;
            }
            Err(e) => return Err(e),
        }
    } else if *direct {
        set_direct(f, false);
        *direct = false;
    }
    f.write_all_at(b.data(), pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns whether direct I/O was used. Hashed when `direct`, to cover both settings.
    fn roundtrip(dir: &std::path::Path, sizes: &[usize], direct: bool) -> bool {
        let dest = dir.join(format!("out-{direct}-{}.bin", sizes.len()));
        let f = AtomicFile::create(&dest).unwrap();
        let hash = direct;
        let mut s = Sink::with_options(f, direct, hash);
        let mut want = vec![];
        let mut x = 1u32;
        for &n in sizes {
            let piece: Vec<u8> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                    (x >> 24) as u8
                })
                .collect();
            assert!(s.put(&piece));
            want.extend_from_slice(&piece);
        }
        let end = s.join();
        assert!(end.error.is_none(), "{:?}", end.error);
        let digest = end.sha256.map(Sha256::finalize);
        end.file.unwrap().commit().unwrap();
        let got = std::fs::read(&dest).unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "file content differs");
        assert_eq!(digest.is_some(), hash, "a digest exactly when hashed");
        if let Some(d) = digest {
            assert_eq!(d, Sha256::digest(&want));
        }
        end.direct
    }

    /// Lengths around every boundary: empty, sub-page, page, chunk +- 1, several chunks + tail.
    #[test]
    fn bytes_and_digest_survive_every_boundary() {
        // Under target/ (a disk), not /tmp (tmpfs on some machines refuses O_DIRECT).
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let dir = tempfile::tempdir_in(&base).unwrap();
        let probe = std::fs::File::create(dir.path().join("probe")).unwrap();
        let fs_takes_direct = set_direct(&probe, true);
        for direct in [true, false] {
            let cases: [&[usize]; 5] = [
                &[],
                &[1],
                &[PAGE],
                &[CHUNK - 1, 1, 1],
                &[CHUNK, CHUNK + 1, 3, PAGE + 5, 2 * CHUNK + 17],
            ];
            for sizes in cases {
                let used = roundtrip(dir.path(), sizes, direct);
                // Where the filesystem takes O_DIRECT, the direct path must really have run.
                if direct && fs_takes_direct && !sizes.is_empty() {
                    assert!(used, "direct I/O not used for {sizes:?}");
                }
                if !direct {
                    assert!(!used);
                }
            }
        }
    }
}

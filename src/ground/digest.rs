//! File digests: sha256 of whole files (the manifest's input and output records, the checkpoint
//! stream's input hashes) and their hex spelling.
use crate::ground::error::{IoContext, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Paths in JSON (manifest, summaries): a non-UTF-8 path is written lossily (U+FFFD) instead
/// of failing the whole run after its outputs were written.
pub fn lossy_path<S: serde::Serializer>(p: &Path, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileHash {
    #[serde(serialize_with = "lossy_path")]
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// sha256 of a file, read through a memory map (no copy into a user buffer: the copy cost as much
/// as the hashing), its pages dropped from the process behind the hasher so resident memory stays small.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let f = crate::ground::fsutil::open_input(path)?;
    let len = f.metadata().at(path)?.len();
    let mut h = Sha256::new();
    if len == 0 {
        return Ok((0, hex(&h.finalize())));
    }
    let map = crate::ground::fsutil::map_input(&f, path)?;
    let _ = map.advise(memmap2::Advice::Sequential);
    const SLICE: usize = 32 << 20;
    for start in (0..map.len()).step_by(SLICE) {
        let end = (start + SLICE).min(map.len());
        h.update(&map[start..end]);
        crate::ground::fsutil::drop_mapped_pages(&map, start, end);
    }
    Ok((len, hex(&h.finalize())))
}

pub fn hash_files(paths: &[PathBuf]) -> Result<Vec<FileHash>> {
    paths
        .iter()
        .map(|p| {
            sha256_file(p).map(|(bytes, sha256)| FileHash {
                path: p.clone(),
                bytes,
                sha256,
            })
        })
        .collect()
}

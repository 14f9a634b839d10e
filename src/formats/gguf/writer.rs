//! Streaming GGUF v3 writer. Every tensor's size is known from its type and shape, so the
//! whole header (metadata + tensor infos with offsets) is written first and tensor data then
//! streams in order: memory holds one tensor at a time. Output goes to a temporary file that
//! is renamed into place only after the last byte (see `fsutil::AtomicFile`).
//! Hand-written: candle's writer needs every tensor in RAM and writes v2 (rust-crates.md §3).
use super::types::*;
use super::value::{encode_str, Metadata, Value};
use crate::ground::digest::hex;
use crate::ground::dtype::GgmlType;
use crate::ground::error::{Error, Result};
use crate::ground::fsutil::AtomicFile;
use crate::ground::sink::Sink;
use sha2::Digest;
use std::path::{Path, PathBuf};

/// One tensor as it will appear in the file. `ne` is GGUF order (ne[0] contiguous).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ne: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
    pub fn n_bytes(&self) -> Result<u64> {
        if self.ne.first().copied().unwrap_or(1) % self.ty.block_size() as u64 != 0 {
            return Err(Error::other(format!(
                "tensor '{}': row length {} is not a multiple of the {} block size {}",
                self.name,
                self.ne[0],
                self.ty,
                self.ty.block_size()
            )));
        }
        self.ty
            .bytes_for(self.n_elements())
            .ok_or_else(|| Error::other(format!("tensor '{}': size overflow", self.name)))
    }
}

pub fn align_offset(x: u64, alignment: u64) -> u64 {
    x + (alignment - x % alignment) % alignment
}

/// Validate names, dims and types, then lay out offsets. Returns (header bytes, data offsets).
pub fn encode_header(meta: &Metadata, tensors: &[TensorInfo]) -> Result<(Vec<u8>, Vec<u64>)> {
    let alignment = match meta.get("general.alignment") {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(v) => {
            return Err(Error::other(format!(
                "general.alignment must be a UINT32 power of two, got {v:?}"
            )))
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    out.extend_from_slice(&GGUF_MAGIC);
    out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta.entries {
        encode_str(k, &mut out);
        out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
        v.encode(&mut out);
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        if t.name.len() >= GGML_MAX_NAME {
            return Err(Error::other(format!(
                "tensor name '{}' is longer than {} bytes",
                t.name,
                GGML_MAX_NAME - 1
            )));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(Error::other(format!("duplicate tensor name '{}'", t.name)));
        }
        if t.ne.is_empty() || t.ne.len() > GGML_MAX_DIMS {
            return Err(Error::other(format!(
                "tensor '{}' has {} dimensions",
                t.name,
                t.ne.len()
            )));
        }
        encode_str(&t.name, &mut out);
        out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ty.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = align_offset(offset + t.n_bytes()?, alignment);
    }
    let padded = align_offset(out.len() as u64, alignment) as usize;
    out.resize(padded, 0);
    Ok((out, offsets))
}

/// Where a tensor's encoded bytes go: the GGUF writer, or a plain Vec (tests, in-memory use).
pub trait DataSink {
    fn put(&mut self, bytes: &[u8]) -> Result<()>;
    /// `n` bytes produced in place by `fill(offset, dst)`, each `dst` a whole number of `unit`s
    /// (see [`GgufWriter::put_data_with`]).
    fn put_with(
        &mut self,
        n: usize,
        unit: usize,
        fill: &mut dyn FnMut(usize, &mut [u8]) -> Result<()>,
    ) -> Result<()>;
}

impl DataSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
    fn put_with(
        &mut self,
        n: usize,
        _unit: usize,
        fill: &mut dyn FnMut(usize, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let start = self.len();
        self.resize(start + n, 0);
        fill(0, &mut self[start..])
    }
}

impl DataSink for GgufWriter {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.put_data(bytes)
    }
    fn put_with(
        &mut self,
        n: usize,
        unit: usize,
        fill: &mut dyn FnMut(usize, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.put_data_with(n, unit, fill)
    }
}

/// Writes one GGUF file: header at creation, then `write_tensor` for each tensor in order.
pub struct GgufWriter {
    sink: Sink,
    tmp: PathBuf,
    dest: PathBuf,
    tensors: Vec<TensorInfo>,
    next: usize,
    alignment: u64,
    written: u64,
    tensor_start: u64,
}

impl GgufWriter {
    pub fn create(dest: &Path, meta: &Metadata, tensors: Vec<TensorInfo>) -> Result<Self> {
        let (header, _) =
            encode_header(meta, &tensors).map_err(|e| Error::input(dest, e.to_string()))?;
        let alignment = meta
            .get("general.alignment")
            .and_then(Value::as_u32)
            .map(u64::from)
            .unwrap_or(GGUF_DEFAULT_ALIGNMENT);
        let file = AtomicFile::create(dest)?;
        let tmp = file.temp_path().to_path_buf();
        let mut w = GgufWriter {
            sink: Sink::new(file),
            tmp,
            dest: dest.to_path_buf(),
            tensors,
            next: 0,
            alignment,
            written: 0,
            tensor_start: 0,
        };
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        if !self.sink.put(bytes) {
            return Err(self.sink_error());
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// The writer threads stopped: stop them for good and report why.
    fn sink_error(&mut self) -> Error {
        let e = self.sink.join().error;
        crate::ground::fsutil::write_error(
            &self.dest,
            &self.tmp,
            e.unwrap_or_else(|| std::io::Error::other("write failed")),
        )
    }

    /// The tensor expected next.
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.tensors.get(self.next)
    }

    /// Append the data of the next tensor in pieces: `begin_tensor`, `put_data`..., `end_tensor`.
    pub fn begin_tensor(&mut self, name: &str) -> Result<u64> {
        let t = self.tensors.get(self.next).ok_or_else(|| {
            Error::other(format!(
                "tensor '{name}' written after the last declared tensor"
            ))
        })?;
        if t.name != name {
            return Err(Error::other(format!(
                "tensor '{name}' written where '{}' was declared",
                t.name
            )));
        }
        self.tensor_start = self.written;
        t.n_bytes()
    }
    pub fn put_data(&mut self, data: &[u8]) -> Result<()> {
        self.put(data)
    }
    /// Append `n` bytes produced in place, straight into the output buffers (no intermediate
    /// copy); `fill` and `unit` as in [`Sink::put_with`].
    pub fn put_data_with(
        &mut self,
        n: usize,
        unit: usize,
        fill: impl FnMut(usize, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        if !self.sink.put_with(n, unit, fill)? {
            return Err(self.sink_error());
        }
        self.written += n as u64;
        Ok(())
    }
    pub fn end_tensor(&mut self) -> Result<()> {
        let t = &self.tensors[self.next];
        let want = t.n_bytes()?;
        let got = self.written - self.tensor_start;
        if got != want {
            return Err(Error::other(format!(
                "tensor '{}': {got} bytes written, {want} expected for {} {:?}",
                t.name, t.ty, t.ne
            )));
        }
        let pad = (align_offset(self.written, self.alignment) - self.written) as usize;
        self.put(&vec![0u8; pad])?;
        self.next += 1;
        Ok(())
    }

    /// Append the data of the next tensor (must be exactly its size).
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let want = self.begin_tensor(name)?;
        if data.len() as u64 != want {
            let t = &self.tensors[self.next];
            return Err(Error::other(format!(
                "tensor '{name}': {} bytes given, {want} expected for {} {:?}",
                data.len(),
                t.ty,
                t.ne
            )));
        }
        self.put(data)?;
        self.end_tensor()
    }

    /// Check every tensor was written, flush, fsync and rename into place. Returns (path, bytes, sha256 hex).
    pub fn finish(self) -> Result<(PathBuf, u64, String)> {
        let (file, bytes, sha) = self.finish_pending()?;
        Ok((file.commit()?, bytes, sha))
    }

    /// [`finish`](Self::finish) without the rename: the complete file stays under its temporary
    /// name until the caller commits it (or drops it, which removes it), so that a run writing
    /// several files can rename them into place only once all of them are complete.
    pub fn finish_pending(mut self) -> Result<(AtomicFile, u64, String)> {
        if self.next != self.tensors.len() {
            return Err(Error::other(format!(
                "only {} of {} tensors were written (next: '{}')",
                self.next,
                self.tensors.len(),
                self.tensors[self.next].name
            )));
        }
        let end = self.sink.join();
        if let Some(e) = end.error {
            return Err(crate::ground::fsutil::write_error(&self.dest, &self.tmp, e));
        }
        let file = end.file.ok_or_else(|| {
            crate::ground::fsutil::write_error(
                &self.dest,
                &self.tmp,
                std::io::Error::other("writer thread failed"),
            )
        })?;
        let sha = end
            .sha256
            .expect("the GGUF writer's sink hashes")
            .finalize();
        Ok((file, self.written, hex(&sha)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufFile;

    /// Tensors written in place (`put_data_with`) across several output buffers, with alignment
    /// 1 and an odd header so that elements straddle buffer boundaries: the file read back holds
    /// exactly the bytes given, and every piece handed to `fill` is whole elements.
    #[test]
    fn in_place_data_crosses_buffer_boundaries() {
        let chunk = crate::ground::sink::CHUNK;
        let tensors = vec![
            TensorInfo {
                name: "a".into(),
                ne: vec![3],
                ty: GgmlType::F32,
            },
            TensorInfo {
                name: "b".into(),
                ne: vec![(chunk * 3 / 4) as u64, 2],
                ty: GgmlType::F16,
            },
            TensorInfo {
                name: "c".into(),
                ne: vec![(chunk / 2 + 7) as u64],
                ty: GgmlType::F32,
            },
        ];
        let mut meta = Metadata::new();
        meta.set("general.alignment", Value::U32(1));
        let mut pad = String::new();
        meta.set("pad", Value::String(pad.clone()));
        while encode_header(&meta, &tensors)
            .unwrap()
            .0
            .len()
            .is_multiple_of(2)
        {
            pad.push('x');
            meta.set("pad", Value::String(pad.clone()));
        }
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("t.gguf");
        let mut w = GgufWriter::create(&dest, &meta, tensors.clone()).unwrap();
        let mut state = 7u32;
        let mut want = vec![];
        let mut bounced = 0;
        for t in &tensors {
            let n = t.n_bytes().unwrap() as usize;
            let unit = t.ty.type_size();
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                    (state >> 24) as u8
                })
                .collect();
            w.begin_tensor(&t.name).unwrap();
            w.put_data_with(n, unit, |off, dst| {
                assert_eq!(dst.len() % unit, 0, "a split element");
                bounced += (dst.len() == unit) as usize;
                dst.copy_from_slice(&bytes[off..off + dst.len()]);
                Ok(())
            })
            .unwrap();
            w.end_tensor().unwrap();
            want.push(bytes);
        }
        assert!(bounced > 0, "no element straddled a buffer boundary");
        let (path, ..) = w.finish().unwrap();
        let g = GgufFile::open(&path).unwrap();
        for (rt, bytes) in g.tensors.iter().zip(&want) {
            assert!(g.data(rt) == &bytes[..], "tensor {} differs", rt.info.name);
        }
    }
}

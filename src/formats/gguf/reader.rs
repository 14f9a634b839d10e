//! Memory-mapped GGUF reader with strict validation: every length, count and offset is checked
//! against the file size before use, so a hostile file gives an error, never a panic or a huge
//! allocation.
use super::types::*;
use super::value::{Metadata, Value};
use super::writer::{align_offset, TensorInfo};
use crate::ground::dtype::GgmlType;
use crate::ground::error::{Error, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// A tensor's description plus where its bytes are in the file.
#[derive(Debug, Clone)]
pub struct ReaderTensor {
    pub info: TensorInfo,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<ReaderTensor>,
    pub alignment: u64,
    pub data_offset: u64,
    mmap: Mmap,
}

/// What [`GgufFile::parse_header`] reads: everything but the tensor data.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<ReaderTensor>,
    pub alignment: u64,
    pub data_offset: u64,
}

/// Metadata values (array elements included) one file may hold. Each takes 32 bytes in memory
/// however small it is in the file; real files hold a few hundred thousand (vocabulary, scores,
/// merges), so this bounds a hostile file's metadata to about 512 MiB.
pub const MAX_METADATA_VALUES: u64 = 1 << 24;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata values read so far (see MAX_METADATA_VALUES).
    values: u64,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> Error {
        Error::input(
            self.path,
            format!("truncated or corrupt GGUF at byte {}: {what}", self.pos),
        )
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.err(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > self.remaining() as u64 {
            return Err(self.err(&format!("{what}: string length {n} exceeds the file")));
        }
        let b = self.take(n as usize, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(&format!("{what}: not UTF-8")))
    }
    fn value(&mut self, t: ValueType, depth: usize, what: &str) -> Result<Value> {
        Ok(match t {
            ValueType::U8 => Value::U8(self.u8(what)?),
            ValueType::I8 => Value::I8(self.u8(what)? as i8),
            ValueType::U16 => Value::U16(self.u16(what)?),
            ValueType::I16 => Value::I16(self.u16(what)? as i16),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(self.u32(what)? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32(what)?)),
            ValueType::Bool => match self.u8(what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(&format!("{what}: bool byte {b}"))),
            },
            ValueType::String => Value::String(self.string(what)?),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(self.u64(what)? as i64),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64(what)?)),
            ValueType::Array => {
                if depth > 2 {
                    return Err(self.err(&format!("{what}: arrays nested too deeply")));
                }
                let et = self.u32(what)?;
                let et = ValueType::from_u32(et)
                    .ok_or_else(|| self.err(&format!("{what}: unknown array element type {et}")))?;
                let n = self.u64(what)?;
                // Each element takes at least `min_size` bytes: a larger count is a lie (and would
                // make us reserve memory for elements that are not there).
                if n.checked_mul(min_size(et))
                    .is_none_or(|b| b > self.remaining() as u64)
                {
                    return Err(self.err(&format!("{what}: array count {n} exceeds the file")));
                }
                self.values += n;
                if self.values > MAX_METADATA_VALUES {
                    return Err(self.err(&format!(
                        "{what}: more than {MAX_METADATA_VALUES} metadata values in the file"
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1, what)?);
                }
                Value::Array(et, v)
            }
        })
    }
}

/// The fewest bytes one value of type `t` takes in a file.
fn min_size(t: ValueType) -> u64 {
    match t {
        ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
        ValueType::U16 | ValueType::I16 => 2,
        ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
        ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
        ValueType::Array => 12,
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::ground::fsutil::open_input(path)?;
        let mmap = crate::ground::fsutil::map_input(&file, path)?;
        Self::parse(path, mmap)
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let h = Self::parse_header(path, &mmap)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            alignment: h.alignment,
            data_offset: h.data_offset,
            mmap,
        })
    }

    /// Parse and validate the header of a GGUF file held in `buf` (the whole file: every tensor's
    /// byte range is checked against its length). `path` names the file in errors.
    pub fn parse_header(path: &Path, buf: &[u8]) -> Result<GgufHeader> {
        let mut c = Cursor {
            buf,
            pos: 0,
            path,
            values: 0,
        };
        let magic = c
            .take(4, "magic")
            .map_err(|_| Error::input(path, "not a GGUF file (shorter than 4 bytes)"))?;
        if magic != GGUF_MAGIC {
            return Err(Error::input(
                path,
                format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32("version")?;
        if version != GGUF_VERSION {
            return Err(Error::input(
                path,
                format!("GGUF version {version} is not supported (only version {GGUF_VERSION})"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // A key-value pair takes at least 12 bytes and a tensor info at least 24.
        if n_kv > c.remaining() as u64 / 12 || n_tensors > c.remaining() as u64 / 24 {
            return Err(Error::input(path, format!("header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file's {} remaining bytes can hold: the file is truncated or corrupt", c.remaining())));
        }
        let mut metadata = Metadata::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let t = c.u32(&key)?;
            let t = ValueType::from_u32(t).ok_or_else(|| {
                Error::input(path, format!("metadata '{key}': unknown value type {t}"))
            })?;
            let v = c.value(t, 0, &key)?;
            if metadata.get(&key).is_some() {
                return Err(Error::input(
                    path,
                    format!("duplicate metadata key '{key}'"),
                ));
            }
            metadata.entries.push((key, v));
        }
        let alignment = match metadata.get("general.alignment") {
            None => GGUF_DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(Error::input(
                    path,
                    format!("general.alignment must be a UINT32 power of two, got {v:?}"),
                ))
            }
        };
        let mut infos = Vec::with_capacity(n_tensors as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            if name.len() >= GGML_MAX_NAME {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("name longer than {} bytes", GGML_MAX_NAME - 1),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(Error::tensor(path, &name, "duplicate tensor name"));
            }
            let nd = c.u32(&name)? as usize;
            if nd == 0 || nd > GGML_MAX_DIMS {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("{nd} dimensions (1..={GGML_MAX_DIMS} allowed)"),
                ));
            }
            let mut ne = Vec::with_capacity(nd);
            for _ in 0..nd {
                let d = c.u64(&name)?;
                if d == 0 || d > i64::MAX as u64 {
                    return Err(Error::tensor(
                        path,
                        &name,
                        format!("dimension {d} is invalid"),
                    ));
                }
                ne.push(d);
            }
            let tid = c.u32(&name)?;
            let ty = GgmlType::from_id(tid).ok_or_else(|| {
                Error::tensor(path, &name, format!("ggml type {tid} is not supported"))
            })?;
            let offset = c.u64(&name)?;
            if offset % alignment != 0 {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("data offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            let info = TensorInfo {
                name: name.clone(),
                ne,
                ty,
            };
            let n_el = info.ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let n_bytes = match n_el {
                Some(_) if !info.ne[0].is_multiple_of(ty.block_size() as u64) => {
                    return Err(Error::tensor(
                        path,
                        &name,
                        format!(
                            "row length {} is not a multiple of the {ty} block size",
                            info.ne[0]
                        ),
                    ))
                }
                Some(n) => ty.bytes_for(n),
                None => None,
            }
            .ok_or_else(|| Error::tensor(path, &name, "element count overflows"))?;
            infos.push((info, offset, n_bytes));
        }
        let data_offset = align_offset(c.pos as u64, alignment);
        let file_len = buf.len() as u64;
        let mut tensors = Vec::with_capacity(infos.len());
        for (info, rel, n_bytes) in infos {
            let start = data_offset.checked_add(rel);
            let end = start.and_then(|s| s.checked_add(n_bytes));
            match end {
                Some(e) if e <= file_len => {}
                _ => {
                    return Err(Error::tensor(
                        path,
                        &info.name,
                        format!("data [{rel}+{n_bytes} bytes after offset {data_offset}] runs past the end of the file ({file_len} bytes)"),
                    ))
                }
            }
            tensors.push(ReaderTensor {
                info,
                offset: start.unwrap(),
                n_bytes,
            });
        }
        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&ReaderTensor> {
        self.tensors.iter().find(|t| t.info.name == name)
    }

    /// The bytes of a tensor (bounds were checked at open).
    pub fn data(&self, t: &ReaderTensor) -> &[u8] {
        &self.mmap[t.offset as usize..(t.offset + t.n_bytes) as usize]
    }

    /// Ask the kernel to read the whole file ahead (it returns at once): a runtime that keeps
    /// every weight (generate) then streams the file in large sequential reads while it starts,
    /// instead of faulting pages in one by one in the middle of its first forward pass.
    pub fn read_ahead(&self) {
        // A hint: where the kernel refuses it, pages still come in on first use.
        let _ = self.mmap.advise(memmap2::Advice::WillNeed);
    }

    /// Drop a tensor's pages from this process (they stay in the page cache): keeps resident
    /// memory near what is in use when a model is read tensor by tensor.
    pub fn release(&self, t: &ReaderTensor) {
        crate::ground::fsutil::drop_mapped_pages(
            &self.mmap,
            t.offset as usize,
            (t.offset + t.n_bytes) as usize,
        );
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A metadata value of exactly the given type (llama.cpp asserts exact types).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        match self.get(key) {
            Some(Value::U32(v)) => Ok(*v),
            Some(v) => Err(Error::input(
                &self.path,
                format!(
                    "metadata '{key}' has type {}, expected UINT32",
                    v.value_type().name()
                ),
            )),
            None => Err(Error::input(
                &self.path,
                format!("metadata '{key}' is missing"),
            )),
        }
    }
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.get(key) {
            Some(Value::F32(v)) => Ok(*v),
            Some(v) => Err(Error::input(
                &self.path,
                format!(
                    "metadata '{key}' has type {}, expected FLOAT32",
                    v.value_type().name()
                ),
            )),
            None => Err(Error::input(
                &self.path,
                format!("metadata '{key}' is missing"),
            )),
        }
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(Value::String(v)) => Ok(v),
            Some(v) => Err(Error::input(
                &self.path,
                format!(
                    "metadata '{key}' has type {}, expected STRING",
                    v.value_type().name()
                ),
            )),
            None => Err(Error::input(
                &self.path,
                format!("metadata '{key}' is missing"),
            )),
        }
    }
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }
}

//! Source tensors of a checkpoint: safetensors (memory-mapped, zero-copy) or PyTorch zip
//! pickles (read lazily, one tensor at a time), single file or shards with an index.
use crate::ground::dtype::GgmlType;
use crate::ground::error::{Error, Result};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// Element types accepted in source checkpoints.
pub fn src_dtype_name(ty: GgmlType) -> &'static str {
    match ty {
        GgmlType::BF16 => "bf16",
        GgmlType::F16 => "f16",
        GgmlType::F32 => "f32",
        _ => "?",
    }
}

/// A tensor read from a source file: its element type (F32/F16/BF16), PyTorch shape and bytes.
#[derive(Debug)]
pub struct SrcTensor<'a> {
    pub ty: GgmlType,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub ty: GgmlType,
    pub shape: Vec<usize>,
    pub file: usize,
    /// Byte range inside the mmap (safetensors) — unused for pickles.
    pub range: (usize, usize),
}

enum Backing {
    Safetensors(Mmap),
    /// A torch.save zip archive (see `pickle`): tensors are byte ranges of the map; the ones
    /// that are not C-contiguous keep their element strides here.
    Pth(Mmap, BTreeMap<String, Vec<usize>>),
}

/// All tensors of a set of files, addressed by name.
pub struct TensorStore {
    files: Vec<(PathBuf, Backing)>,
    entries: BTreeMap<String, Entry>,
}

/// The most shard files an index may name (real checkpoints have a few to a few hundred; each
/// shard stays open and mapped while converting).
pub const MAX_SHARDS: usize = 4096;

/// Resolve a shard name from an index file, refusing anything that leaves the checkpoint directory.
fn shard_path(dir: &Path, index: &Path, name: &str) -> Result<PathBuf> {
    let p = Path::new(name);
    if name.is_empty()
        || p.is_absolute()
        || p.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(Error::input(
            index,
            format!(
                "shard path '{name}' must be a plain file name inside the checkpoint directory"
            ),
        ));
    }
    Ok(dir.join(p))
}

fn parse_index(dir: &Path, index: &Path) -> Result<(Vec<PathBuf>, BTreeMap<String, usize>)> {
    let v = super::config::read_json_capped(index, crate::ground::fsutil::CAP_INDEX)?;
    parse_index_json(dir, index, &v)
}

/// The shards an index file names (sorted) and the shard of each tensor. Shard paths must be
/// plain file names inside `dir`.
pub fn parse_index_json(
    dir: &Path,
    index: &Path,
    v: &serde_json::Value,
) -> Result<(Vec<PathBuf>, BTreeMap<String, usize>)> {
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::input(index, "no \"weight_map\" object"))?;
    let mut shards: Vec<PathBuf> = vec![];
    // Shard path -> its number (paths compare by component, as before), so the index is read
    // in linear time.
    let mut seen: std::collections::HashMap<PathBuf, usize> = Default::default();
    let mut routing = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::input(index, format!("weight_map['{tensor}'] is not a string"))
        })?;
        let path = shard_path(dir, index, file)?;
        let i = match seen.get(&path) {
            Some(&i) => i,
            None => {
                if shards.len() == MAX_SHARDS {
                    return Err(Error::input(
                        index,
                        format!("names more than {MAX_SHARDS} shard files"),
                    ));
                }
                seen.insert(path.clone(), shards.len());
                shards.push(path);
                shards.len() - 1
            }
        };
        routing.insert(tensor.clone(), i);
    }
    // Shard order by name, so "last shard" has its usual meaning.
    let mut order: Vec<usize> = (0..shards.len()).collect();
    order.sort_by(|&a, &b| shards[a].cmp(&shards[b]));
    let remap: BTreeMap<usize, usize> = order
        .iter()
        .enumerate()
        .map(|(new, &old)| (old, new))
        .collect();
    let sorted = order.iter().map(|&i| shards[i].clone()).collect();
    Ok((
        sorted,
        routing.into_iter().map(|(k, i)| (k, remap[&i])).collect(),
    ))
}

fn safetensors_dtype(path: &Path, name: &str, d: safetensors::Dtype) -> Result<GgmlType> {
    Ok(match d {
        safetensors::Dtype::BF16 => GgmlType::BF16,
        safetensors::Dtype::F16 => GgmlType::F16,
        safetensors::Dtype::F32 => GgmlType::F32,
        other => {
            return Err(Error::tensor(
                path,
                name,
                format!("dtype {other:?} is not supported (bf16, f16 and f32 are)"),
            ))
        }
    })
}

/// Explain a safetensors header that the safetensors crate refused, naming the tensor at fault:
/// its own errors name no tensor for a truncated file, and a neighbour of the bad tensor when
/// one tensor's data_offsets point elsewhere (it reports the gap that leaves). None when no single
/// tensor is to blame (the caller then reports the crate's message).
fn diagnose_safetensors(path: &Path, buf: &[u8]) -> Option<Error> {
    let n = usize::try_from(u64::from_le_bytes(buf.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Value =
        serde_json::from_slice(buf.get(8..8usize.checked_add(n)?)?).ok()?;
    let data_len = (buf.len() - 8 - n) as u64;
    let mut spans = vec![];
    for (name, info) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let off = info.get("data_offsets")?.as_array()?;
        let (s, e) = (off.first()?.as_u64()?, off.get(1)?.as_u64()?);
        let dtype = info.get("dtype")?.as_str()?;
        let shape: Vec<u64> = info
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64())
            .collect::<Option<_>>()?;
        let elem: u64 = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            _ => return None,
        };
        let need = shape.iter().try_fold(elem, |a, &d| a.checked_mul(d))?;
        if e < s || e - s != need {
            return Some(Error::tensor(
                path,
                name,
                format!("data_offsets [{s}, {e}] hold {} bytes, but dtype {dtype} with shape {shape:?} needs {need}", e.saturating_sub(s)),
            ));
        }
        spans.push((s, e, name.as_str()));
    }
    spans.sort();
    if let Some(i) = spans.iter().position(|&(_, e, _)| e > data_len) {
        let (s, e, name) = spans[i];
        let more = spans.len() - i - 1;
        let more = if more > 0 {
            format!(" (and {more} tensor(s) after it)")
        } else {
            String::new()
        };
        return Some(Error::tensor(
            path,
            name,
            format!("data_offsets [{s}, {e}] run past the end of the file's data ({data_len} bytes){more}: the file is truncated or its header is wrong"),
        ));
    }
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Some(Error::tensor(
                path,
                w[1].2,
                format!(
                    "data_offsets [{}, {}] overlap tensor '{}' [{}, {}]",
                    w[1].0, w[1].1, w[0].2, w[0].0, w[0].1
                ),
            ));
        }
    }
    None
}

/// The first key that appears twice in a safetensors JSON header. The safetensors crate reads the
/// header into a map, so a duplicated name silently keeps only one of its entries (which may have
/// another dtype or shape than the one a reader of the file would see first).
fn duplicate_header_key(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(k) = m.next_key::<String>()? {
                m.next_value::<IgnoredAny>()?;
                if dup.is_none() && !seen.insert(k.clone()) {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    serde_json::Deserializer::from_slice(header)
        .deserialize_map(Keys)
        .ok()
        .flatten()
}

/// The tensors of a safetensors file held in `buf` (the whole file), validated: header, dtypes,
/// offsets (in range, contiguous, matching each shape), no duplicate names. `file` is the index
/// the entries get; `path` names the file in errors.
pub fn safetensors_entries(path: &Path, buf: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(buf).map_err(|e| {
        diagnose_safetensors(path, buf)
            .unwrap_or_else(|| Error::input(path, format!("invalid safetensors file: {e}")))
    })?;
    if let Some(dup) = duplicate_header_key(&buf[8..8 + header_len]) {
        return Err(Error::tensor(
            path,
            dup,
            "appears twice in the safetensors header",
        ));
    }
    let data_start = 8 + header_len;
    let mut entries = vec![];
    for (name, info) in meta.tensors() {
        let ty = safetensors_dtype(path, &name, info.dtype)?;
        let (s, e) = info.data_offsets;
        entries.push((
            name,
            Entry {
                ty,
                shape: info.shape.clone(),
                file,
                range: (data_start + s, data_start + e),
            },
        ));
    }
    Ok(entries)
}

impl TensorStore {
    /// Open the weights of a checkpoint directory: `model.safetensors.index.json`, `model.safetensors`,
    /// `pytorch_model.bin.index.json` or `pytorch_model.bin`, in that order of preference.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let st_index = dir.join("model.safetensors.index.json");
        let st_single = dir.join("model.safetensors");
        let pt_index = dir.join("pytorch_model.bin.index.json");
        let pt_single = dir.join("pytorch_model.bin");
        if st_index.exists() {
            let (shards, routing) = parse_index(dir, &st_index)?;
            Self::open_safetensors(&shards, Some((&st_index, routing)))
        } else if st_single.exists() {
            Self::open_safetensors(&[st_single], None)
        } else if pt_index.exists() {
            let (shards, routing) = parse_index(dir, &pt_index)?;
            Self::open_pth(&shards, Some((&pt_index, routing)))
        } else if pt_single.exists() {
            Self::open_pth(&[pt_single], None)
        } else {
            Err(Error::input(
                dir,
                "no weights found (looked for model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin)",
            ))
        }
    }

    /// Check that every tensor the index names is in the shard it names, and nothing else is there.
    fn check_routing(&self, index: &Path, routing: &BTreeMap<String, usize>) -> Result<()> {
        for (name, &shard) in routing {
            match self.entries.get(name) {
                None => {
                    return Err(Error::tensor(
                        index,
                        name,
                        format!(
                            "listed in the index but not found in {}",
                            self.files[shard].0.display()
                        ),
                    ))
                }
                Some(e) if e.file != shard => {
                    return Err(Error::tensor(
                        index,
                        name,
                        format!(
                            "index says {}, but it is in {}",
                            self.files[shard].0.display(),
                            self.files[e.file].0.display()
                        ),
                    ))
                }
                _ => {}
            }
        }
        if let Some(extra) = self.entries.keys().find(|k| !routing.contains_key(*k)) {
            let e = &self.entries[extra];
            return Err(Error::tensor(
                &self.files[e.file].0,
                extra,
                format!("not listed in {}", index.display()),
            ));
        }
        Ok(())
    }

    fn insert(&mut self, path: &Path, name: String, entry: Entry) -> Result<()> {
        if let Some(prev) = self.entries.get(&name) {
            return Err(Error::tensor(
                path,
                &name,
                format!("also present in {}", self.files[prev.file].0.display()),
            ));
        }
        self.entries.insert(name, entry);
        Ok(())
    }

    pub fn open_safetensors(
        paths: &[PathBuf],
        index: Option<(&Path, BTreeMap<String, usize>)>,
    ) -> Result<Self> {
        let mut store = TensorStore {
            files: vec![],
            entries: BTreeMap::new(),
        };
        for (fi, path) in paths.iter().enumerate() {
            let file = crate::ground::fsutil::open_input(path).map_err(|e| match (&index, e) {
                (Some((ix, _)), Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Error::input(path, format!("shard named in {} is missing", ix.display()))
                }
                (_, e) => e,
            })?;
            let mmap = crate::ground::fsutil::map_input(&file, path)?;
            let _ = mmap.advise(memmap2::Advice::Sequential);
            let entries = safetensors_entries(path, &mmap, fi)?;
            store.files.push((path.clone(), Backing::Safetensors(mmap)));
            for (name, e) in entries {
                store.insert(path, name, e)?;
            }
        }
        if let Some((ix, routing)) = index {
            store.check_routing(ix, &routing)?;
        }
        Ok(store)
    }

    pub fn open_pth(
        paths: &[PathBuf],
        index: Option<(&Path, BTreeMap<String, usize>)>,
    ) -> Result<Self> {
        let mut store = TensorStore {
            files: vec![],
            entries: BTreeMap::new(),
        };
        for (fi, path) in paths.iter().enumerate() {
            if !path.exists() {
                let why = match &index {
                    Some((ix, _)) => format!("shard named in {} is missing", ix.display()),
                    None => "file is missing".into(),
                };
                return Err(Error::input(path, why));
            }
            let file = crate::ground::fsutil::open_input(path)?;
            let mmap = crate::ground::fsutil::map_input(&file, path)?;
            let _ = mmap.advise(memmap2::Advice::Sequential);
            let mut entries = vec![];
            let mut strided = BTreeMap::new();
            for t in super::pickle::read_archive(path, &mmap)? {
                let ty = match t.kind.dtype {
                    "bfloat16" => GgmlType::BF16,
                    "float16" => GgmlType::F16,
                    "float32" => GgmlType::F32,
                    other => {
                        return Err(Error::tensor(
                            path,
                            &t.name,
                            format!("dtype {other} is not supported (bf16, f16 and f32 are)"),
                        ))
                    }
                };
                if let Some(st) = t.strides {
                    strided.insert(t.name.clone(), st);
                }
                entries.push((
                    t.name,
                    Entry {
                        ty,
                        shape: t.shape,
                        file: fi,
                        range: t.range,
                    },
                ));
            }
            store
                .files
                .push((path.clone(), Backing::Pth(mmap, strided)));
            for (name, e) in entries {
                store.insert(path, name, e)?;
            }
        }
        if let Some((ix, routing)) = index {
            store.check_routing(ix, &routing)?;
        }
        Ok(store)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries
            .get(name)
            .map(|e| self.files[e.file].0.as_path())
    }
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }
    pub fn last_file(&self) -> Option<&Path> {
        self.files.last().map(|(p, _)| p.as_path())
    }

    /// The bytes of one tensor, little-endian, C order.
    pub fn get(&self, name: &str) -> Result<SrcTensor<'_>> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::other(format!("tensor '{name}' is not in the checkpoint")))?;
        match &self.files[e.file].1 {
            Backing::Safetensors(mmap) => Ok(SrcTensor {
                ty: e.ty,
                shape: e.shape.clone(),
                data: Cow::Borrowed(&mmap[e.range.0..e.range.1]),
            }),
            Backing::Pth(mmap, strided) => {
                let base = &mmap[e.range.0..e.range.1];
                let data = match strided.get(name) {
                    None => Cow::Borrowed(base),
                    Some(st) => {
                        Cow::Owned(super::pickle::gather(base, &e.shape, st, e.ty.type_size()))
                    }
                };
                Ok(SrcTensor {
                    ty: e.ty,
                    shape: e.shape.clone(),
                    data,
                })
            }
        }
    }

    /// Where a tensor's bytes lie as they are, when they do (safetensors): file index and byte
    /// range. Pickled tensors may need a gather, so they are read through `get`.
    pub fn file_range(&self, name: &str) -> Option<(usize, u64, u64)> {
        let e = self.entries.get(name)?;
        matches!(self.files[e.file].1, Backing::Safetensors(_)).then_some((
            e.file,
            e.range.0 as u64,
            e.range.1 as u64,
        ))
    }

    /// Start reading a tensor's pages in the background (MADV_WILLNEED).
    pub fn prefetch(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            let (Backing::Safetensors(mmap) | Backing::Pth(mmap, _)) = &self.files[e.file].1;
            let s = e.range.0 / 4096 * 4096;
            if e.range.1 > s {
                let _ = mmap.advise_range(memmap2::Advice::WillNeed, s, e.range.1 - s);
            }
        }
    }

    /// Tell the kernel we are done with a tensor's pages (keeps RSS near one tensor).
    pub fn release(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            let (Backing::Safetensors(mmap) | Backing::Pth(mmap, _)) = &self.files[e.file].1;
            crate::ground::fsutil::drop_mapped_pages(mmap, e.range.0, e.range.1);
        }
    }
}

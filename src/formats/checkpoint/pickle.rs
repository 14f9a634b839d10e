//! PyTorch checkpoints (`torch.save` zip archives: `<prefix>/data.pkl` plus one stored entry
//! `<prefix>/data/<key>` per storage), read as data. Nothing is ever executed or imported: the
//! pickle is interpreted by a small machine that knows only the opcodes and the handful of
//! classes a state dict of tensors needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, `torch.<Type>Storage`), and refuses everything else by name
//! (a `GLOBAL os system` is an error, never skipped). Every length, count, offset and stride is
//! checked against the file before use; nesting depth and total work are bounded, so a hostile
//! file gives an error, never a panic, a huge allocation or a stack overflow.
//!
//! Tensor bytes are not copied: a tensor is a byte range of the memory-mapped file (plus its
//! strides when it is not C-contiguous). (candle's pickle reader, used before, skipped entries it
//! did not understand, panicked on short tuples and overflowed the stack on deep nesting.)
use crate::ground::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

/// A `torch.<Name>Storage` class: element type name and size.
#[derive(Debug, PartialEq, Eq)]
pub struct StorageKind {
    pub class: &'static str,
    /// The PyTorch dtype name (for messages).
    pub dtype: &'static str,
    pub size: usize,
}

pub const STORAGE_KINDS: &[StorageKind] = &[
    StorageKind {
        class: "FloatStorage",
        dtype: "float32",
        size: 4,
    },
    StorageKind {
        class: "HalfStorage",
        dtype: "float16",
        size: 2,
    },
    StorageKind {
        class: "BFloat16Storage",
        dtype: "bfloat16",
        size: 2,
    },
    StorageKind {
        class: "DoubleStorage",
        dtype: "float64",
        size: 8,
    },
    StorageKind {
        class: "LongStorage",
        dtype: "int64",
        size: 8,
    },
    StorageKind {
        class: "IntStorage",
        dtype: "int32",
        size: 4,
    },
    StorageKind {
        class: "ShortStorage",
        dtype: "int16",
        size: 2,
    },
    StorageKind {
        class: "CharStorage",
        dtype: "int8",
        size: 1,
    },
    StorageKind {
        class: "ByteStorage",
        dtype: "uint8",
        size: 1,
    },
    StorageKind {
        class: "BoolStorage",
        dtype: "bool",
        size: 1,
    },
];

/// Nesting depth of tuples, lists and dicts (a state dict needs about 6).
pub const MAX_DEPTH: u32 = 64;
/// Objects created plus elements copied, per pickle (a state dict needs about 30 per tensor).
pub const MAX_WORK: u64 = 1 << 26;
/// Dimensions of one tensor.
pub const MAX_DIMS: usize = 16;

/// A storage reference (the persistent id `('storage', torch.XStorage, key, location, numel)`).
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub kind: &'static StorageKind,
    pub key: String,
    pub numel: u64,
}

/// A tensor as pickled: a view (offset, shape, strides in elements) of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct PickledTensor {
    pub name: String,
    pub storage: Rc<StorageRef>,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// Why a pickle was refused; `tensor` names the state-dict entry where there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct PickleError {
    pub tensor: Option<String>,
    pub msg: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(&'static StorageKind),
}

#[derive(Debug, Clone)]
struct TensorView {
    storage: Rc<StorageRef>,
    offset: u64,
    shape: Vec<u64>,
    stride: Vec<u64>,
}

#[derive(Debug, Clone)]
enum Obj {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Global(Global),
    Tuple(Rc<Vec<Obj>>, u32),
    List(Rc<Vec<Obj>>, u32),
    Dict(Rc<Vec<(Obj, Obj)>>, u32),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorView>),
}

impl Obj {
    fn depth(&self) -> u32 {
        match self {
            Obj::Tuple(_, d) | Obj::List(_, d) | Obj::Dict(_, d) => *d,
            _ => 0,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool => "bool",
            Obj::Int(_) => "int",
            Obj::Float => "float",
            Obj::Str(_) => "str",
            Obj::Global(_) => "class",
            Obj::Tuple(..) => "tuple",
            Obj::List(..) => "list",
            Obj::Dict(..) => "dict",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
        }
    }
}

fn lookup_global(module: &str, name: &str) -> Option<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", class) => STORAGE_KINDS
            .iter()
            .find(|k| k.class == class)
            .map(Global::Storage),
        _ => None,
    }
}

struct Machine<'a> {
    b: &'a [u8],
    pos: usize,
    /// Position of the opcode being run (for messages).
    at: usize,
    stack: Vec<Obj>,
    /// Stack lengths at each MARK (Python's metastack).
    marks: Vec<usize>,
    memo: HashMap<u32, Obj>,
    work: u64,
}

type R<T> = std::result::Result<T, PickleError>;

impl<'a> Machine<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> R<T> {
        Err(PickleError {
            tensor: None,
            msg: format!("byte {}: {}", self.at, msg.into()),
        })
    }
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        match self.pos.checked_add(n).filter(|&e| e <= self.b.len()) {
            Some(e) => {
                let s = &self.b[self.pos..e];
                self.pos = e;
                Ok(s)
            }
            None => self.err(format!(
                "truncated: {n} bytes needed, {} left",
                self.b.len() - self.pos
            )),
        }
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> R<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn line(&mut self) -> R<&'a str> {
        let rest = &self.b[self.pos..];
        let n = match rest.iter().take(256).position(|&c| c == b'\n') {
            Some(n) => n,
            None => return self.err("GLOBAL name is not a line of at most 255 bytes"),
        };
        let s = self.take(n + 1)?;
        match std::str::from_utf8(&s[..n]) {
            Ok(s) => Ok(s),
            Err(_) => self.err("GLOBAL name is not UTF-8"),
        }
    }
    fn charge(&mut self, n: u64) -> R<()> {
        self.work = self.work.saturating_add(n);
        if self.work > MAX_WORK {
            return self.err(format!(
                "more than {MAX_WORK} objects built or copied: not a plain state dict"
            ));
        }
        Ok(())
    }
    fn push(&mut self, o: Obj) -> R<()> {
        self.charge(1)?;
        self.stack.push(o);
        Ok(())
    }
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }
    fn pop(&mut self) -> R<Obj> {
        if self.stack.len() <= self.floor() {
            return self.err("stack underflow");
        }
        Ok(self.stack.pop().expect("checked above"))
    }
    fn top_mut(&mut self) -> R<&mut Obj> {
        if self.stack.len() <= self.floor() {
            return self.err("stack underflow");
        }
        Ok(self.stack.last_mut().expect("checked above"))
    }
    fn pop_mark(&mut self) -> R<Vec<Obj>> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK to pop to");
        };
        Ok(self.stack.split_off(m))
    }
    fn container_depth(&self, items: &[Obj]) -> R<u32> {
        let d = 1 + items.iter().map(Obj::depth).max().unwrap_or(0);
        if d > MAX_DEPTH {
            return self.err(format!("objects nested more than {MAX_DEPTH} deep"));
        }
        Ok(d)
    }
    fn tuple(&mut self, items: Vec<Obj>) -> R<()> {
        let d = self.container_depth(&items)?;
        self.push(Obj::Tuple(Rc::new(items), d))
    }
    fn memo_put(&mut self, idx: u32) -> R<()> {
        let top = self.top_mut()?.clone();
        self.memo.insert(idx, top);
        Ok(())
    }
    fn memo_get(&mut self, idx: u32) -> R<()> {
        match self.memo.get(&idx) {
            Some(o) => {
                let o = o.clone();
                self.push(o)
            }
            None => self.err(format!("memo entry {idx} was never stored")),
        }
    }
    fn global(&mut self, module: &str, name: &str) -> R<()> {
        match lookup_global(module, name) {
            Some(g) => self.push(Obj::Global(g)),
            None => self.err(format!(
                "the pickle imports '{module}.{name}', which a state dict of tensors does not need; refused (nothing in a checkpoint is ever executed)"
            )),
        }
    }
    /// Add items to the list or dict on top of the stack.
    fn extend(&mut self, items: Vec<Obj>, dict: bool) -> R<()> {
        let d = self.container_depth(&items)?;
        let n = items.len() as u64;
        if dict && !items.len().is_multiple_of(2) {
            return self.err("SETITEMS with an odd number of objects");
        }
        let at = self.at;
        let top = self.top_mut()?;
        let copied = match (top, dict) {
            (Obj::List(v, depth), false) => {
                let c = if Rc::strong_count(v) > 1 { v.len() } else { 0 };
                let v = Rc::make_mut(v);
                v.extend(items);
                *depth = (*depth).max(d);
                c
            }
            (Obj::Dict(v, depth), true) => {
                let c = if Rc::strong_count(v) > 1 { v.len() } else { 0 };
                let v = Rc::make_mut(v);
                let mut it = items.into_iter();
                while let (Some(k), Some(x)) = (it.next(), it.next()) {
                    v.push((k, x));
                }
                *depth = (*depth).max(d);
                c
            }
            (o, _) => {
                let what = if dict { "SETITEM(S)" } else { "APPEND(S)" };
                let kind = o.kind();
                return Err(PickleError {
                    tensor: None,
                    msg: format!("byte {at}: {what} on a {kind}"),
                });
            }
        };
        self.charge(n + copied as u64)
    }

    fn int_arg(&self, o: &Obj, what: &str) -> R<u64> {
        match o {
            Obj::Int(i) if *i >= 0 => Ok(*i as u64),
            o => self.err(format!(
                "{what} must be a non-negative int, found {}",
                o.kind()
            )),
        }
    }

    fn ints(&self, o: &Obj, what: &str) -> R<Vec<u64>> {
        match o {
            Obj::Tuple(v, _) if v.len() <= MAX_DIMS => {
                v.iter().map(|x| self.int_arg(x, what)).collect()
            }
            Obj::Tuple(v, _) => self.err(format!("{what} has {} dimensions", v.len())),
            o => self.err(format!("{what} must be a tuple, found {}", o.kind())),
        }
    }

    fn persistent_load(&mut self) -> R<()> {
        let pid = self.pop()?;
        let Obj::Tuple(t, _) = &pid else {
            return self.err(format!("persistent id is a {}, not a tuple", pid.kind()));
        };
        let s = match &t[..] {
            [Obj::Str(tag), Obj::Global(Global::Storage(kind)), Obj::Str(key), Obj::Str(_location), numel]
                if &**tag == "storage" =>
            {
                let numel = self.int_arg(numel, "storage size")?;
                if key.is_empty() || key.contains('/') {
                    return self.err(format!("storage key '{key}' is not a plain name"));
                }
                StorageRef {
                    kind,
                    key: key.to_string(),
                    numel,
                }
            }
            _ => {
                return self.err(
                    "persistent id is not ('storage', torch.<Type>Storage, key, location, size)",
                )
            }
        };
        self.push(Obj::Storage(Rc::new(s)))
    }

    fn reduce(&mut self) -> R<()> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let Obj::Tuple(a, _) = &args else {
            return self.err(format!(
                "REDUCE arguments are a {}, not a tuple",
                args.kind()
            ));
        };
        let out = match callable {
            Obj::Global(Global::OrderedDict) if a.is_empty() => Obj::Dict(Rc::new(vec![]), 1),
            Obj::Global(Global::RebuildTensorV2) => {
                let (storage, offset, size, stride, hooks, meta) = match &a[..] {
                    [s, o, sz, st, Obj::Bool, h] => (s, o, sz, st, h, None),
                    [s, o, sz, st, Obj::Bool, h, m] => (s, o, sz, st, h, Some(m)),
                    _ => {
                        return self.err(
                            "_rebuild_tensor_v2 needs (storage, offset, size, stride, requires_grad, hooks[, metadata])",
                        )
                    }
                };
                let Obj::Storage(storage) = storage else {
                    return self.err(format!(
                        "_rebuild_tensor_v2: first argument is a {}, not a storage",
                        storage.kind()
                    ));
                };
                if !matches!(hooks, Obj::Dict(..))
                    || !matches!(meta, None | Some(Obj::None | Obj::Dict(..)))
                {
                    return self.err("_rebuild_tensor_v2: backward hooks / metadata are not dicts");
                }
                let offset = self.int_arg(offset, "storage offset")?;
                let shape = self.ints(size, "size")?;
                let stride = self.ints(stride, "stride")?;
                if shape.len() != stride.len() {
                    return self.err(format!(
                        "size has {} dimensions but stride has {}",
                        shape.len(),
                        stride.len()
                    ));
                }
                Obj::Tensor(Rc::new(TensorView {
                    storage: storage.clone(),
                    offset,
                    shape,
                    stride,
                }))
            }
            Obj::Global(Global::RebuildParameter) => match &a[..] {
                [t @ Obj::Tensor(_), Obj::Bool, Obj::Dict(..)] => t.clone(),
                _ => return self.err("_rebuild_parameter needs (tensor, requires_grad, hooks)"),
            },
            Obj::Global(g) => {
                return self.err(format!(
                    "REDUCE of {g:?} with these arguments is not allowed"
                ))
            }
            other => return self.err(format!("REDUCE of a {}", other.kind())),
        };
        self.push(out)
    }

    fn run(&mut self) -> R<Obj> {
        loop {
            self.at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if !(2..=5).contains(&v) {
                        return self.err(format!("pickle protocol {v} (2 to 5 are read)"));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a hint for buffered readers
                }
                b'.' => break,
                b'(' => {
                    self.charge(1)?;
                    self.marks.push(self.stack.len());
                }
                b'}' => self.push(Obj::Dict(Rc::new(vec![]), 1))?,
                b']' => self.push(Obj::List(Rc::new(vec![]), 1))?,
                b')' => self.push(Obj::Tuple(Rc::new(vec![]), 1))?,
                b'N' => self.push(Obj::None)?,
                0x88 | 0x89 => self.push(Obj::Bool)?,
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Obj::Int(v as i64))?
                }
                b'J' => {
                    let v = self.u32()?;
                    self.push(Obj::Int(v as i32 as i64))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return self.err(format!("LONG1 of {n} bytes (at most 8 are read)"));
                    }
                    let b = self.take(n)?;
                    let mut x = [0u8; 8];
                    x[..n].copy_from_slice(b);
                    if n > 0 && b[n - 1] & 0x80 != 0 {
                        x[n..].fill(0xff);
                    }
                    self.push(Obj::Int(i64::from_le_bytes(x)))?
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Obj::Float)?
                }
                b'X' | 0x8c => {
                    let n = if op == b'X' {
                        self.u32()? as usize
                    } else {
                        self.u8()? as usize
                    };
                    let b = self.take(n)?;
                    match std::str::from_utf8(b) {
                        Ok(s) => self.push(Obj::Str(Rc::from(s)))?,
                        Err(_) => return self.err("string is not UTF-8"),
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Obj::Str(m), Obj::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(&m, &n)?
                        }
                        _ => return self.err("STACK_GLOBAL needs two strings"),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.tuple(items)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = vec![];
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.tuple(items)?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let d = self.container_depth(&items)?;
                    self.push(Obj::List(Rc::new(items), d))?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if !items.len().is_multiple_of(2) {
                        return self.err("DICT with an odd number of objects");
                    }
                    let d = self.container_depth(&items)?;
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    self.push(Obj::Dict(Rc::new(pairs), d))?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend(vec![v], false)?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend(items, false)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend(vec![k, v], true)?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.extend(items, true)?
                }
                b'Q' => self.persistent_load()?,
                b'R' => self.reduce()?,
                b'b' => {
                    // BUILD on an OrderedDict sets its attributes (a state dict's `_metadata`:
                    // module versions); they are not tensors and are ignored.
                    let state = self.pop()?;
                    let obj = self.top_mut()?;
                    if !matches!(obj, Obj::Dict(..)) || !matches!(state, Obj::Dict(..) | Obj::None)
                    {
                        let (o, s) = (obj.kind(), state.kind());
                        return self.err(format!("BUILD of a {o} with a {s} is not allowed"));
                    }
                }
                op => {
                    let c = if op.is_ascii_graphic() {
                        format!(" ('{}')", op as char)
                    } else {
                        String::new()
                    };
                    return self.err(format!(
                        "opcode 0x{op:02x}{c} is not one a state dict of tensors uses; refused"
                    ));
                }
            }
        }
        if self.pos != self.b.len() {
            return self.err(format!("{} bytes after STOP", self.b.len() - self.pos));
        }
        if !self.marks.is_empty() || self.stack.len() != 1 {
            return self.err(format!(
                "STOP with {} objects and {} marks on the stack (expected one object)",
                self.stack.len(),
                self.marks.len()
            ));
        }
        Ok(self.stack.pop().expect("one object"))
    }
}

/// Interpret a state-dict pickle: a dict (or OrderedDict) from string names to tensors. Anything
/// else (another class, a nested dict, a non-tensor value) is refused, never skipped.
pub fn parse_state_dict(pkl: &[u8]) -> std::result::Result<Vec<PickledTensor>, PickleError> {
    let mut m = Machine {
        b: pkl,
        pos: 0,
        at: 0,
        stack: vec![],
        marks: vec![],
        memo: HashMap::new(),
        work: 0,
    };
    let top = m.run()?;
    let Obj::Dict(entries, _) = top else {
        return Err(PickleError {
            tensor: None,
            msg: format!(
                "the pickle holds a {}, not a state dict (a dict of tensors)",
                top.kind()
            ),
        });
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (k, v) in entries.iter() {
        let Obj::Str(name) = k else {
            return Err(PickleError {
                tensor: None,
                msg: format!("a state-dict key is a {}, not a string", k.kind()),
            });
        };
        let terr = |msg: String| PickleError {
            tensor: Some(name.to_string()),
            msg,
        };
        let Obj::Tensor(t) = v else {
            return Err(terr(format!(
                "is a {}, not a tensor (only flat state dicts of tensors are read)",
                v.kind()
            )));
        };
        if !seen.insert(name.clone()) {
            return Err(terr("appears twice in the state dict".into()));
        }
        out.push(PickledTensor {
            name: name.to_string(),
            storage: t.storage.clone(),
            offset: t.offset,
            shape: t.shape.clone(),
            stride: t.stride.clone(),
        });
    }
    Ok(out)
}

/// A tensor of a PyTorch archive, located in the archive's bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct PthTensor {
    pub name: String,
    pub kind: &'static StorageKind,
    pub shape: Vec<usize>,
    /// Bytes of the archive spanned by the tensor's elements (all of them when contiguous).
    pub range: (usize, usize),
    /// Element strides when the tensor is not C-contiguous (its first element is at `range.0`).
    pub strides: Option<Vec<usize>>,
}

fn zip_err(path: &Path, e: zip::result::ZipError) -> Error {
    Error::input(
        path,
        format!("not a readable PyTorch zip checkpoint ({e}); legacy pre-1.6 (non-zip) files are not read: re-save with torch.save"),
    )
}

/// Byte range (start, len) of a stored (uncompressed) zip entry.
fn stored_entry<R: std::io::Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    file_len: usize,
) -> std::result::Result<(usize, usize), String> {
    let f = zip.by_name(name).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => {
            format!("entry '{name}' is missing from the archive")
        }
        e => format!("entry '{name}': {e}"),
    })?;
    if f.compression() != zip::CompressionMethod::Stored {
        return Err(format!(
            "entry '{name}' is compressed ({}); torch.save writes stored entries",
            f.compression()
        ));
    }
    let start = f
        .data_start()
        .ok_or_else(|| format!("entry '{name}': no data offset"))?;
    let (size, csize) = (f.size(), f.compressed_size());
    match start.checked_add(size) {
        Some(end) if size == csize && end <= file_len as u64 => Ok((start as usize, size as usize)),
        _ => Err(format!(
            "entry '{name}': {size} bytes at offset {start} run past the end of the file ({file_len} bytes)"
        )),
    }
}

/// Read the tensor table of a `torch.save` zip archive held in `bytes` (the whole file).
pub fn read_archive(path: &Path, bytes: &[u8]) -> Result<Vec<PthTensor>> {
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| zip_err(path, e))?;
    // Entries are looked up by name: with two of one name, one would silently shadow the other.
    if zip.has_duplicate_names() {
        return Err(Error::input(
            path,
            "the zip archive lists an entry name twice (which copy is meant is ambiguous); re-save with torch.save",
        ));
    }
    let pkls: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(|n| n.into_owned())
        .collect();
    let pkl_name = match &pkls[..] {
        [one] => one.clone(),
        [] => {
            return Err(Error::input(
                path,
                "no data.pkl in the archive: not a torch.save checkpoint",
            ))
        }
        more => {
            return Err(Error::input(
                path,
                format!(
                    "{} data.pkl entries in the archive (one expected): {}",
                    more.len(),
                    more.join(", ")
                ),
            ))
        }
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    // torch.save records the byte order of the storages (absent before torch 1.10: little).
    let bo = format!("{prefix}byteorder");
    if zip.index_for_name(&bo).is_some() {
        let (s, n) = stored_entry(&mut zip, &bo, bytes.len()).map_err(|e| Error::input(path, e))?;
        if &bytes[s..s + n] != b"little" {
            return Err(Error::input(
                path,
                format!(
                    "'{bo}' says {:?}: only little-endian checkpoints are read",
                    String::from_utf8_lossy(&bytes[s..s + n.min(16)])
                ),
            ));
        }
    }
    let (s, n) =
        stored_entry(&mut zip, &pkl_name, bytes.len()).map_err(|e| Error::input(path, e))?;
    let tensors = parse_state_dict(&bytes[s..s + n]).map_err(|e| match e.tensor {
        Some(t) => Error::tensor(path, t, format!("{pkl_name}: {}", e.msg)),
        None => Error::input(path, format!("{pkl_name}: {}", e.msg)),
    })?;
    let mut storages: HashMap<String, (usize, usize, &'static StorageKind)> = HashMap::new();
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        let terr = |msg: String| Error::tensor(path, &t.name, msg);
        let st = &t.storage;
        let (start, len) = match storages.get(&st.key) {
            Some(&(s, l, k)) => {
                if k != st.kind {
                    return Err(terr(format!(
                        "storage '{}' is used as {} and as {}",
                        st.key, k.dtype, st.kind.dtype
                    )));
                }
                (s, l)
            }
            None => {
                let entry = format!("{prefix}data/{}", st.key);
                let (s, l) = stored_entry(&mut zip, &entry, bytes.len())
                    .map_err(|e| terr(format!("storage '{}': {e}", st.key)))?;
                storages.insert(st.key.clone(), (s, l, st.kind));
                (s, l)
            }
        };
        let es = st.kind.size as u64;
        if st.numel.checked_mul(es) != Some(len as u64) {
            return Err(terr(format!(
                "storage '{}' claims {} {} elements, but its entry holds {len} bytes",
                st.key, st.numel, st.kind.dtype
            )));
        }
        // The elements the view touches: offset + sum((size-1)*stride) must lie in the storage.
        let overflow = || {
            terr(format!(
                "shape {:?} / stride {:?} overflow",
                t.shape, t.stride
            ))
        };
        let mut numel: u64 = 1;
        let mut last: u64 = 0;
        for (&d, &s) in t.shape.iter().zip(&t.stride) {
            numel = numel.checked_mul(d).ok_or_else(overflow)?;
            if d > 0 {
                last = (d - 1)
                    .checked_mul(s)
                    .and_then(|x| x.checked_add(last))
                    .ok_or_else(overflow)?;
            }
        }
        let (first, end_el) = if numel == 0 {
            (t.offset.min(st.numel), t.offset.min(st.numel))
        } else {
            let end = t
                .offset
                .checked_add(last)
                .and_then(|x| x.checked_add(1))
                .ok_or_else(overflow)?;
            if end > st.numel {
                return Err(terr(format!(
                    "offset {} with shape {:?} and stride {:?} reaches element {end} of storage '{}', which holds {}",
                    t.offset, t.shape, t.stride, st.key, st.numel
                )));
            }
            (t.offset, end)
        };
        // C-contiguous (dimensions of size 1 may carry any stride).
        let mut want = 1u64;
        let mut contiguous = true;
        for (&d, &s) in t.shape.iter().zip(&t.stride).rev() {
            if d != 1 && s != want {
                contiguous = false;
            }
            want = want.saturating_mul(d);
        }
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        out.push(PthTensor {
            range: (
                start + (first * es) as usize,
                start + (end_el * es) as usize,
            ),
            strides: if contiguous || numel == 0 {
                None
            } else {
                Some(t.stride.iter().map(|&s| s as usize).collect())
            },
            name: t.name,
            kind: st.kind,
            shape,
        });
    }
    Ok(out)
}

/// Copy a strided tensor's elements into C order. `base` starts at its first element.
pub fn gather(base: &[u8], shape: &[usize], strides: &[usize], elem: usize) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * elem);
    if numel == 0 {
        return out;
    }
    let mut idx = vec![0usize; shape.len()];
    loop {
        let off: usize = idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>() * elem;
        out.extend_from_slice(&base[off..off + elem]);
        let mut d = shape.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend((x.len() as u32).to_le_bytes());
        v.extend(x.as_bytes());
        v
    }

    /// `{name: tensor}` with a HalfStorage '0' of `numel` elements, as torch.save writes it.
    fn one_tensor(name: &str, shape: &[u16], stride: &[u16], numel: u16) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend(s(name));
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        p.extend(s("storage"));
        p.extend(b"ctorch\nHalfStorage\n");
        p.extend(s("0"));
        p.extend(s("cpu"));
        p.push(b'M');
        p.extend(numel.to_le_bytes());
        p.extend(b"tQK\x00(");
        for d in shape {
            p.push(b'M');
            p.extend(d.to_le_bytes());
        }
        p.extend(b"t(");
        for d in stride {
            p.push(b'M');
            p.extend(d.to_le_bytes());
        }
        p.extend(b"t\x89ccollections\nOrderedDict\n)RtRu.");
        p
    }

    #[test]
    fn reads_a_state_dict() {
        let t = parse_state_dict(&one_tensor("w", &[2, 3], &[3, 1], 6)).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "w");
        assert_eq!(t[0].shape, vec![2, 3]);
        assert_eq!(t[0].stride, vec![3, 1]);
        assert_eq!(t[0].storage.kind.dtype, "float16");
    }

    #[test]
    fn refuses_globals_and_deep_nesting() {
        let e = parse_state_dict(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00id\x85R.").unwrap_err();
        assert!(e.msg.contains("os.system"), "{e:?}");
        let mut deep = b"\x80\x02N".to_vec();
        deep.extend(std::iter::repeat_n(0x85u8, 100_000));
        deep.push(b'.');
        assert!(parse_state_dict(&deep).unwrap_err().msg.contains("nested"));
        // A memo bomb: each step doubles the tree the object describes.
        let mut bomb = b"\x80\x02N".to_vec();
        for _ in 0..60 {
            bomb.extend(b"q\x00h\x00\x86");
        }
        bomb.push(b'.');
        assert!(parse_state_dict(&bomb).is_err());
    }

    #[test]
    fn gathers_transposed() {
        // 2x3 stored as its transpose (3x2 C order): element (i, j) at j*2 + i.
        let base: Vec<u8> = (0u8..6).collect();
        assert_eq!(gather(&base, &[2, 3], &[1, 2], 1), vec![0, 2, 4, 1, 3, 5]);
    }
}

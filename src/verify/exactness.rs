//! verify's exactness checks, which need no forward pass: the artefacts' header (metadata, tensor
//! list, shapes, types) against what conversion would write from the same source (the shared
//! plan), and every tensor's bytes against the plan's output for it (our quantizers are
//! byte-identical to llama.cpp's, so a correct file matches exactly).
use crate::convert::encode::{encode_tensor_bytes, first_nonfinite};
use crate::convert::plan::{plan_artefacts, ArtefactPlan};
use crate::convert::recipe::ArtefactKind;
use crate::convert::source::{Source, SourceRow};
use crate::formats::gguf::{GgufFile, Metadata, Value};
use crate::ground::dtype::{FileType, GgmlType};
use crate::ground::error::{Error, Result};
use crate::ground::progress::Progress;
use crate::runtime::weights::GgufWeights;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// llama-quantize records an importance matrix under these keys; such a file cannot be
/// re-derived without the matrix.
pub const IMATRIX_KEY_PREFIX: &str = "quantize.imatrix.";

/// A float GGUF a quantized file may have been made from (`quantize` of an hf-to-gguf output):
/// the source is cast to it first, then quantized. `None` is the one-pass road (source -> type).
pub const INTERMEDIATES: [Option<GgmlType>; 4] = [
    None,
    Some(GgmlType::F16),
    Some(GgmlType::BF16),
    Some(GgmlType::F32),
];

pub fn file_type_of(g: &GgufFile) -> Option<FileType> {
    g.get_u32("general.file_type")
        .ok()
        .and_then(FileType::from_id)
}

/// The importance-matrix keys of a file, if any.
pub fn imatrix_keys(g: &GgufFile) -> Vec<String> {
    g.metadata
        .entries
        .iter()
        .filter(|(k, _)| k.starts_with(IMATRIX_KEY_PREFIX))
        .map(|(k, _)| k.clone())
        .collect()
}

/// The plan conversion would follow for the artefact `g` (of `kind`), from the file's
/// own file type; `general.name` is taken from the file (it is `--name`, a free choice).
pub fn plan_for(
    src: &mut Source,
    g: &GgufFile,
    kind: ArtefactKind,
    progress: &dyn Progress,
) -> std::result::Result<ArtefactPlan, String> {
    let ft = file_type_of(g).ok_or_else(|| {
        format!(
            "{}: general.file_type is missing or unknown, so the conversion it claims cannot be re-derived",
            g.path.display()
        )
    })?;
    // An mmproj is float (F32/F16/BF16) or has its CLIP matrices in Q8_0 (--vision-type Q8_0).
    let (ft, vision) = match (kind, ft) {
        (ArtefactKind::Mmproj, FileType::MostlyQ8_0) => (ft, Some(GgmlType::Q8_0)),
        (
            ArtefactKind::Mmproj,
            FileType::AllF32 | FileType::MostlyF16 | FileType::MostlyBF16,
        ) => (ft, None),
        (ArtefactKind::Mmproj, other) => {
            return Err(format!(
                "{}: general.file_type {} is not one conversion writes for an mmproj (F32, F16, BF16, Q8_0)",
                g.path.display(),
                other.name()
            ))
        }
        _ => (ft, None),
    };
    let name = g
        .get("general.name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| src.name.clone());
    let plans = plan_artefacts(src, &name, ft, vision, Path::new("."), progress)
        .map_err(|e| format!("planning the conversion: {e}"))?;
    plans
        .into_iter()
        .find(|p| p.kind == kind)
        .ok_or_else(|| format!("the recipe has no {kind} artefact"))
}

/// A short, comparable description of two differing values (arrays: the first differing element).
fn describe_diff(want: &Value, got: &Value) -> String {
    match (want, got) {
        (Value::Array(tw, w), Value::Array(tg, g)) => {
            if tw != tg || w.len() != g.len() {
                return format!(
                    "expected {}, found {}",
                    want.display_short(),
                    got.display_short()
                );
            }
            match w.iter().zip(g).position(|(a, b)| a != b) {
                Some(i) => format!(
                    "element {i}: expected {}, found {}",
                    w[i].display_short(),
                    g[i].display_short()
                ),
                None => "equal".into(),
            }
        }
        _ if want.value_type() != got.value_type() => format!(
            "expected {} {}, found {} {}",
            want.value_type().name(),
            want.display_short(),
            got.value_type().name(),
            got.display_short()
        ),
        _ => format!(
            "expected {}, found {}",
            want.display_short(),
            got.display_short()
        ),
    }
}

/// Every difference between planned and actual metadata (order aside: runtimes read by key).
pub fn metadata_diffs(file: &Path, want: &Metadata, got: &Metadata) -> Vec<String> {
    let f = file.display();
    let mut out = vec![];
    for (k, w) in &want.entries {
        match got.get(k) {
            None => out.push(format!("{f}: metadata key '{k}' is missing")),
            Some(g) if g != w => out.push(format!("{f}: metadata '{k}': {}", describe_diff(w, g))),
            _ => {}
        }
    }
    for (k, g) in &got.entries {
        if want.get(k).is_none() && !k.starts_with(IMATRIX_KEY_PREFIX) {
            out.push(format!(
                "{f}: metadata key '{k}' = {} is not one conversion writes",
                g.display_short()
            ));
        }
    }
    out
}

/// Missing, extra, reshaped or retyped tensors against the plan.
/// How an artefact's tensor list differs from the plan's, tensor by tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum ListDiff {
    Missing {
        name: String,
    },
    Shape {
        name: String,
        got: Vec<u64>,
        want: Vec<u64>,
    },
    Type {
        name: String,
        got: GgmlType,
        want: GgmlType,
    },
    Extra {
        name: String,
    },
}

impl ListDiff {
    /// Whether the artefact cannot be run in the model's shapes (a tensor absent or reshaped).
    pub fn stops_the_forward(&self) -> bool {
        matches!(self, ListDiff::Missing { .. } | ListDiff::Shape { .. })
    }
    /// The finding as the report words it.
    pub fn describe(&self, file: &Path) -> String {
        let f = file.display();
        match self {
            ListDiff::Missing { name } => format!("{f}: tensor '{name}' is missing"),
            ListDiff::Shape { name, got, want } => {
                format!("{f}: tensor '{name}' has ne {got:?}, conversion writes {want:?}")
            }
            ListDiff::Type { name, got, want } => format!(
                "{f}: tensor '{name}' is {got}, conversion writes {want} for this file type"
            ),
            ListDiff::Extra { name } => {
                format!("{f}: tensor '{name}' is not one conversion writes")
            }
        }
    }
}

/// The artefact's tensor list against the plan: names, shapes and types.
pub fn tensor_list_diffs(plan: &ArtefactPlan, g: &GgufFile) -> Vec<ListDiff> {
    let mut out = vec![];
    let planned: BTreeMap<&str, _> = plan
        .tensors
        .iter()
        .map(|t| (t.info.name.as_str(), &t.info))
        .collect();
    for (name, want) in &planned {
        let name = name.to_string();
        match g.tensor(&name) {
            None => out.push(ListDiff::Missing { name }),
            Some(t) if t.info.ne != want.ne => out.push(ListDiff::Shape {
                name,
                got: t.info.ne.clone(),
                want: want.ne.clone(),
            }),
            Some(t) if t.info.ty != want.ty => out.push(ListDiff::Type {
                name,
                got: t.info.ty,
                want: want.ty,
            }),
            _ => {}
        }
    }
    for t in &g.tensors {
        if !planned.contains_key(t.info.name.as_str()) {
            out.push(ListDiff::Extra {
                name: t.info.name.clone(),
            });
        }
    }
    out
}

/// The bytes conversion writes for a source row in type `out`, by way of a float intermediate
/// (`via`) or in one pass, through the same encoder hf-to-gguf and quantize use.
pub fn emit(src: &Source, r: &SourceRow, out: GgmlType, via: Option<GgmlType>) -> Result<Vec<u8>> {
    encode_via(src, r, src.read(r)?, out, via)
}

/// As `emit`, but from the tensor as the checkpoint stores it (HF layout: Q/K rows not
/// permuted), for the expected model. Quantization blocks run along rows, so this equals
/// `emit`'s values up to the order of rows.
pub fn emit_as_stored(
    src: &Source,
    r: &SourceRow,
    out: GgmlType,
    via: Option<GgmlType>,
) -> Result<Vec<u8>> {
    encode_via(src, r, src.store(r.store).get(&r.row.src)?, out, via)
}

fn encode_via(
    src: &Source,
    r: &SourceRow,
    data: crate::formats::checkpoint::store::SrcTensor<'_>,
    out: GgmlType,
    via: Option<GgmlType>,
) -> Result<Vec<u8>> {
    let row_len = *r.row.shape.last().unwrap_or(&1);
    let tag = |e: Error| e.in_tensor(src.file_of(r), &r.row.src);
    let mut bytes = vec![];
    match via {
        Some(mid) if mid != data.ty && mid != out => {
            let mut cast = vec![];
            encode_tensor_bytes(data.ty, &data.data, row_len, mid, &mut cast).map_err(tag)?;
            encode_tensor_bytes(mid, &cast, row_len, out, &mut bytes).map_err(tag)?;
        }
        _ => {
            encode_tensor_bytes(data.ty, &data.data, row_len, out, &mut bytes).map_err(tag)?;
        }
    }
    Ok(bytes)
}

/// One tensor whose bytes differ from the plan's output.
#[derive(Debug, Clone, Serialize)]
pub struct TensorMismatch {
    pub tensor: String,
    pub file: String,
    pub ggml_type: String,
    /// Index of the first differing block (a value for float types).
    pub first_block: usize,
    /// The row (PyTorch order) that block lies in.
    pub first_row: usize,
    pub blocks_differing: usize,
    pub blocks: usize,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct TensorCheck {
    /// Tensors whose bytes were compared with the plan's output.
    pub compared: usize,
    pub equal: usize,
    /// Tensors not compared (missing, reshaped or retyped: the header check names them).
    pub not_compared: usize,
    /// Which road reproduced the quantized tensors ("one pass", "via F16", ...), per file.
    pub roads: BTreeMap<String, String>,
    pub mismatches: Vec<TensorMismatch>,
    /// The first non-finite value stored in the artefacts ("tensor, element i").
    pub first_nonfinite: Option<String>,
}

/// Index of the first NaN/Inf among a tensor's stored values (quantized: from their scales).
fn stored_nonfinite(ty: GgmlType, bytes: &[u8]) -> Option<usize> {
    if ty.is_quantized() {
        crate::quant::first_nonfinite_block(ty, bytes)
    } else {
        first_nonfinite(ty, bytes)
    }
}

fn road_name(via: Option<GgmlType>) -> String {
    via.map_or("one pass".into(), |t| format!("via {t}"))
}

/// Compare every artefact tensor the plan also has (same shape and type) with the plan's output.
/// Returns the report and the names proven equal.
pub fn check_tensors(
    src: &Source,
    art: &GgufWeights,
    progress: &dyn Fn(&str),
) -> Result<(TensorCheck, HashSet<String>)> {
    let mut out = TensorCheck::default();
    let mut proven = HashSet::new();
    for g in [&art.llm, &art.mmproj] {
        let fname = crate::convert::manifest::file_name(&g.path);
        // Try first the road that reproduced the previous quantized tensor of this file.
        let mut roads: Vec<Option<GgmlType>> = INTERMEDIATES.to_vec();
        let mut used: Vec<String> = vec![];
        let mut any_quantized = false;
        for (i, t) in g.tensors.iter().enumerate() {
            let name = &t.info.name;
            progress(name);
            // The next tensor's source pages are read in the background while this one is
            // encoded (a checkpoint not in the page cache otherwise costs a read per tensor
            // with the CPU idle).
            if let Some(next) = g.tensors.get(i + 1).and_then(|n| src.row(&n.info.name)) {
                src.prefetch(next);
            }
            let stored = g.data(t);
            if out.first_nonfinite.is_none() {
                if let Some(i) = stored_nonfinite(t.info.ty, stored) {
                    out.first_nonfinite = Some(format!("{fname}: tensor '{name}', element {i}"));
                }
            }
            let Some(r) = src.row(name) else {
                out.not_compared += 1;
                continue;
            };
            let ne: Vec<u64> = r.row.shape.iter().rev().map(|&d| d as u64).collect();
            if ne != t.info.ne {
                out.not_compared += 1;
                continue;
            }
            out.compared += 1;
            let candidates: &[Option<GgmlType>] = if t.info.ty.is_quantized() {
                &roads
            } else {
                &[None]
            };
            let mut matched = None;
            let mut first = None;
            for &via in candidates {
                let want = emit(src, r, t.info.ty, via)?;
                if want == stored {
                    matched = Some(via);
                    break;
                }
                first.get_or_insert(want);
            }
            src.store(r.store).release(&r.row.src);
            g.release(t);
            match matched {
                Some(via) => {
                    out.equal += 1;
                    proven.insert(name.clone());
                    if t.info.ty.is_quantized() {
                        any_quantized = true;
                        // A road is named when a tensor needed it (the preferred one failed);
                        // tensors equal on every road say nothing about the road.
                        if via != roads[0] {
                            roads.retain(|&x| x != via);
                            roads.insert(0, via);
                            used.push(road_name(via));
                        }
                    }
                }
                None => {
                    let want = first.unwrap_or_default();
                    out.mismatches
                        .push(block_diff(name, &fname, t.info.ty, r, &want, stored));
                }
            }
        }
        if any_quantized {
            let road = if used.is_empty() {
                road_name(None)
            } else {
                used.join(" + ")
            };
            out.roads.insert(fname, road);
        }
    }
    Ok((out, proven))
}

fn block_diff(
    name: &str,
    fname: &str,
    ty: GgmlType,
    r: &SourceRow,
    want: &[u8],
    got: &[u8],
) -> TensorMismatch {
    let bs = ty.type_size();
    let diff: Vec<usize> = want
        .chunks(bs)
        .zip(got.chunks(bs))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    let first_block = diff.first().copied().unwrap_or(0);
    let row_len = (*r.row.shape.last().unwrap_or(&1)).max(1);
    TensorMismatch {
        tensor: name.to_string(),
        file: fname.to_string(),
        ggml_type: ty.name().to_string(),
        first_block,
        first_row: first_block * ty.block_size() / row_len,
        blocks_differing: diff.len().max((want.len() != got.len()) as usize),
        blocks: got.len() / bs.max(1),
    }
}

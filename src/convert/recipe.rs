//! Conversion recipes as data: `converters/*.json` (which components go to which artefact, which
//! hyper-parameters become which metadata keys) and `schemas/names/*.json` + `schemas/dtype-policy.json`
//! (HF -> GGUF tensor names, expected shapes, transforms, output types). The files are embedded in
//! the binary and parsed here; no name mapping lives in Rust code.
use crate::formats::gguf::{Metadata, Value};
use crate::ground::dtype::GgmlType;
use crate::ground::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;

/// The embedded data files, by name.
pub const NAME_MAPS: &[(&str, &str)] = &[
    ("llama", include_str!("../../schemas/names/llama.json")),
    (
        TOWER_COMPONENT,
        include_str!("../../schemas/names/clip-vision.json"),
    ),
    ("mmfuser", include_str!("../../schemas/names/mmfuser.json")),
    (
        "mlp-projector",
        include_str!("../../schemas/names/mlp-projector.json"),
    ),
    (
        "llava-hf-projector",
        include_str!("../../schemas/names/llava-hf-projector.json"),
    ),
];
pub const RECIPES: &[(&str, &str)] = &[
    (
        "llava-mmfuser",
        include_str!("../../converters/llava-mmfuser.json"),
    ),
    ("llava-1.5", include_str!("../../converters/llava-1.5.json")),
    ("llava-hf", include_str!("../../converters/llava-hf.json")),
];
pub const DTYPE_POLICY: &str = include_str!("../../schemas/dtype-policy.json");
/// Vision towers LLaVA checkpoints name only by hub id (`mm_vision_tower`), with their configs.
pub const VISION_TOWERS: &str = include_str!("../../schemas/vision-towers.json");

/// The component whose tensors may come from a separate vision-tower directory.
pub const TOWER_COMPONENT: &str = "clip-vision";

/// The two artefacts a conversion writes: the language model (what stock llama.cpp loads) and
/// the mmproj (CLIP tower, fuser, projector). Spelled "llm" / "mmproj" in recipes and manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtefactKind {
    Llm,
    Mmproj,
}

impl ArtefactKind {
    pub fn name(self) -> &'static str {
        match self {
            ArtefactKind::Llm => "llm",
            ArtefactKind::Mmproj => "mmproj",
        }
    }
}

impl std::fmt::Display for ArtefactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// llama.cpp's Q row permutation (rotate_half layout -> interleaved pairs), n_head heads.
    PermuteQ,
    /// The same for K, with n_head_kv heads.
    PermuteK,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NameRule {
    pub hf: String,
    pub gguf: String,
    pub shape: Vec<String>,
    #[serde(default)]
    pub per_layer: Option<String>,
    #[serde(default)]
    pub transform: Option<Transform>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NameMap {
    pub component: String,
    #[serde(default)]
    pub source_prefix: String,
    pub tensors: Vec<NameRule>,
    #[serde(default)]
    pub drop: Vec<String>,
    /// Other spellings of the source names, relative to the component's prefix: a name starting
    /// with the first string is read as if it started with the second (first match wins).
    #[serde(default)]
    pub aliases: Vec<(String, String)>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetaRule {
    pub key: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default, rename = "const")]
    pub constant: Option<serde_json::Value>,
    /// Written only when its value is known (e.g. general.basename).
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ArtefactSpec {
    pub kind: ArtefactKind,
    pub file: String,
    pub components: Vec<String>,
    pub metadata: Vec<MetaRule>,
    #[serde(default)]
    pub tokenizer: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Recipe {
    pub name: String,
    pub select_layer: String,
    pub projector_type: String,
    pub artefacts: Vec<ArtefactSpec>,
    /// Where a component lives in the checkpoint, when not at its name map's `source_prefix`
    /// (`clip-vision`: the embedded tower).
    #[serde(default)]
    pub prefixes: BTreeMap<String, String>,
    /// Other spellings of whole checkpoint names (other transformers versions), applied before
    /// the name maps' own aliases: a name starting with the first string is read as if it
    /// started with the second (first match wins).
    #[serde(default)]
    pub aliases: Vec<(String, String)>,
}

impl Recipe {
    /// The checkpoint prefix of a component's names.
    pub fn prefix<'a>(&'a self, map: &'a NameMap) -> &'a str {
        self.prefixes
            .get(&map.component)
            .map_or(map.source_prefix.as_str(), String::as_str)
    }
}

/// `name` rewritten by the first rule whose first string prefixes it; None when no rule matches.
pub fn rewrite(rules: &[(String, String)], name: &str) -> Option<String> {
    rules.iter().find_map(|(from, to)| {
        name.strip_prefix(from.as_str())
            .map(|rest| format!("{to}{rest}"))
    })
}

/// A vision tower known by hub id: its `config.json` (a CLIPVisionConfig's keys) and
/// preprocessor values, for checkpoints that embed the weights but carry no `vision_config`.
#[derive(Debug, Clone, Deserialize)]
pub struct KnownTower {
    pub hub_id: String,
    pub config: serde_json::Value,
    #[serde(default)]
    pub preprocessor: Option<serde_json::Value>,
}

pub fn known_tower(hub_id: &str) -> Result<Option<KnownTower>> {
    #[derive(Deserialize)]
    struct Table {
        towers: Vec<KnownTower>,
    }
    let t: Table = serde_json::from_str(VISION_TOWERS)
        .map_err(|e| Error::other(format!("schemas/vision-towers.json: {e}")))?;
    Ok(t.towers.into_iter().find(|k| k.hub_id == hub_id))
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Cond {
    max_ndim: Option<usize>,
    suffix: Option<String>,
    not_suffix: Option<String>,
    name: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct DtypeRule {
    #[serde(rename = "if")]
    cond: Cond,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    when_outtype: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DtypePolicy {
    rules: Vec<DtypeRule>,
}

impl DtypePolicy {
    pub fn load() -> Self {
        serde_json::from_str(DTYPE_POLICY).expect("schemas/dtype-policy.json is valid (tested)")
    }
    /// The output type of a converted tensor given its GGUF name, rank and the requested outtype.
    pub fn choose(&self, name: &str, ndim: usize, outtype: GgmlType) -> GgmlType {
        for r in &self.rules {
            let c = &r.cond;
            let ok = c.max_ndim.is_none_or(|m| ndim <= m)
                && c.suffix.as_ref().is_none_or(|s| name.ends_with(s.as_str()))
                && c.not_suffix
                    .as_ref()
                    .is_none_or(|s| !name.ends_with(s.as_str()))
                && c.name.as_ref().is_none_or(|s| name == s)
                && c.prefix
                    .as_ref()
                    .is_none_or(|s| name.starts_with(s.as_str()));
            if ok {
                let t = r.when_outtype.get(outtype.name()).unwrap_or(&r.ty);
                return if t == "outtype" {
                    outtype
                } else {
                    GgmlType::from_name(t).expect("policy names a known type (tested)")
                };
            }
        }
        outtype
    }
}

pub fn name_map(component: &str) -> Result<NameMap> {
    let (_, text) = NAME_MAPS
        .iter()
        .find(|(n, _)| *n == component)
        .ok_or_else(|| Error::other(format!("no name map for component '{component}'")))?;
    serde_json::from_str(text)
        .map_err(|e| Error::other(format!("schemas/names/{component}.json: {e}")))
}

/// The GGUF name prefix of a component's per-layer tensors (`v.blk.` for the CLIP tower): what
/// its name map writes before the layer index.
pub fn layer_prefix(component: &str) -> Result<String> {
    let map = name_map(component)?;
    map.tensors
        .iter()
        .filter(|r| r.per_layer.is_some())
        .find_map(|r| r.gguf.split_once("{i}").map(|(p, _)| p.to_string()))
        .ok_or_else(|| Error::other(format!("name map '{component}' has no per-layer tensors")))
}

pub fn recipe(name: &str) -> Result<Recipe> {
    let (_, text) = RECIPES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| Error::other(format!("no recipe '{name}'")))?;
    serde_json::from_str(text).map_err(|e| Error::other(format!("converters/{name}.json: {e}")))
}

/// Named values recipes refer to: shape variables (`n_embd`, `c_ff`...) and metadata sources
/// (`llama.n_layer`, `clip.image_mean`...).
#[derive(Debug, Clone, Default)]
pub struct Vars {
    pub map: BTreeMap<String, Var>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Var {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    Floats(Vec<f64>),
    Ints(Vec<i64>),
}

impl Vars {
    pub fn set(&mut self, k: &str, v: Var) {
        self.map.insert(k.to_string(), v);
    }
    pub fn int(&self, k: &str) -> Result<i64> {
        match self.map.get(k) {
            Some(Var::Int(v)) => Ok(*v),
            other => Err(Error::other(format!(
                "recipe variable '{k}' is not an integer ({other:?})"
            ))),
        }
    }
    /// Evaluate a shape expression: integers and variables joined by `*` and `/`.
    pub fn eval(&self, expr: &str) -> Result<i64> {
        let mut acc: i64 = 1;
        let mut op = '*';
        let mut token = String::new();
        let apply = |acc: i64, op: char, tok: &str| -> Result<i64> {
            let v = match tok.trim().parse::<i64>() {
                Ok(v) => v,
                Err(_) => self.int(tok.trim())?,
            };
            Ok(if op == '*' { acc * v } else { acc / v.max(1) })
        };
        for ch in expr.chars() {
            if ch == '*' || ch == '/' {
                acc = apply(acc, op, &token)?;
                token.clear();
                op = ch;
            } else {
                token.push(ch);
            }
        }
        apply(acc, op, &token)
    }
    pub fn value(&self, rule: &MetaRule) -> Result<Value> {
        let bad = |why: &str| Error::other(format!("metadata '{}': {why}", rule.key));
        if let Some(c) = &rule.constant {
            return Ok(match (rule.ty.as_str(), c) {
                ("str", serde_json::Value::String(s)) => Value::String(s.clone()),
                ("bool", serde_json::Value::Bool(b)) => Value::Bool(*b),
                ("u32", serde_json::Value::Number(n)) => {
                    Value::U32(n.as_u64().ok_or_else(|| bad("not a u32"))? as u32)
                }
                ("f32", serde_json::Value::Number(n)) => {
                    Value::F32(n.as_f64().ok_or_else(|| bad("not a number"))? as f32)
                }
                _ => return Err(bad("constant does not match its type")),
            });
        }
        let src = rule
            .value
            .as_deref()
            .ok_or_else(|| bad("neither value nor const"))?;
        let v = self
            .map
            .get(src)
            .ok_or_else(|| bad(&format!("unknown source '{src}'")))?;
        Ok(match (rule.ty.as_str(), v) {
            ("u32", Var::Int(i)) => {
                Value::U32(u32::try_from(*i).map_err(|_| bad("out of u32 range"))?)
            }
            ("i32", Var::Int(i)) => Value::I32(*i as i32),
            ("f32", Var::Float(f)) => Value::F32(*f as f32),
            ("str", Var::Str(s)) => Value::String(s.clone()),
            ("bool", Var::Bool(b)) => Value::Bool(*b),
            ("f32[]", Var::Floats(v)) => Value::f32s(v.iter().map(|&x| x as f32)),
            ("i32[]", Var::Ints(v)) => Value::i32s(v.iter().map(|&x| x as i32)),
            _ => {
                return Err(bad(&format!(
                    "source '{src}' ({v:?}) does not fit type {}",
                    rule.ty
                )))
            }
        })
    }
    pub fn metadata(&self, rules: &[MetaRule]) -> Result<Metadata> {
        let mut m = Metadata::new();
        for r in rules {
            let absent = r.value.as_ref().is_some_and(|v| !self.map.contains_key(v));
            if r.optional && absent {
                continue;
            }
            m.set(&r.key, self.value(r)?);
        }
        Ok(m)
    }
}

/// One output tensor: where it comes from and what it becomes.
#[derive(Debug, Clone)]
pub struct PlanRow {
    pub src: String,
    pub dst: String,
    /// Expected PyTorch shape.
    pub shape: Vec<usize>,
    pub transform: Option<Transform>,
    pub component: String,
    /// The layer of a per-layer rule's row.
    pub layer: Option<usize>,
}

/// Expand a name map over its layer ranges. Returns the rows and the drop patterns (expanded).
pub fn expand(map: &NameMap, prefix: &str, vars: &Vars) -> Result<(Vec<PlanRow>, Vec<Pattern>)> {
    let mut rows = vec![];
    for r in &map.tensors {
        let n = match &r.per_layer {
            Some(v) => vars.int(v)? as usize,
            None => 1,
        };
        for i in 0..n {
            let sub = |s: &str| s.replace("{i}", &i.to_string());
            let shape = r
                .shape
                .iter()
                .map(|e| vars.eval(e).map(|v| v as usize))
                .collect::<Result<Vec<_>>>()?;
            rows.push(PlanRow {
                src: format!("{prefix}{}", sub(&r.hf)),
                dst: sub(&r.gguf),
                shape,
                transform: r.transform,
                component: map.component.clone(),
                layer: r.per_layer.is_some().then_some(i),
            });
            if r.per_layer.is_none() {
                break;
            }
        }
    }
    let drops = map
        .drop
        .iter()
        .map(|d| Pattern::parse(&format!("{prefix}{d}"), vars))
        .collect::<Result<Vec<_>>>()?;
    Ok((rows, drops))
}

/// A drop pattern: literal text with `*` (any suffix), `{i}` (any layer) or `{i>=var}` (layers from var on).
#[derive(Debug, Clone)]
pub struct Pattern {
    parts: Vec<PatPart>,
}
#[derive(Debug, Clone)]
enum PatPart {
    Lit(String),
    Any,
    Layer(usize),
}

impl Pattern {
    pub fn parse(s: &str, vars: &Vars) -> Result<Self> {
        let mut parts = vec![];
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix('*') {
                parts.push(PatPart::Any);
                rest = r;
            } else if let Some(r) = rest.strip_prefix('{') {
                let end = r
                    .find('}')
                    .ok_or_else(|| Error::other(format!("bad pattern '{s}'")))?;
                let inner = &r[..end];
                let min = match inner.strip_prefix("i>=") {
                    Some(v) => vars.int(v)? as usize,
                    None if inner == "i" => 0,
                    None => return Err(Error::other(format!("bad pattern '{s}'"))),
                };
                parts.push(PatPart::Layer(min));
                rest = &r[end + 1..];
            } else {
                let end = rest.find(['*', '{']).unwrap_or(rest.len());
                parts.push(PatPart::Lit(rest[..end].to_string()));
                rest = &rest[end..];
            }
        }
        Ok(Pattern { parts })
    }
    pub fn matches(&self, name: &str) -> bool {
        fn go(parts: &[PatPart], s: &str) -> bool {
            match parts.first() {
                None => s.is_empty(),
                Some(PatPart::Any) => true,
                Some(PatPart::Lit(l)) => s
                    .strip_prefix(l.as_str())
                    .is_some_and(|r| go(&parts[1..], r)),
                Some(PatPart::Layer(min)) => {
                    let digits = s.chars().take_while(|c| c.is_ascii_digit()).count();
                    digits > 0
                        && s[..digits].parse::<usize>().is_ok_and(|n| n >= *min)
                        && go(&parts[1..], &s[digits..])
                }
            }
        }
        go(&self.parts, name)
    }
}

/// llama.cpp's Q/K row permutation on a row-major [rows, cols] matrix of `elem` bytes per value:
/// within each head of `rows / n_head` rows, output row 2*i + a takes source row a*(hd/2) + i.
pub fn permute_rows(data: &[u8], rows: usize, cols: usize, n_head: usize, elem: usize) -> Vec<u8> {
    let hd = rows / n_head;
    let half = hd / 2;
    let row_bytes = cols * elem;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for a in 0..2 {
                let dst = h * hd + 2 * i + a;
                let src = h * hd + a * half + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_data_parses() {
        for (n, _) in NAME_MAPS {
            let m = name_map(n).unwrap();
            assert_eq!(&m.component, n);
            for t in &m.tensors {
                assert!(
                    t.gguf.len() < crate::formats::gguf::GGML_MAX_NAME,
                    "{}",
                    t.gguf
                );
            }
        }
        for (n, _) in RECIPES {
            let r = recipe(n).unwrap();
            for a in &r.artefacts {
                for c in &a.components {
                    name_map(c).unwrap();
                }
            }
        }
        let p = DtypePolicy::load();
        for r in &p.rules {
            for t in std::iter::once(&r.ty).chain(r.when_outtype.values()) {
                assert!(t == "outtype" || GgmlType::from_name(t).is_some(), "{t}");
            }
        }
    }

    #[test]
    fn dtype_policy_follows_llama_cpp() {
        let p = DtypePolicy::load();
        assert_eq!(
            p.choose("blk.0.attn_norm.weight", 1, GgmlType::F16),
            GgmlType::F32
        );
        assert_eq!(
            p.choose("blk.0.attn_q.weight", 2, GgmlType::F16),
            GgmlType::F16
        );
        assert_eq!(
            p.choose("blk.0.attn_q.weight", 2, GgmlType::BF16),
            GgmlType::BF16
        );
        assert_eq!(
            p.choose("mm.fuser.cross_attn.value_proj.weight", 2, GgmlType::BF16),
            GgmlType::F16
        );
        assert_eq!(
            p.choose("mm.fuser.cross_attn.value_proj.weight", 2, GgmlType::F32),
            GgmlType::F32
        );
        assert_eq!(p.choose("mm.fuser.gamma1", 1, GgmlType::F16), GgmlType::F32);
        assert_eq!(
            p.choose("v.position_embd.weight", 2, GgmlType::F16),
            GgmlType::F32
        );
        assert_eq!(
            p.choose("v.patch_embd.weight", 4, GgmlType::BF16),
            GgmlType::F16
        );
    }

    #[test]
    fn patterns() {
        let mut v = Vars::default();
        v.set("n_blocks", Var::Int(7));
        let p = Pattern::parse("vision_model.encoder.layers.{i>=n_blocks}.*", &v).unwrap();
        assert!(p.matches("vision_model.encoder.layers.7.mlp.fc1.weight"));
        assert!(p.matches("vision_model.encoder.layers.23.mlp.fc1.weight"));
        assert!(!p.matches("vision_model.encoder.layers.6.mlp.fc1.weight"));
        let q = Pattern::parse("model.layers.{i}.self_attn.rotary_emb.inv_freq", &v).unwrap();
        assert!(q.matches("model.layers.12.self_attn.rotary_emb.inv_freq"));
        assert!(!q.matches("model.layers.x.self_attn.rotary_emb.inv_freq"));
        assert_eq!(v.eval("n_blocks*2/7").unwrap(), 2);
    }

    #[test]
    fn permutation_matches_llama_cpp_formula() {
        // 2 heads of head_dim 4, one column: source rows 0..8.
        let data: Vec<u8> = (0u8..8).collect();
        let out = permute_rows(&data, 8, 1, 2, 1);
        // reshape(n_head, 2, hd/2).swapaxes(1,2): head 0 -> [0,2,1,3], head 1 -> [4,6,5,7]
        assert_eq!(out, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }
}

//! The one table between the model's hyper-parameters and the recipes' variables. The recipes'
//! metadata rules (converters/*.json: GGUF key <- variable) complete it to GGUF keys: conversion
//! reads the table one way (`vars_of`: the values the metadata is written from), the runtime the
//! other way (`hparams_from_gguf`: an artefact's hyper-parameters from the keys those same rules
//! wrote). A hyper-parameter named nowhere else, so adding one is one row here and one rule in a
//! recipe.
use crate::convert::recipe::{self, ArtefactKind, MetaRule, Recipe, Var, Vars};
use crate::formats::gguf::{GgufFile, Value};
use crate::ground::error::{Error, Result};
use crate::model::hparams::{
    ClipHParams, FuserHParams, LlamaHParams, ModelHParams, ProjectorHParams,
};

/// One hyper-parameter: its recipe variable, the artefact whose metadata holds it, and how it is
/// read from and written into `ModelHParams`.
struct Field {
    var: &'static str,
    home: ArtefactKind,
    get: fn(&ModelHParams) -> Option<Var>,
    /// Sets the field from a value read back; `Err` says why the value does not fit.
    set: fn(&mut ModelHParams, Var) -> std::result::Result<(), String>,
    /// What llama.cpp's loader assumes when the key is absent or unreadable (None: required).
    fallback: Option<fn(&mut ModelHParams, &GgufFile) -> Result<()>>,
}

/// Store a value read back (the setters' one step).
fn put<T>(slot: &mut T, v: std::result::Result<T, String>) -> std::result::Result<(), String> {
    *slot = v?;
    Ok(())
}
fn int(v: usize) -> Option<Var> {
    Some(Var::Int(v as i64))
}
fn float(v: f32) -> Option<Var> {
    Some(Var::Float(v as f64))
}
fn to_usize(v: Var) -> std::result::Result<usize, String> {
    match v {
        Var::Int(i) if i >= 0 => Ok(i as usize),
        other => Err(format!("{other:?} is not a non-negative integer")),
    }
}
fn to_f32(v: Var) -> std::result::Result<f32, String> {
    match v {
        Var::Float(f) => Ok(f as f32),
        other => Err(format!("{other:?} is not a number")),
    }
}
fn to_rgb(v: Var) -> std::result::Result<[f32; 3], String> {
    match v {
        Var::Floats(f) if f.len() >= 3 => Ok([f[0] as f32, f[1] as f32, f[2] as f32]),
        other => Err(format!("{other:?} is not 3 numbers")),
    }
}
fn floats(v: &[f32]) -> Option<Var> {
    Some(Var::Floats(v.iter().map(|&x| x as f64).collect()))
}
fn ints(v: &[usize]) -> Option<Var> {
    Some(Var::Ints(v.iter().map(|&x| x as i64).collect()))
}
fn to_bool(v: Var) -> std::result::Result<bool, String> {
    match v {
        Var::Bool(b) => Ok(b),
        other => Err(format!("{other:?} is not a boolean")),
    }
}
fn to_usizes(v: Var) -> std::result::Result<Vec<usize>, String> {
    match v {
        Var::Ints(l) if l.iter().all(|&i| i >= 0) => Ok(l.iter().map(|&i| i as usize).collect()),
        other => Err(format!("{other:?} is not a list of non-negative integers")),
    }
}
fn vocab_from_embedding(h: &mut ModelHParams, g: &GgufFile) -> Result<()> {
    let t = g
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::input(&g.path, "no llama.vocab_size and no token_embd.weight"))?;
    h.llama.n_vocab = t.info.ne.get(1).copied().unwrap_or(0) as usize;
    Ok(())
}
fn fuser(h: &mut ModelHParams) -> std::result::Result<&mut FuserHParams, String> {
    match &mut h.projector {
        ProjectorHParams::MmFuser(f) => Ok(f),
        ProjectorHParams::Mlp => Err("a plain LLaVA projector has no fuser".into()),
    }
}
fn fuser_of(h: &ModelHParams) -> Option<&FuserHParams> {
    match &h.projector {
        ProjectorHParams::MmFuser(f) => Some(f),
        ProjectorHParams::Mlp => None,
    }
}

use ArtefactKind::{Llm, Mmproj};

/// Every hyper-parameter a recipe writes. `llama.head_dim` is derived (n_embd / n_head) and
/// `clip.n_blocks` is the blocks the artefact keeps (the largest selected layer): read back, it
/// is the tower's depth.
#[rustfmt::skip]
const FIELDS: &[Field] = &[
    Field { var: "llama.n_layer", home: Llm, get: |h| int(h.llama.n_layer), set: |h, v| put(&mut h.llama.n_layer, to_usize(v)), fallback: None },
    Field { var: "llama.n_ctx", home: Llm, get: |h| int(h.llama.n_ctx), set: |h, v| put(&mut h.llama.n_ctx, to_usize(v)), fallback: None },
    Field { var: "llama.n_embd", home: Llm, get: |h| int(h.llama.n_embd), set: |h, v| put(&mut h.llama.n_embd, to_usize(v)), fallback: None },
    Field { var: "llama.n_ff", home: Llm, get: |h| int(h.llama.n_ff), set: |h, v| put(&mut h.llama.n_ff, to_usize(v)), fallback: None },
    Field { var: "llama.n_head", home: Llm, get: |h| int(h.llama.n_head), set: |h, v| put(&mut h.llama.n_head, to_usize(v)), fallback: None },
    // llama.cpp: head_count_kv defaults to head_count.
    Field { var: "llama.n_head_kv", home: Llm, get: |h| int(h.llama.n_head_kv), set: |h, v| put(&mut h.llama.n_head_kv, to_usize(v)),
            fallback: Some(|h, _| { h.llama.n_head_kv = h.llama.n_head; Ok(()) }) },
    // llama.cpp: rope.freq_base defaults to 10000.
    Field { var: "llama.rope_theta", home: Llm, get: |h| float(h.llama.rope_theta), set: |h, v| put(&mut h.llama.rope_theta, to_f32(v)),
            fallback: Some(|h, _| { h.llama.rope_theta = 10000.0; Ok(()) }) },
    Field { var: "llama.rms_eps", home: Llm, get: |h| float(h.llama.rms_eps), set: |h, v| put(&mut h.llama.rms_eps, to_f32(v)), fallback: None },
    // llama.cpp: without vocab_size, the token list (here: the embedding's rows).
    Field { var: "llama.n_vocab", home: Llm, get: |h| int(h.llama.n_vocab), set: |h, v| put(&mut h.llama.n_vocab, to_usize(v)),
            fallback: Some(vocab_from_embedding) },
    // Derived (n_embd / n_head): written, not read back.
    Field { var: "llama.head_dim", home: Llm, get: |h| int(h.llama.head_dim()), set: |_, _| Ok(()), fallback: Some(|_, _| Ok(())) },
    Field { var: "clip.image_size", home: Mmproj, get: |h| int(h.clip.image_size), set: |h, v| put(&mut h.clip.image_size, to_usize(v)), fallback: None },
    Field { var: "clip.patch_size", home: Mmproj, get: |h| int(h.clip.patch_size), set: |h, v| put(&mut h.clip.patch_size, to_usize(v)), fallback: None },
    Field { var: "clip.n_embd", home: Mmproj, get: |h| int(h.clip.n_embd), set: |h, v| put(&mut h.clip.n_embd, to_usize(v)), fallback: None },
    Field { var: "clip.n_ff", home: Mmproj, get: |h| int(h.clip.n_ff), set: |h, v| put(&mut h.clip.n_ff, to_usize(v)), fallback: None },
    Field { var: "clip.n_head", home: Mmproj, get: |h| int(h.clip.n_head), set: |h, v| put(&mut h.clip.n_head, to_usize(v)), fallback: None },
    Field { var: "clip.n_blocks", home: Mmproj, get: |h| int(h.clip.blocks_needed()), set: |h, v| put(&mut h.clip.n_layer, to_usize(v)), fallback: None },
    Field { var: "clip.eps", home: Mmproj, get: |h| float(h.clip.eps), set: |h, v| put(&mut h.clip.eps, to_f32(v)), fallback: None },
    // clip.cpp: use_gelu defaults to false (quick_gelu).
    Field { var: "clip.use_gelu", home: Mmproj, get: |h| Some(Var::Bool(!h.clip.quick_gelu)), set: |h, v| put(&mut h.clip.quick_gelu, to_bool(v).map(|b| !b)),
            fallback: Some(|h, _| { h.clip.quick_gelu = true; Ok(()) }) },
    Field { var: "clip.image_mean", home: Mmproj, get: |h| floats(&h.clip.image_mean), set: |h, v| put(&mut h.clip.image_mean, to_rgb(v)), fallback: None },
    Field { var: "clip.image_std", home: Mmproj, get: |h| floats(&h.clip.image_std), set: |h, v| put(&mut h.clip.image_std, to_rgb(v)), fallback: None },
    Field { var: "clip.feature_layers", home: Mmproj, get: |h| ints(&h.clip.feature_layers), set: |h, v| put(&mut h.clip.feature_layers, to_usizes(v)), fallback: None },
    Field { var: "fuser.n_heads", home: Mmproj, get: |h| int(fuser_of(h)?.n_heads), set: |h, v| put(&mut fuser(h)?.n_heads, to_usize(v)), fallback: None },
    Field { var: "fuser.n_levels", home: Mmproj, get: |h| int(fuser_of(h)?.n_levels), set: |h, v| put(&mut fuser(h)?.n_levels, to_usize(v)), fallback: None },
    Field { var: "fuser.n_points", home: Mmproj, get: |h| int(fuser_of(h)?.n_points), set: |h, v| put(&mut fuser(h)?.n_points, to_usize(v)), fallback: None },
    Field { var: "fuser.eps", home: Mmproj, get: |h| float(fuser_of(h)?.eps), set: |h, v| put(&mut fuser(h)?.eps, to_f32(v)), fallback: None },
];

/// The recipe variables of `hp` (what the metadata rules write from).
pub fn vars_of(hp: &ModelHParams, vars: &mut Vars) {
    for f in FIELDS {
        if let Some(v) = (f.get)(hp) {
            vars.set(f.var, v);
        }
    }
}

/// A metadata value read back by its rule's type, as a variable (None: absent or another type).
fn read_var(g: &GgufFile, rule: &MetaRule) -> Result<Var> {
    let key = rule.key.as_str();
    Ok(match rule.ty.as_str() {
        "u32" => Var::Int(g.get_u32(key)? as i64),
        "f32" => Var::Float(g.get_f32(key)? as f64),
        "bool" => Var::Bool(g.get(key).and_then(Value::as_bool).ok_or_else(|| {
            Error::input(&g.path, format!("metadata '{key}' is missing or not BOOL"))
        })?),
        "f32[]" => match g.get(key) {
            Some(Value::Array(_, v)) if v.len() >= 3 => Var::Floats(
                v.iter()
                    .map(|x| x.as_f32().map(f64::from))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        Error::input(&g.path, format!("'{key}' must be a FLOAT32 array"))
                    })?,
            ),
            _ => {
                return Err(Error::input(
                    &g.path,
                    format!("metadata '{key}' is missing or not a FLOAT32 array of 3"),
                ))
            }
        },
        "i32[]" => match g.get(key) {
            Some(Value::Array(_, v)) => Var::Ints(
                v.iter()
                    .map(|x| x.as_i64().filter(|&i| i >= 0))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        Error::input(
                            &g.path,
                            format!("{key} must hold non-negative INT32 values"),
                        )
                    })?,
            ),
            _ => {
                return Err(Error::input(
                    &g.path,
                    format!("metadata '{key}' is missing"),
                ))
            }
        },
        other => {
            return Err(Error::input(
                &g.path,
                format!("metadata '{key}': type {other} is not read back"),
            ))
        }
    })
}

/// The recipe whose mmproj declares this projector type (`clip.projector_type`).
fn recipe_for_projector(projector: &str) -> Result<Recipe> {
    for (name, _) in recipe::RECIPES {
        let r = recipe::recipe(name)?;
        let declares = r.artefacts.iter().any(|a| {
            a.metadata.iter().any(|m| {
                m.key == "clip.projector_type"
                    && m.constant.as_ref().and_then(|c| c.as_str()) == Some(projector)
            })
        });
        if declares {
            return Ok(r);
        }
    }
    Err(Error::other(format!(
        "no recipe writes clip.projector_type '{projector}'"
    )))
}

/// Hyper-parameters from an artefact pair's metadata: the keys the recipe's rules wrote, read
/// back through the table (the same keys llama.cpp reads).
pub fn hparams_from_gguf(llm: &GgufFile, mmproj: &GgufFile) -> Result<ModelHParams> {
    let projector_type = mmproj.get_str("clip.projector_type")?;
    let projector = match projector_type {
        "mmfuser" => ProjectorHParams::MmFuser(FuserHParams::default()),
        "mlp" => ProjectorHParams::Mlp,
        other => {
            return Err(Error::input(
                &mmproj.path,
                format!("clip.projector_type '{other}' is not supported (mmfuser, mlp)"),
            ))
        }
    };
    let recipe = recipe_for_projector(projector_type)?;
    let mut hp = ModelHParams {
        llama: LlamaHParams::default(),
        clip: ClipHParams::default(),
        projector,
    };
    // Required values first, in table order, then the loader's defaults (which may depend on
    // them: head_count_kv on head_count).
    let mut fallbacks = vec![];
    for f in FIELDS {
        let g = match f.home {
            Llm => llm,
            Mmproj => mmproj,
        };
        let rule = recipe
            .artefacts
            .iter()
            .filter(|a| a.kind == f.home)
            .flat_map(|a| &a.metadata)
            .find(|m| m.value.as_deref() == Some(f.var));
        let Some(rule) = rule else { continue };
        match read_var(g, rule) {
            Ok(v) => (f.set)(&mut hp, v)
                .map_err(|why| Error::input(&g.path, format!("metadata '{}': {why}", rule.key)))?,
            Err(e) => match f.fallback {
                Some(fb) => fallbacks.push((fb, g)),
                None => return Err(e),
            },
        }
    }
    for (fb, g) in fallbacks {
        fb(&mut hp, g)?;
    }
    Ok(hp)
}

/// The GGUF key a recipe writes `var` to (the first rule naming it), for messages.
fn key_of(var: &str) -> String {
    recipe::RECIPES
        .iter()
        .filter_map(|(name, _)| recipe::recipe(name).ok())
        .flat_map(|r| r.artefacts.into_iter().flat_map(|a| a.metadata))
        .find(|m| m.value.as_deref() == Some(var))
        .map_or_else(|| var.to_string(), |m| m.key)
}

fn show(v: &Var) -> String {
    match v {
        Var::Float(f) => format!("{:e}", *f as f32),
        Var::Int(i) => i.to_string(),
        Var::Bool(b) => b.to_string(),
        Var::Str(s) => s.clone(),
        Var::Ints(l) => format!("{l:?}"),
        Var::Floats(l) => format!("{:?}", l.iter().map(|&x| x as f32).collect::<Vec<_>>()),
    }
}

/// Named differences of two hyper-parameter sets, row by row of the table, each named by the GGUF
/// key it is written to (`key: source X, artefact Y`). Derived values are not repeated.
pub fn hparam_diffs(s: &ModelHParams, a: &ModelHParams) -> Vec<String> {
    let mut out = vec![];
    let kind = |h: &ModelHParams| match h.projector {
        ProjectorHParams::MmFuser(_) => "mmfuser",
        ProjectorHParams::Mlp => "mlp",
    };
    if kind(s) != kind(a) {
        out.push(format!(
            "clip.projector_type: source {}, artefact {}",
            kind(s),
            kind(a)
        ));
    }
    for f in FIELDS.iter().filter(|f| f.var != "llama.head_dim") {
        let (x, y) = ((f.get)(s), (f.get)(a));
        if x != y {
            let show_opt = |v: Option<Var>| v.as_ref().map_or("-".into(), show);
            out.push(format!(
                "{}: source {}, artefact {}",
                key_of(f.var),
                show_opt(x),
                show_opt(y)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table and the recipes agree: every row is written by some recipe rule, and every rule's
    /// variable is a row or one of the few values that are not hyper-parameters.
    #[test]
    fn every_row_has_a_rule_and_every_rule_a_row() {
        const NOT_HPARAMS: &[&str] = &[
            "name",
            "basename",
            "size_label",
            "file_type",
            "image_aspect_ratio",
        ];
        let mut used = std::collections::BTreeSet::new();
        for (name, _) in recipe::RECIPES {
            let r = recipe::recipe(name).unwrap();
            for a in &r.artefacts {
                for m in &a.metadata {
                    let Some(v) = m.value.as_deref() else {
                        continue;
                    };
                    let row = FIELDS.iter().find(|f| f.var == v);
                    assert!(
                        row.is_some() || NOT_HPARAMS.contains(&v),
                        "{name}: rule {} reads '{v}', which the table does not have",
                        m.key
                    );
                    if let Some(f) = row {
                        used.insert(f.var);
                        // llama.* values live in the LLM; the mmproj may repeat one (projection_dim).
                        assert!(
                            f.home == a.kind || f.home == Llm,
                            "{name}: {} in the {}",
                            f.var,
                            a.kind
                        );
                    }
                }
            }
        }
        for f in FIELDS {
            assert!(used.contains(f.var), "no recipe writes '{}'", f.var);
        }
    }

    /// Differences are named by their GGUF key; equal sets have none.
    #[test]
    fn differences_are_named_by_key() {
        let mut a = ModelHParams {
            llama: LlamaHParams {
                n_embd: 64,
                n_head: 4,
                rope_theta: 10000.0,
                ..Default::default()
            },
            clip: ClipHParams::default(),
            projector: ProjectorHParams::MmFuser(FuserHParams::default()),
        };
        assert!(hparam_diffs(&a, &a).is_empty());
        let mut b = a.clone();
        b.llama.rope_theta = 20000.0;
        b.clip.feature_layers = vec![3, 7];
        assert_eq!(
            hparam_diffs(&a, &b),
            vec![
                "llama.rope.freq_base: source 1e4, artefact 2e4".to_string(),
                // The blocks an artefact keeps follow from the selected layers.
                "clip.vision.block_count: source 0, artefact 7".to_string(),
                "clip.vision.feature_layer: source [], artefact [3, 7]".to_string(),
            ]
        );
        a.projector = ProjectorHParams::Mlp;
        let d = hparam_diffs(&a, &b);
        assert_eq!(d[0], "clip.projector_type: source mlp, artefact mmfuser");
        assert!(d
            .iter()
            .any(|x| x.starts_with("mmfuser.head_count: source -, artefact 0")));
    }

    /// Every recipe that declares a projector type finds itself, and one of each kind exists.
    #[test]
    fn projector_types_have_a_recipe() {
        assert!(recipe_for_projector("mmfuser").is_ok());
        assert!(recipe_for_projector("mlp").is_ok());
        assert!(recipe_for_projector("resampler").is_err());
    }
}

//! config.json of a `llava_llama` checkpoint and of its CLIP vision tower.
use crate::ground::error::{Error, Result};
use crate::model::hparams::{ClipHParams, LlamaHParams};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// CLIP normalisation used when no preprocessor_config.json says otherwise (spec §3b).
/// Written as CLIP publishes them (more digits than an f32 holds), so they can be compared by eye.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// `mm_vision_select_layer`: a list (MMFuser) or one index (LLaVA-1.5).
#[derive(Debug, Clone, PartialEq)]
pub enum SelectLayers {
    List(Vec<i64>),
    Single(i64),
}

impl SelectLayers {
    /// Parse a JSON list, the training scripts' string form "list-22/-17/-12/-7/-2", or an integer.
    pub fn parse(path: &Path, v: &Json) -> Result<Self> {
        let bad = || {
            Error::input(path, format!("mm_vision_select_layer: expected a list, \"list-a/b/...\" or an integer, got {v}"))
        };
        match v {
            Json::Number(n) => n.as_i64().map(SelectLayers::Single).ok_or_else(bad),
            Json::Array(a) => {
                let l = a
                    .iter()
                    .map(|x| x.as_i64().ok_or_else(bad))
                    .collect::<Result<Vec<_>>>()?;
                if l.is_empty() {
                    return Err(bad());
                }
                Ok(SelectLayers::List(l))
            }
            Json::String(s) => {
                if let Some(rest) = s.strip_prefix("list") {
                    let l = rest
                        .split('/')
                        .map(|x| x.trim().parse::<i64>().map_err(|_| bad()))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(SelectLayers::List(l))
                } else {
                    s.trim()
                        .parse::<i64>()
                        .map(SelectLayers::Single)
                        .map_err(|_| bad())
                }
            }
            _ => Err(bad()),
        }
    }
    pub fn indices(&self) -> Vec<i64> {
        match self {
            SelectLayers::List(l) => l.clone(),
            SelectLayers::Single(i) => vec![*i],
        }
    }
    /// Non-negative hidden-state indices over `n_layer + 1` entries (0 = embeddings).
    pub fn resolve(&self, path: &Path, n_layer: usize) -> Result<Vec<usize>> {
        let n = i64::try_from(n_layer)
            .ok()
            .and_then(|n| n.checked_add(1))
            .ok_or_else(|| {
                Error::input(
                    path,
                    format!("{n_layer} vision layers is not a usable layer count"),
                )
            })?;
        self.indices()
            .into_iter()
            .map(|i| {
                let r = if i < 0 { n + i } else { i };
                if r < 0 || r >= n {
                    Err(Error::input(path, format!("mm_vision_select_layer index {i} is outside the {n} hidden states of a {n_layer}-layer vision tower")))
                } else {
                    Ok(r as usize)
                }
            })
            .collect()
    }
}

/// The parts of a LLaVA config.json that conversion and inference use.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub path: PathBuf,
    pub raw: Json,
    pub model_type: String,
    pub llama: LlamaHParams,
    pub vision_tower: Option<String>,
    pub mm_hidden_size: Option<usize>,
    pub projector_type: Option<String>,
    pub select_layers: Option<SelectLayers>,
    pub select_feature: String,
    /// An embedded `vision_config` (HF-style LLaVA configs carry one), with CLIPVisionConfig's
    /// defaults filled in for the keys it leaves out.
    pub vision_config: Option<Json>,
    /// transformers' own LLaVA layout (`LlavaForConditionalGeneration`: `vision_feature_layer`,
    /// `multi_modal_projector`) rather than the LLaVA repository's (`mm_*` keys).
    pub hf_layout: bool,
}

/// transformers' `LlamaConfig` defaults for the keys this crate reads: a `text_config` saved
/// by transformers omits keys equal to them (llava-hf/llava-1.5-7b-hf's has no hidden_size).
const LLAMA_DEFAULTS: &[(&str, f64)] = &[
    ("vocab_size", 32000.0),
    ("hidden_size", 4096.0),
    ("intermediate_size", 11008.0),
    ("num_hidden_layers", 32.0),
    ("num_attention_heads", 32.0),
    ("max_position_embeddings", 2048.0),
    ("rms_norm_eps", 1e-6),
];
/// transformers' `CLIPVisionConfig` defaults (hidden_act "quick_gelu" and layer_norm_eps 1e-5
/// are defaulted where they are read).
const CLIP_VISION_DEFAULTS: &[(&str, f64)] = &[
    ("hidden_size", 768.0),
    ("intermediate_size", 3072.0),
    ("num_hidden_layers", 12.0),
    ("num_attention_heads", 12.0),
    ("image_size", 224.0),
    ("patch_size", 32.0),
];

/// A transformers sub-config (`text_config` of model_type `model_type`, or `vision_config`)
/// with its class defaults filled in; other model types are returned as they are.
fn with_defaults(sub: &Json, model_type: &str, defaults: &[(&str, f64)]) -> Json {
    let mut out = sub.clone();
    let same_type = sub
        .get("model_type")
        .and_then(Json::as_str)
        .is_none_or(|t| t == model_type);
    if let (true, Some(o)) = (same_type, out.as_object_mut()) {
        for (k, v) in defaults {
            if !o.contains_key(*k) {
                let v = if v.fract() == 0.0 {
                    Json::from(*v as u64)
                } else {
                    Json::from(*v)
                };
                o.insert(k.to_string(), v);
            }
        }
    }
    out
}

/// transformers' `vision_feature_select_strategy` in the LLaVA repository's words
/// (`mm_vision_select_feature`): "default" drops the CLS token, "full" keeps it.
fn select_feature_of(strategy: &str) -> String {
    match strategy {
        "default" => "patch".into(),
        "full" => "cls_patch".into(),
        other => other.into(),
    }
}

/// Sizes become u32 GGUF keys (llama.cpp reads them as u32): larger is refused here, by key.
fn check_u32(path: &Path, key: &str, v: u64) -> Result<usize> {
    if v > u32::MAX as u64 {
        return Err(Error::input(
            path,
            format!("\"{key}\" = {v} is too large (at most {})", u32::MAX),
        ));
    }
    Ok(v as usize)
}

fn get_usize(path: &Path, j: &Json, key: &str) -> Result<usize> {
    let v = j
        .get(key)
        .and_then(Json::as_u64)
        .ok_or_else(|| Error::input(path, format!("missing or non-integer \"{key}\"")))?;
    check_u32(path, key, v)
}

/// An optional non-negative integer: absent or null is None, anything else but such an integer
/// is an error (a default silently standing in for "abc" or -5 would hide a broken config).
fn opt_usize(path: &Path, j: &Json, key: &str) -> Result<Option<usize>> {
    match j.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => check_u32(path, key, n).map(Some),
            None => Err(Error::input(
                path,
                format!("\"{key}\" must be a non-negative integer, got {v}"),
            )),
        },
    }
}

/// An optional number (absent or null: None; anything else but a number: an error).
fn opt_f64(path: &Path, j: &Json, key: &str) -> Result<Option<f64>> {
    match j.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::input(path, format!("\"{key}\" must be a number, got {v}"))),
    }
}

/// A normalisation epsilon: positive and small (a negative one or 1e300 gives NaN or flattens
/// every activation; real models use 1e-6 to 1e-5).
fn eps_or(path: &Path, j: &Json, key: &str, default: f32) -> Result<f32> {
    match opt_f64(path, j, key)? {
        None => Ok(default),
        Some(e) if e > 0.0 && e < 1.0 && (e as f32) > 0.0 => Ok(e as f32),
        Some(e) => Err(Error::input(
            path,
            format!("\"{key}\" = {e} is not a usable epsilon (0 < eps < 1)"),
        )),
    }
}

/// A small JSON file (config.json, preprocessor_config.json), size-capped.
pub fn read_json(path: &Path) -> Result<Json> {
    read_json_capped(path, crate::ground::fsutil::CAP_CONFIG)
}

/// A JSON file of at most `cap` bytes (checked before it is read and parsed).
pub fn read_json_capped(path: &Path, cap: u64) -> Result<Json> {
    let text = crate::ground::fsutil::read_input_text(path, cap)?;
    serde_json::from_str(&text).map_err(|e| Error::input(path, format!("invalid JSON: {e}")))
}

impl LlavaConfig {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let raw = read_json(&path)?;
        Self::from_json(path, raw)
    }

    /// The config from its parsed JSON (`path` names it in errors).
    pub fn from_json(path: PathBuf, raw: Json) -> Result<Self> {
        // HF-style llava configs nest the LLM under text_config.
        let text = raw
            .get("text_config")
            .filter(|v| v.is_object())
            .map(|t| with_defaults(t, "llama", LLAMA_DEFAULTS));
        let t = text.as_ref().unwrap_or(&raw);
        let hf_layout = raw.get("mm_vision_select_layer").is_none()
            && raw.get("vision_feature_layer").is_some();
        let n_embd = get_usize(&path, t, "hidden_size")?;
        let n_head = get_usize(&path, t, "num_attention_heads")?;
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(Error::input(
                &path,
                format!("hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}"),
            ));
        }
        if (n_embd / n_head) % 2 != 0 {
            // Rotary embeddings rotate pairs of a head's columns.
            return Err(Error::input(
                &path,
                format!(
                    "head size hidden_size / num_attention_heads = {n_embd} / {n_head} = {} is odd; rotary embeddings need an even head size",
                    n_embd / n_head
                ),
            ));
        }
        let n_head_kv = opt_usize(&path, t, "num_key_value_heads")?.unwrap_or(n_head);
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(Error::input(&path, format!("num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")));
        }
        let rope_theta = match opt_f64(&path, t, "rope_theta")? {
            Some(r) => Some(r),
            None => match t.get("rope_parameters").filter(|r| !r.is_null()) {
                Some(r) => opt_f64(&path, r, "rope_theta")?,
                None => None,
            },
        }
        .unwrap_or(10000.0);
        if !(rope_theta > 0.0 && (rope_theta as f32).is_finite()) {
            return Err(Error::input(
                &path,
                format!("\"rope_theta\" = {rope_theta} must be a positive number"),
            ));
        }
        let rope_theta = rope_theta as f32;
        if let Some(hd) = opt_usize(&path, t, "head_dim")? {
            if hd != n_embd / n_head {
                return Err(Error::input(
                    &path,
                    format!(
                        "head_dim {hd} differs from hidden_size/num_attention_heads; not supported"
                    ),
                ));
            }
        }
        let llama = LlamaHParams {
            n_layer: get_usize(&path, t, "num_hidden_layers")?,
            n_embd,
            n_ff: get_usize(&path, t, "intermediate_size")?,
            n_head,
            n_head_kv,
            n_vocab: get_usize(&path, t, "vocab_size")?,
            n_ctx: match opt_usize(&path, t, "max_position_embeddings")? {
                Some(0) => {
                    return Err(Error::input(&path, "\"max_position_embeddings\" is 0"));
                }
                n => n.unwrap_or(4096),
            },
            rms_eps: eps_or(&path, t, "rms_norm_eps", 1e-6)?,
            rope_theta,
        };
        let select_layers = match raw
            .get("mm_vision_select_layer")
            .or_else(|| raw.get("vision_feature_layer"))
        {
            Some(v) => Some(SelectLayers::parse(&path, v)?),
            None => None,
        };
        // transformers' LlavaMultiModalProjector is mlp2x_gelu when its activation is GELU
        // and its linears have biases (both the defaults).
        let hf_projector = || {
            let act = raw
                .get("projector_hidden_act")
                .and_then(Json::as_str)
                .unwrap_or("gelu");
            let bias = raw
                .get("multimodal_projector_bias")
                .and_then(Json::as_bool)
                .unwrap_or(true);
            if act == "gelu" && bias {
                "mlp2x_gelu".to_string()
            } else {
                format!("projector_hidden_act {act}, multimodal_projector_bias {bias}")
            }
        };
        Ok(LlavaConfig {
            model_type: raw
                .get("model_type")
                .and_then(Json::as_str)
                .unwrap_or("")
                .to_string(),
            vision_tower: raw
                .get("mm_vision_tower")
                .and_then(Json::as_str)
                .map(str::to_string),
            mm_hidden_size: raw
                .get("mm_hidden_size")
                .and_then(Json::as_u64)
                .map(|v| v as usize),
            projector_type: if hf_layout {
                Some(hf_projector())
            } else {
                raw.get("mm_projector_type")
                    .and_then(Json::as_str)
                    .map(str::to_string)
            },
            select_feature: match (
                raw.get("mm_vision_select_feature").and_then(Json::as_str),
                raw.get("vision_feature_select_strategy")
                    .and_then(Json::as_str),
            ) {
                (Some(f), _) => f.to_string(),
                (None, Some(s)) => select_feature_of(s),
                (None, None) => "patch".to_string(),
            },
            vision_config: raw
                .get("vision_config")
                .filter(|v| v.is_object())
                .map(|v| with_defaults(v, "clip_vision_model", CLIP_VISION_DEFAULTS)),
            hf_layout,
            select_layers,
            llama,
            path,
            raw,
        })
    }
}

/// Read a CLIP vision config (a `CLIPModel` config with `vision_config`, a `CLIPVisionModel`
/// config, or an already-extracted vision_config object). `select` comes from `select_path` (the
/// LLaVA config.json), which a selected layer outside the tower's range names.
pub fn clip_hparams(
    path: &Path,
    cfg: &Json,
    preprocessor: Option<(&Path, &Json)>,
    select: &SelectLayers,
    select_path: &Path,
) -> Result<ClipHParams> {
    let v = cfg
        .get("vision_config")
        .filter(|v| v.is_object())
        .unwrap_or(cfg);
    let n_layer = get_usize(path, v, "num_hidden_layers")?;
    let n_embd = get_usize(path, v, "hidden_size")?;
    let n_head = get_usize(path, v, "num_attention_heads")?;
    if n_head == 0 || n_embd % n_head != 0 {
        return Err(Error::input(
            path,
            format!(
                "vision hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}"
            ),
        ));
    }
    let act = v
        .get("hidden_act")
        .and_then(Json::as_str)
        .unwrap_or("quick_gelu");
    let quick_gelu = match act {
        "quick_gelu" => true,
        "gelu" => false,
        other => {
            return Err(Error::input(
                path,
                format!("vision hidden_act '{other}' is not supported (quick_gelu, gelu)"),
            ))
        }
    };
    // image_mean / image_std: three finite f32 numbers, std non-zero (pixels are divided by it).
    let arr3 = |key: &str, default: [f32; 3], nonzero: bool| -> Result<[f32; 3]> {
        let Some((ppath, v)) = preprocessor.and_then(|(pp, p)| p.get(key).map(|v| (pp, v))) else {
            return Ok(default);
        };
        let nums: Vec<f32> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Json::as_f64)
                    .map(|x| x as f32)
                    .collect()
            })
            .unwrap_or_default();
        match <[f32; 3]>::try_from(nums) {
            Ok(a)
                if v.as_array().is_some_and(|x| x.len() == 3)
                    && a.iter().all(|x| x.is_finite() && (!nonzero || *x != 0.0)) =>
            {
                Ok(a)
            }
            _ => Err(Error::input(
                ppath,
                format!(
                    "\"{key}\" must be a list of 3 finite{} numbers, got {v}",
                    if nonzero { ", non-zero" } else { "" }
                ),
            )),
        }
    };
    let image_size = get_usize(path, v, "image_size")?;
    let patch_size = get_usize(path, v, "patch_size")?;
    if patch_size == 0 || image_size % patch_size != 0 {
        return Err(Error::input(
            path,
            format!("image_size {image_size} is not a multiple of patch_size {patch_size}"),
        ));
    }
    // The patch count (its square) must not overflow; real towers have 16 to 48 per side.
    if image_size / patch_size > 1 << 16 {
        return Err(Error::input(
            path,
            format!("image_size {image_size} / patch_size {patch_size}: too many patches"),
        ));
    }
    Ok(ClipHParams {
        image_size,
        patch_size,
        n_embd,
        n_ff: get_usize(path, v, "intermediate_size")?,
        n_head,
        n_layer,
        eps: eps_or(path, v, "layer_norm_eps", 1e-5)?,
        quick_gelu,
        image_mean: arr3("image_mean", CLIP_MEAN, false)?,
        image_std: arr3("image_std", CLIP_STD, true)?,
        feature_layers: select.resolve(select_path, n_layer).map_err(|e| match e {
            Error::Input { path: p, msg } => Error::input(
                p,
                format!("{msg} (the tower's layer count is in {})", path.display()),
            ),
            e => e,
        })?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn select_layer_forms() {
        let p = Path::new("config.json");
        let a = SelectLayers::parse(p, &serde_json::json!("list-22/-17/-12/-7/-2")).unwrap();
        let b = SelectLayers::parse(p, &serde_json::json!([-22, -17, -12, -7, -2])).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.resolve(p, 24).unwrap(), vec![3, 8, 13, 18, 23]);
        assert_eq!(
            SelectLayers::parse(p, &serde_json::json!(-2)).unwrap(),
            SelectLayers::Single(-2)
        );
        assert!(SelectLayers::parse(p, &serde_json::json!("list-2/x")).is_err());
        assert!(SelectLayers::Single(-26).resolve(p, 24).is_err());
        assert!(SelectLayers::Single(25).resolve(p, 24).is_err());
    }
}

#[cfg(test)]
mod hostile_tests {
    //! Hostile values straight to the parser; the cases through the CLI are in tests/hostile/.
    use super::*;

    /// Fuzz target config_parser, crash-e7a79de0: SelectLayers::resolve computed
    /// `n_layer as i64 + 1`, which overflows for n_layer >= i64::MAX (a panic with overflow
    /// checks, a negative count without).
    #[test]
    fn select_layers_with_a_layer_count_past_i64() {
        let p = Path::new("config.json");
        let v: Json = serde_json::from_str(r#"{"mm_vision_select_layer": "list-22/-17/-12/-7/-2", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 24, "image_size": 336, "patch_size": 14, "intermediate_size": 4096}"#).unwrap();
        let s = SelectLayers::parse(p, &v["mm_vision_select_layer"]).unwrap();
        for n in [usize::MAX / 2, usize::MAX / 2 + 1, usize::MAX] {
            let e = s.resolve(p, n).unwrap_err().to_string();
            assert!(e.contains("not a usable layer count"), "{e}");
        }
        assert_eq!(s.resolve(p, 24).unwrap(), vec![3, 8, 13, 18, 23]);
    }
}

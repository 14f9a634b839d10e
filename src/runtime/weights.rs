//! GGUF artefacts as model weights: the LLM file and the mmproj file together implement
//! `WeightSource`, and their metadata gives back the model's hyper-parameters.
use crate::formats::checkpoint::tokenizer::GgufVocab;
use crate::formats::gguf::{GgufFile, Value};
use crate::ground::error::{Error, Result};
use crate::model::hparams::{
    ClipHParams, FuserHParams, LlamaHParams, ModelHParams, ProjectorHParams,
};
use crate::model::weights::{RawTensor, WeightSource};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

pub struct GgufWeights {
    pub llm: GgufFile,
    pub mmproj: GgufFile,
    /// Keep the weights' pages mapped after use (`release` does nothing): a runtime reads every
    /// weight once per token, and dropping the pages would fault all of them in again (a 7B
    /// Q4_K_M file is a million pages). verify, which reads each weight once per forward,
    /// releases them to stay at one layer's memory.
    pub keep_resident: bool,
}

fn f32_array(g: &GgufFile, key: &str) -> Result<[f32; 3]> {
    match g.get(key) {
        Some(Value::Array(_, v)) if v.len() >= 3 => {
            let f = |i: usize| {
                v[i].as_f32().ok_or_else(|| {
                    Error::input(&g.path, format!("'{key}' must be a FLOAT32 array"))
                })
            };
            Ok([f(0)?, f(1)?, f(2)?])
        }
        _ => Err(Error::input(
            &g.path,
            format!("metadata '{key}' is missing or not a FLOAT32 array of 3"),
        )),
    }
}

impl GgufWeights {
    pub fn open(llm: &Path, mmproj: &Path) -> Result<Self> {
        let llm = GgufFile::open(llm)?;
        let mmproj = GgufFile::open(mmproj)?;
        if llm.get_str("general.architecture")? != "llama" {
            return Err(Error::input(
                &llm.path,
                "not a LLaMA GGUF (general.architecture != \"llama\")",
            ));
        }
        if mmproj.get_str("general.architecture")? != "clip" {
            return Err(Error::input(
                &mmproj.path,
                "not an mmproj GGUF (general.architecture != \"clip\")",
            ));
        }
        Ok(GgufWeights {
            llm,
            mmproj,
            keep_resident: false,
        })
    }

    /// Hyper-parameters from the files' metadata (the same keys llama.cpp reads).
    pub fn hparams(&self) -> Result<ModelHParams> {
        let l = &self.llm;
        let n_embd = l.get_u32("llama.embedding_length")? as usize;
        let n_head = l.get_u32("llama.attention.head_count")? as usize;
        let n_vocab = match l.get_u32("llama.vocab_size") {
            Ok(v) => v as usize,
            Err(_) => l
                .tensor("token_embd.weight")
                .map(|t| t.info.ne[1] as usize)
                .ok_or_else(|| {
                    Error::input(&l.path, "no llama.vocab_size and no token_embd.weight")
                })?,
        };
        let llama = LlamaHParams {
            n_layer: l.get_u32("llama.block_count")? as usize,
            n_embd,
            n_ff: l.get_u32("llama.feed_forward_length")? as usize,
            n_head,
            n_head_kv: l
                .get_u32("llama.attention.head_count_kv")
                .map(|v| v as usize)
                .unwrap_or(n_head),
            n_vocab,
            n_ctx: l.get_u32("llama.context_length")? as usize,
            rms_eps: l.get_f32("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: l.get_f32("llama.rope.freq_base").unwrap_or(10000.0),
        };
        let m = &self.mmproj;
        let feature_layers = match m.get("clip.vision.feature_layer") {
            Some(Value::Array(_, v)) => v
                .iter()
                .map(|x| x.as_i64().filter(|&i| i >= 0).map(|i| i as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::input(
                        &m.path,
                        "clip.vision.feature_layer must hold non-negative INT32 values",
                    )
                })?,
            _ => {
                return Err(Error::input(
                    &m.path,
                    "metadata 'clip.vision.feature_layer' is missing",
                ))
            }
        };
        let clip = ClipHParams {
            image_size: m.get_u32("clip.vision.image_size")? as usize,
            patch_size: m.get_u32("clip.vision.patch_size")? as usize,
            n_embd: m.get_u32("clip.vision.embedding_length")? as usize,
            n_ff: m.get_u32("clip.vision.feed_forward_length")? as usize,
            n_head: m.get_u32("clip.vision.attention.head_count")? as usize,
            n_layer: m.get_u32("clip.vision.block_count")? as usize,
            eps: m.get_f32("clip.vision.attention.layer_norm_epsilon")?,
            quick_gelu: !m
                .get("clip.use_gelu")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            image_mean: f32_array(m, "clip.vision.image_mean")?,
            image_std: f32_array(m, "clip.vision.image_std")?,
            feature_layers,
        };
        let projector = match m.get_str("clip.projector_type")? {
            "mmfuser" => ProjectorHParams::MmFuser(FuserHParams {
                n_heads: m.get_u32("mmfuser.head_count")? as usize,
                n_levels: m.get_u32("mmfuser.level_count")? as usize,
                n_points: m.get_u32("mmfuser.point_count")? as usize,
                eps: m.get_f32("mmfuser.layer_norm_epsilon")?,
            }),
            "mlp" => ProjectorHParams::Mlp,
            other => {
                return Err(Error::input(
                    &m.path,
                    format!("clip.projector_type '{other}' is not supported (mmfuser, mlp)"),
                ))
            }
        };
        Ok(ModelHParams {
            llama,
            clip,
            projector,
        })
    }

    /// The LLM file's `tokenizer.ggml.*` vocabulary, as a runtime reads it (to tokenize the probe
    /// the way the artefact would).
    pub fn vocab(&self) -> Result<GgufVocab> {
        vocab_from_gguf(&self.llm)
    }

    /// The file holding a tensor of this name (mmproj for `v.*` / `mm.*`).
    pub fn file_of(&self, name: &str) -> &GgufFile {
        self.file_for(name)
    }

    fn file_for(&self, name: &str) -> &GgufFile {
        if name.starts_with("v.") || name.starts_with("mm.") {
            &self.mmproj
        } else {
            &self.llm
        }
    }
}

impl WeightSource for GgufWeights {
    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let g = self.file_for(name);
        let t = g
            .tensor(name)
            .ok_or_else(|| Error::tensor(&g.path, name, "missing from the artefact"))?;
        Ok(RawTensor {
            ty: t.info.ty,
            shape: t.info.ne.iter().rev().map(|&d| d as usize).collect(),
            data: Cow::Borrowed(g.data(t)),
        })
    }
    fn has(&self, name: &str) -> bool {
        self.file_for(name).tensor(name).is_some()
    }
    fn origin(&self) -> PathBuf {
        self.llm.path.clone()
    }
    fn origin_of(&self, name: &str) -> PathBuf {
        self.file_for(name).path.clone()
    }
    fn release(&self, name: &str) {
        if self.keep_resident {
            return;
        }
        let g = self.file_for(name);
        if let Some(t) = g.tensor(name) {
            g.release(t);
        }
    }
}

impl WeightSource for crate::convert::source::Source {
    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let r = self.row(name).ok_or_else(|| {
            Error::input(
                &self.dir,
                format!("the recipe maps no source tensor to '{name}'"),
            )
        })?;
        let t = self.read(r)?;
        Ok(RawTensor {
            ty: t.ty,
            shape: t.shape,
            data: t.data,
        })
    }
    fn has(&self, name: &str) -> bool {
        self.row(name).is_some()
    }
    fn origin(&self) -> PathBuf {
        self.dir.clone()
    }
    fn release(&self, name: &str) {
        if let Some(r) = self.row(name) {
            self.store(r.store).release(&r.row.src);
        }
    }
}

/// An LLM GGUF's `tokenizer.ggml.*` vocabulary, as a runtime reads it (verify's artefact side,
/// generate's encoder and decoder).
pub fn vocab_from_gguf(g: &GgufFile) -> Result<GgufVocab> {
    let arr = |key: &str| -> Result<&[Value]> {
        g.get(key).and_then(Value::as_array).ok_or_else(|| {
            Error::input(
                &g.path,
                format!("metadata '{key}' is missing or not an array"),
            )
        })
    };
    let bad = |key: &str| {
        Error::input(
            &g.path,
            format!("metadata '{key}' has elements of the wrong type"),
        )
    };
    let tokens = arr("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("tokenizer.ggml.tokens"))?;
    let scores = arr("tokenizer.ggml.scores")?
        .iter()
        .map(Value::as_f32)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("tokenizer.ggml.scores"))?;
    let token_types = arr("tokenizer.ggml.token_type")?
        .iter()
        .map(|v| v.as_i64().and_then(|i| i32::try_from(i).ok()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("tokenizer.ggml.token_type"))?;
    let id = |k: &str| g.get(k).and_then(Value::as_u32);
    let flag = |k: &str| g.get(k).and_then(Value::as_bool);
    Ok(GgufVocab {
        model: g.get_str("tokenizer.ggml.model")?.to_string(),
        pre: g
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string(),
        tokens,
        scores,
        token_types,
        bos_id: id("tokenizer.ggml.bos_token_id"),
        eos_id: id("tokenizer.ggml.eos_token_id"),
        unk_id: id("tokenizer.ggml.unknown_token_id"),
        pad_id: id("tokenizer.ggml.padding_token_id"),
        add_bos: flag("tokenizer.ggml.add_bos_token"),
        add_eos: flag("tokenizer.ggml.add_eos_token"),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
        chat_template: g
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

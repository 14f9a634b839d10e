//! GGUF artefacts as model weights: the LLM file and the mmproj file together implement
//! `WeightSource`, and their metadata gives back the model's hyper-parameters.
use crate::formats::checkpoint::tokenizer::GgufVocab;
use crate::formats::gguf::{GgufFile, Value};
use crate::ground::error::{Error, Result};
use crate::model::hparams::ModelHParams;
use crate::model::weights::{RawTensor, StoredAt, WeightSource};
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

    /// Hyper-parameters from the files' metadata (the keys the recipes write, which llama.cpp
    /// reads), through the one table (`convert::hparams_table`).
    pub fn hparams(&self) -> Result<ModelHParams> {
        crate::convert::hparams_table::hparams_from_gguf(&self.llm, &self.mmproj)
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
    fn stored_at(&self, name: &str) -> Option<StoredAt> {
        let g = self.file_for(name);
        Some(StoredAt::of(g.data(g.tensor(name)?)))
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
        warnings: vec![],
    })
}

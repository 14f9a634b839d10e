//! The tensor plan shared by hf-to-gguf, quantize and verify: for each artefact, its file type,
//! metadata and every output tensor (source row -> GGUF name, shape, type), including
//! llama-quantize's type mixture and tensor order. Conversion emits what this plans; verify
//! re-derives the same plan from the source and compares the artefact with it.
use crate::convert::recipe::{DtypePolicy, Var};
use crate::convert::source::Source;
use crate::formats::checkpoint::tokenizer::chat::LLAVA_V1_CHAT_TEMPLATE;
use crate::formats::checkpoint::tokenizer::{load_vocab, GgufVocab};
use crate::formats::gguf::{Metadata, TensorInfo, Value};
use crate::ground::dtype::{FileType, GgmlType, GGML_QNT_VERSION};
use crate::ground::error::Result;
use crate::model::hparams::ModelHParams;
use crate::quant::mixture::{choose_types, weight_name_cmp, TensorDesc};
use std::path::{Path, PathBuf};

/// Metadata keys llama-quantize (re)sets at the end of the KV list.
pub const KEY_QUANT_VERSION: &str = "general.quantization_version";
pub const KEY_FILE_TYPE: &str = "general.file_type";
/// Prefix of the fuser's tensors in an mmproj: never quantized.
pub const FUSER_PREFIX: &str = "mm.fuser.";

/// One planned output tensor.
pub struct OutTensor {
    pub info: TensorInfo,
    pub row: usize,
}

/// An artefact about to be written.
pub struct ArtefactPlan {
    pub kind: String,
    pub path: PathBuf,
    pub file_type: FileType,
    pub meta: Metadata,
    pub tensors: Vec<OutTensor>,
}

/// GGUF tokenizer keys (convert_hf_to_gguf.py `_set_vocab_sentencepiece`; types as llama.cpp reads them).
pub fn vocab_metadata(v: &GgufVocab, meta: &mut Metadata) {
    meta.set("tokenizer.ggml.model", Value::String(v.model.clone()));
    meta.set("tokenizer.ggml.pre", Value::String(v.pre.clone()));
    meta.set(
        "tokenizer.ggml.tokens",
        Value::strings(v.tokens.iter().cloned()),
    );
    meta.set(
        "tokenizer.ggml.scores",
        Value::f32s(v.scores.iter().copied()),
    );
    meta.set(
        "tokenizer.ggml.token_type",
        Value::i32s(v.token_types.iter().copied()),
    );
    for (k, id) in [
        ("tokenizer.ggml.bos_token_id", v.bos_id),
        ("tokenizer.ggml.eos_token_id", v.eos_id),
        ("tokenizer.ggml.unknown_token_id", v.unk_id),
        ("tokenizer.ggml.padding_token_id", v.pad_id),
    ] {
        if let Some(id) = id {
            meta.set(k, Value::U32(id));
        }
    }
    for (k, b) in [
        ("tokenizer.ggml.add_bos_token", v.add_bos),
        ("tokenizer.ggml.add_eos_token", v.add_eos),
        ("tokenizer.ggml.add_space_prefix", v.add_space_prefix),
    ] {
        if let Some(b) = b {
            meta.set(k, Value::Bool(b));
        }
    }
    if let Some(t) = &v.chat_template {
        meta.set("tokenizer.chat_template", Value::String(t.clone()));
    }
}

/// GGUF `ne` (reverse of the PyTorch shape).
pub fn ne_of(shape: &[usize]) -> Vec<u64> {
    shape.iter().rev().map(|&d| d as u64).collect()
}

/// Decide every output tensor's type and build the artefacts' metadata.
pub fn plan_artefacts(
    src: &mut Source,
    name: &str,
    ft: FileType,
    vision_type: Option<GgmlType>,
    out_dir: &Path,
) -> Result<Vec<ArtefactPlan>> {
    src.vars.set("name", Var::Str(name.to_string()));
    // The base type for non-quantized outputs; quantized file types start from F16 for the mmproj.
    let float_out = match ft {
        FileType::AllF32 => GgmlType::F32,
        FileType::MostlyBF16 => GgmlType::BF16,
        _ => GgmlType::F16,
    };
    let policy = DtypePolicy::load();
    let mut vocab = load_vocab(&src.dir, src.hparams.llama.n_vocab, &src.config.raw)?;
    // LLaVA checkpoints carry no chat template; the one they were trained with is llava_v1.
    if vocab.chat_template.is_none() {
        vocab.chat_template = Some(LLAVA_V1_CHAT_TEMPLATE.to_string());
    }
    let mut plans = vec![];
    for (ai, art) in src.recipe.artefacts.iter().enumerate() {
        let art_ft = if art.kind == "llm" {
            ft
        } else {
            mmproj_file_type(ft, vision_type)
        };
        src.vars.set("file_type", Var::Int(art_ft.id() as i64));
        let mut meta = src.vars.metadata(&art.metadata)?;
        if art.tokenizer {
            vocab_metadata(&vocab, &mut meta);
        }
        let mut tensors: Vec<OutTensor> = src
            .rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.artefact == ai)
            .map(|(i, r)| {
                let ty = policy.choose(&r.row.dst, r.row.shape.len(), float_out);
                OutTensor {
                    info: TensorInfo {
                        name: r.row.dst.clone(),
                        ne: ne_of(&r.row.shape),
                        ty,
                    },
                    row: i,
                }
            })
            .collect();
        apply_mixture(
            &art.kind,
            ft,
            vision_type,
            &src.hparams,
            &mut tensors,
            &mut meta,
        )?;
        // A float LLM is written in source-file order, so its tensors can come from the
        // ShardStream that also feeds the input hasher (one disk read of each byte). A quantized LLM keeps
        // llama-quantize's order (byte-identical files); the small mmproj keeps the recipe order
        // (identical whichever way the tower is stored).
        if art.kind == "llm" && is_float_type(ft) {
            tensors.sort_by_key(|t| src.source_position(&src.rows[t.row]));
        }
        // Each file is named by its own type (a Q4_K_M run still writes an F16 mmproj).
        let file = art
            .file
            .replace("{name}", name)
            .replace("{ftype}", art_ft.name());
        plans.push(ArtefactPlan {
            kind: art.kind.clone(),
            path: out_dir.join(file),
            file_type: art_ft,
            meta,
            tensors,
        });
    }
    Ok(plans)
}

/// The mmproj's own file type: F16/F32/BF16 follow --outtype; under quantization it stays F16
/// unless the vision tower is quantized too.
pub fn mmproj_file_type(ft: FileType, vision_type: Option<GgmlType>) -> FileType {
    match (ft, vision_type) {
        (FileType::AllF32 | FileType::MostlyBF16 | FileType::MostlyF16, _) => ft,
        (_, Some(GgmlType::Q8_0)) => FileType::MostlyQ8_0,
        _ => FileType::MostlyF16,
    }
}

pub fn is_float_type(ft: FileType) -> bool {
    matches!(
        ft,
        FileType::AllF32 | FileType::MostlyF16 | FileType::MostlyBF16
    )
}

/// Apply llama-quantize's choices to planned LLM tensors (types, order, trailing metadata keys),
/// or the vision type to an mmproj's CLIP matrices. `tensors` carry their planned input types.
pub fn apply_mixture(
    kind: &str,
    ft: FileType,
    vision_type: Option<GgmlType>,
    hp: &ModelHParams,
    tensors: &mut [OutTensor],
    meta: &mut Metadata,
) -> Result<()> {
    if kind == "llm" {
        if is_float_type(ft) {
            return Ok(());
        }
        let infos: Vec<TensorInfo> = tensors.iter().map(|t| t.info.clone()).collect();
        let types = mixture(ft, &infos, hp.llama.n_layer);
        for (t, ty) in tensors.iter_mut().zip(types) {
            t.info.ty = ty;
        }
        tensors.sort_by(|a, b| weight_name_cmp(&a.info.name, &b.info.name));
        set_quant_keys(meta, ft);
    } else if let Some(vt) = vision_type {
        for t in tensors.iter_mut() {
            if vision_quantizable(&t.info) && t.info.ne[0] % vt.block_size() as u64 == 0 {
                t.info.ty = vt;
            }
        }
    }
    Ok(())
}

/// CLIP encoder matrices an mmproj may quantize with --vision-type (never the fuser, the
/// embeddings or the projector MLP).
pub fn vision_quantizable(t: &TensorInfo) -> bool {
    t.name.starts_with("v.blk.")
        && t.name.ends_with(".weight")
        && t.ne.len() == 2
        && !t.name.starts_with(FUSER_PREFIX)
}

/// Types for every tensor, exactly as llama-quantize chooses them.
pub fn mixture(ft: FileType, infos: &[TensorInfo], n_layer: usize) -> Vec<GgmlType> {
    let descs: Vec<TensorDesc> = infos
        .iter()
        .map(|t| TensorDesc {
            name: &t.name,
            ne: &t.ne,
            ty: t.ty,
        })
        .collect();
    choose_types(ft, &descs, n_layer)
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

/// llama-quantize removes and re-appends these two keys, so they end the KV list.
pub fn set_quant_keys(meta: &mut Metadata, ft: FileType) {
    meta.set_last(KEY_QUANT_VERSION, Value::U32(GGML_QNT_VERSION));
    meta.set_last(KEY_FILE_TYPE, Value::U32(ft.id()));
}

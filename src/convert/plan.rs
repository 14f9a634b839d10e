//! The tensor plan shared by hf-to-gguf, quantize and verify: for each artefact, its file type,
//! metadata and every output tensor (input tensor -> GGUF name, shape, type), including
//! llama-quantize's type mixture and tensor order. The one place where an output type is
//! decided: the dtype policy (float outputs), then llama-quantize's mixture or the vision type.
//! Two inputs are planned: a checkpoint (`plan_artefacts`: hf-to-gguf and one-pass quantize) and
//! a GGUF file (`plan_gguf`: quantize). `emit` writes whatever is planned; verify re-derives the
//! checkpoint's plan and compares the artefact with it.
use crate::convert::recipe::{self, ArtefactKind, DtypePolicy, Var};
use crate::convert::source::Source;
use crate::formats::checkpoint::tokenizer::chat::LLAVA_V1_CHAT_TEMPLATE;
use crate::formats::checkpoint::tokenizer::{load_vocab, GgufVocab};
use crate::formats::gguf::{GgufFile, Metadata, TensorInfo, Value};
use crate::ground::dtype::{FileType, GgmlType, GGML_QNT_VERSION};
use crate::ground::error::{Error, Result};
use crate::ground::progress::Progress;
use crate::quant::mixture::{choose_types, weight_name_cmp, TensorDesc};
use std::path::{Path, PathBuf};

/// Metadata keys llama-quantize (re)sets at the end of the KV list.
pub const KEY_QUANT_VERSION: &str = "general.quantization_version";
pub const KEY_FILE_TYPE: &str = "general.file_type";

/// One planned output tensor.
pub struct PlannedTensor {
    /// Name, shape and output type in the artefact.
    pub info: TensorInfo,
    /// Which of the input's tensors it is made from (a row of the checkpoint's `Source`, a tensor
    /// of the GGUF input): the emit step's input resolves it.
    pub input: usize,
}

/// An artefact about to be written.
pub struct ArtefactPlan {
    pub kind: ArtefactKind,
    pub path: PathBuf,
    pub file_type: FileType,
    pub meta: Metadata,
    pub tensors: Vec<PlannedTensor>,
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
    progress: &dyn Progress,
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
    for w in &vocab.warnings {
        progress.warn(&format!("warning: {w}"));
    }
    // LLaVA checkpoints carry no chat template; the one they were trained with is llava_v1.
    if vocab.chat_template.is_none() {
        vocab.chat_template = Some(LLAVA_V1_CHAT_TEMPLATE.to_string());
    }
    let mut plans = vec![];
    for (ai, art) in src.recipe.artefacts.iter().enumerate() {
        let art_ft = if art.kind == ArtefactKind::Llm {
            ft
        } else {
            mmproj_file_type(ft, vision_type)
        };
        src.vars.set("file_type", Var::Int(art_ft.id() as i64));
        let mut meta = src.vars.metadata(&art.metadata)?;
        if art.tokenizer {
            vocab_metadata(&vocab, &mut meta);
        }
        let mut tensors: Vec<PlannedTensor> = src
            .rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.artefact == ai)
            .map(|(i, r)| {
                let ty = policy.choose(&r.row.dst, r.row.shape.len(), float_out);
                PlannedTensor {
                    info: TensorInfo {
                        name: r.row.dst.clone(),
                        ne: ne_of(&r.row.shape),
                        ty,
                    },
                    input: i,
                }
            })
            .collect();
        match art.kind {
            // A float LLM is written in source-file order, so its tensors can come from the
            // ShardStream that also feeds the input hasher (one disk read of each byte).
            ArtefactKind::Llm if is_float_type(ft) => {
                tensors.sort_by_key(|t| src.source_position(&src.rows[t.input]))
            }
            // A quantized LLM keeps llama-quantize's order (byte-identical files).
            ArtefactKind::Llm => {
                quantize_llm(ft, src.hparams.llama.n_layer, &mut tensors, &mut meta)
            }
            // The small mmproj keeps the recipe order (identical whichever way the tower is stored).
            ArtefactKind::Mmproj => quantize_vision(vision_type, &mut tensors)?,
        }
        // Each file is named by its own type (a Q4_K_M run still writes an F16 mmproj).
        let file = art
            .file
            .replace("{name}", name)
            .replace("{ftype}", art_ft.name());
        plans.push(ArtefactPlan {
            kind: art.kind,
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

/// llama-quantize's choices for LLM tensors: each tensor's type (from its planned input type),
/// the tensor order, and the two metadata keys it re-appends.
pub fn quantize_llm(
    ft: FileType,
    n_layer: usize,
    tensors: &mut [PlannedTensor],
    meta: &mut Metadata,
) {
    let infos: Vec<TensorInfo> = tensors.iter().map(|t| t.info.clone()).collect();
    let types = mixture(ft, &infos, n_layer);
    for (t, ty) in tensors.iter_mut().zip(types) {
        t.info.ty = ty;
    }
    tensors.sort_by(|a, b| weight_name_cmp(&a.info.name, &b.info.name));
    set_quant_keys(meta, ft);
}

/// `--vision-type` on an mmproj: the CLIP tower's matrices whose rows fit its blocks.
pub fn quantize_vision(vision_type: Option<GgmlType>, tensors: &mut [PlannedTensor]) -> Result<()> {
    let Some(vt) = vision_type else {
        return Ok(());
    };
    let blocks = recipe::layer_prefix(recipe::TOWER_COMPONENT)?;
    for t in tensors.iter_mut() {
        if vision_quantizable(&t.info, &blocks) && t.info.ne[0] % vt.block_size() as u64 == 0 {
            t.info.ty = vt;
        }
    }
    Ok(())
}

/// Plan the quantization of a GGUF file (`quantize FILE`): every tensor of `g` in its order, as
/// llama-quantize plans an LLM (every file type, float ones too, goes through its mixture and
/// order), or the vision type on an mmproj (whose file type is set in place).
pub fn plan_gguf(
    g: &GgufFile,
    kind: ArtefactKind,
    ft: FileType,
    vision_type: Option<GgmlType>,
    path: PathBuf,
) -> Result<ArtefactPlan> {
    let mut tensors = vec![];
    for (i, t) in g.tensors.iter().enumerate() {
        if t.info.ty.is_quantized() {
            return Err(Error::tensor(
                &g.path,
                &t.info.name,
                format!(
                    "is already quantized ({}); quantize from an F32/F16/BF16 file",
                    t.info.ty
                ),
            ));
        }
        tensors.push(PlannedTensor {
            info: t.info.clone(),
            input: i,
        });
    }
    let mut meta = g.metadata.clone();
    match kind {
        ArtefactKind::Mmproj => {
            quantize_vision(vision_type, &mut tensors)?;
            meta.set(KEY_FILE_TYPE, Value::U32(ft.id()));
        }
        ArtefactKind::Llm => {
            let arch = g.get_str("general.architecture")?;
            let n_layer = g
                .get_u32("llama.block_count")
                .or_else(|_| g.get_u32(&format!("{arch}.block_count")))?
                as usize;
            quantize_llm(ft, n_layer, &mut tensors, &mut meta);
        }
    }
    Ok(ArtefactPlan {
        kind,
        path,
        file_type: ft,
        meta,
        tensors,
    })
}

/// CLIP encoder matrices an mmproj may quantize with --vision-type: 2-D weights of the tower's
/// blocks (`blocks`: their GGUF prefix, from the tower's name map). Never the fuser, the
/// embeddings or the projector MLP, which are not blocks of the tower.
pub fn vision_quantizable(t: &TensorInfo, blocks: &str) -> bool {
    t.name.starts_with(blocks) && t.name.ends_with(".weight") && t.ne.len() == 2
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

#[cfg(test)]
mod tests {
    use super::*;

    /// --vision-type touches the tower's block matrices only: the prefix comes from the tower's
    /// name map, and the fuser, the projector MLP, the embeddings and 1-D tensors stay.
    #[test]
    fn vision_type_touches_only_tower_block_matrices() {
        let blocks = recipe::layer_prefix(recipe::TOWER_COMPONENT).unwrap();
        assert_eq!(blocks, "v.blk.");
        let info = |name: &str, ne: &[u64]| TensorInfo {
            name: name.into(),
            ne: ne.to_vec(),
            ty: GgmlType::F16,
        };
        assert!(vision_quantizable(
            &info("v.blk.3.attn_q.weight", &[64, 64]),
            &blocks
        ));
        for (name, ne) in [
            ("v.blk.3.attn_q.bias", &[64u64][..]),
            ("v.blk.3.ln1.weight", &[64]),
            ("mm.fuser.cross_attn.value_proj.weight", &[64, 64]),
            ("mm.1.weight", &[64, 32]),
            ("v.patch_embd.weight", &[14, 14, 3, 64]),
            ("v.position_embd.weight", &[64, 17]),
        ] {
            assert!(!vision_quantizable(&info(name, ne), &blocks), "{name}");
        }
    }
}

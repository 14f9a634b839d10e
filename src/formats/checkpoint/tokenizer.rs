//! The LLaMA/Vicuna tokenizer: the GGUF vocabulary as llama.cpp's converter
//! writes it, and SentencePiece BPE encoding for prompts.
//!
//! - [`proto`]: minimal reader for `tokenizer.model` (SentencePiece `ModelProto`).
//! - [`vocab`]: [`load_vocab`] -> [`GgufVocab`] (`tokenizer.ggml.*` values), from
//!   `tokenizer.model` or, failing that, `tokenizer.json`.
//! - [`spm`]: [`SpmTokenizer`] (encode, LLaVA prompt with the -200 image marker).
//! - [`chat`]: the llava_v1 conversation (prompt text, the GGUF chat template).
//! - [`decode`]: ids -> text as sentencepiece decodes them, also streamed ([`Detokenizer`]).
pub mod chat;
pub mod decode;
pub mod proto;
pub mod spm;
pub mod vocab;

pub use decode::{decode, Detokenizer};
pub use proto::{piece_type, SpmModel, SpmPiece};
pub use spm::{SpmTokenizer, IMAGE_TOKEN_INDEX};
pub use vocab::{load_vocab, GgufVocab};

use crate::ground::error::{Error, Result};
use std::path::Path;

/// LLaVA's `tokenizer_image_token` on a checkpoint's own tokenizer: `tokenizer.model` when there
/// is one (SentencePiece, as the released code), else `tokenizer.json` through the `tokenizers`
/// crate (as transformers' fast tokenizer): split at "<image>", encode each chunk on its own with
/// BOS (the post-processor's special tokens) on the first only, -200 between chunks.
pub fn encode_llava_prompt(dir: &Path, prompt: &str) -> Result<Vec<i64>> {
    let spm_path = dir.join("tokenizer.model");
    if spm_path.is_file() {
        return Ok(SpmTokenizer::from_file(&spm_path)?.encode_llava_prompt(prompt));
    }
    let json_path = dir.join("tokenizer.json");
    if !json_path.is_file() {
        return Err(Error::input(
            dir,
            "no tokenizer to encode the prompt: looked for tokenizer.model and tokenizer.json (or give --input-ids)",
        ));
    }
    let tok = vocab::tokenizers_from_file(&json_path)?;
    let mut out: Vec<i64> = Vec::new();
    for (i, chunk) in prompt.split("<image>").enumerate() {
        if i > 0 {
            out.push(IMAGE_TOKEN_INDEX);
        }
        let enc = vocab::tokenizers_call(&json_path, || tok.encode(chunk, i == 0))?
            .map_err(|e| Error::input(&json_path, format!("encoding the prompt: {e}")))?;
        out.extend(enc.get_ids().iter().map(|&id| i64::from(id)));
    }
    Ok(out)
}

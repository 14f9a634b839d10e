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

//! The conversion road: a checkpoint (or a GGUF file) -> a plan -> GGUF artefacts + manifest.
//!
//! - `recipe`: converters/*.json and schemas/*.json (names, dtype policy, metadata) as data.
//! - `source`: a checkpoint seen through its recipe (one row per output tensor, hyper-parameters).
//! - `plan`: every output tensor's name, shape and type, and each artefact's metadata; the one
//!   place where output types are decided (dtype policy, llama-quantize's mixture, vision type).
//! - `emit` + `encode`: the one write loop and the per-tensor encoder, for any input.
//! - `from_checkpoint` (hf-to-gguf, one-pass quantize) and `from_gguf` (quantize FILE): the runs,
//!   each an input for the same plan and emit.
//! - `hparams_table`: hyper-parameters <-> recipe variables (and through the recipes, GGUF keys).
//! - `manifest`, `naming`, `synth` (synthetic checkpoints written from the same name maps).
pub mod emit;
pub mod encode;
pub mod from_checkpoint;
pub mod from_gguf;
pub mod hparams_table;
pub mod manifest;
pub mod naming;
pub mod plan;
pub mod recipe;
pub mod source;
pub mod synth;

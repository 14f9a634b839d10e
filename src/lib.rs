//! mmfuser-convert: LLaVA-MMFuser checkpoints -> GGUF, quantization, and verification.
pub mod checkpoint;
pub mod error;
pub mod gguf;
pub mod hparams;
pub mod model;
pub mod quant;
pub mod fsutil;
pub mod npy;
pub mod recipe;
pub mod source;
pub mod convert;
pub mod manifest;
pub mod progress;
pub mod quantize;
pub mod cli;

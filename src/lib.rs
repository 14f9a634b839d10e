//! mmfuser-convert: LLaVA-MMFuser checkpoints -> GGUF, quantization, and verification.
pub mod checkpoint;
pub mod error;
pub mod gguf;
pub mod hparams;
pub mod model;
pub mod quant;

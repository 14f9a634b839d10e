//! mmfuser-convert: LLaVA-MMFuser checkpoints -> GGUF, quantization, and verification.
//!
//! Layers, top to bottom (a module imports only from its own layer's lower rows):
//! - `cli`: the binary's verbs, progress bars and tables.
//! - the roads: `convert` (checkpoint -> plan -> GGUF artefacts), `verify` (artefact vs the
//!   source through the same plan, forwards and metrics), `generate` (the model as a runtime).
//! - `runtime`: what verify and generate share: weights from an artefact or a checkpoint, and
//!   the backend chosen for this machine.
//! - `model` (clip, fuser, llama over the `Backend` contract) and its backends `cpu`, `cuda`.
//! - `quant` (block formats, llama-quantize's mixture, quantized dot products) and `formats`
//!   (gguf, checkpoint, npy, image readers and writers).
//! - `ground`: the shared vocabulary (dtypes, block geometry, errors) and I/O plumbing.
pub mod cli;
pub mod convert;
pub mod cpu;
pub mod cuda;
pub mod formats;
pub mod generate;
pub mod ground;
pub mod model;
pub mod quant;
pub mod runtime;
pub mod verify;

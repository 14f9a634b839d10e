//! The integration tests: one binary, one module per theme (each test binary links the whole
//! crate, so one binary instead of one per file). Helpers shared by the modules are in `common`.
//! Run one theme with a filter: `cargo test --release --test integration -- verify::`.

mod common;

mod architecture;
mod cli;
mod cuda_gpu;
mod cuda_nvrtc;
mod generate;
mod hf_to_gguf;
mod hostile;
mod image_preprocess;
mod interop_gguf_py;
mod interop_quant_py;
mod layouts;
mod llamacpp_files;
mod model_reference;
mod synth;
mod thread_determinism;
mod tokenizer;
mod verify;

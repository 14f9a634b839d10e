//! The GGUF container: value types, a streaming writer and an mmap reader.
pub mod types;
pub use types::*;

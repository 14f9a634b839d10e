//! The GGUF container: value types, a streaming writer and an mmap reader.
pub mod reader;
pub mod types;
pub mod value;
pub mod writer;
pub use reader::{GgufFile, ReaderTensor};
pub use types::*;
pub use value::{Metadata, Value};
pub use writer::{DataSink, GgufWriter, TensorInfo};

//! Files of a Hugging Face checkpoint directory: config.json, weights, tokenizer, vision tower.
pub mod config;
pub mod pickle;
pub mod store;
pub mod stream;
pub mod tokenizer;
pub use config::{LlavaConfig, SelectLayers};
pub use store::{SrcTensor, TensorStore};

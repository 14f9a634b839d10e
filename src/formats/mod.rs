//! Readers and writers of the files the tool meets: GGUF, Hugging Face checkpoints (config,
//! safetensors, PyTorch zips, tokenizers), numpy arrays, and images. A reader of one format knows
//! no other.
pub mod checkpoint;
pub mod gguf;
pub mod image;
pub mod npy;

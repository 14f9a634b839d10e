//! Files of a Hugging Face checkpoint directory.
pub mod tokenizer;

//! Tokenizer (owned by the tokenizer helper).

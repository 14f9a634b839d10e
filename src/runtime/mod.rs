//! What the two runners (verify, generate) share: the model's weights read from a GGUF artefact or
//! from a checkpoint through the conversion plan, the backend chosen for this machine, and the
//! inputs both read (token ids, pixels).
pub mod device;
pub mod inputs;
pub mod weights;

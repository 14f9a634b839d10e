//! What the two runners (verify, generate) share: the model's weights read from a GGUF artefact or
//! from a checkpoint through the conversion plan, and the backend chosen for this machine.
pub mod device;
pub mod weights;

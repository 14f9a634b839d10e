//! The ground floor: the vocabulary every layer shares (tensor and file types, errors) and the I/O
//! plumbing under every reader and writer (atomic files, memory maps, the direct-I/O sink,
//! progress reports). Nothing here knows a model, a format or a road.
pub mod digest;
pub mod dtype;
pub mod error;
pub mod fsutil;
pub mod progress;
pub mod sink;

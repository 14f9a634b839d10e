//! What both runners read from their command line: a JSON list of token ids and a `[3, S, S]`
//! array of normalised pixels.
use crate::ground::error::{Error, Result};
use std::path::Path;

/// A JSON list of token ids (-200 marks the image), read with the probe-size cap.
pub fn read_ids(path: &Path) -> Result<Vec<i64>> {
    let text = crate::ground::fsutil::read_input_text(path, crate::ground::fsutil::CAP_PROBE)?;
    serde_json::from_str::<Vec<i64>>(&text).map_err(|e| {
        Error::input(
            path,
            format!("expected a JSON list of token ids (-200 marks the image): {e}"),
        )
    })
}

/// Normalised pixels from a `[3, size, size]` f32 .npy file.
pub fn read_pixels(path: &Path, size: usize) -> Result<Vec<f32>> {
    let a = crate::formats::npy::read(path)?;
    if a.shape != [3, size, size] {
        return Err(Error::input(
            path,
            format!(
                "pixel values must have shape [3, {size}, {size}], got {:?}",
                a.shape
            ),
        ));
    }
    a.to_f32().map_err(|e| Error::input(path, e.to_string()))
}

//! verify's --image path on arbitrary bytes: decode (PNG/JPEG, with the size limits), then the
//! LLaVA pad + resize + crop + normalise to a small square. Checks: an error or an image of the
//! decoded size within the limits, and exactly 3 x size x size finite pixel values.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mmfuser_convert::formats::image::{
    check_image_size, decode_image, preprocess_image, CLIP_MEAN, CLIP_STD,
};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = decode_image(data, Path::new("fuzz.png")) else {
        return;
    };
    assert_eq!(img.data.len(), img.width * img.height * 3);
    assert!(check_image_size(img.width as u64, img.height as u64).is_ok());
    // A small target keeps each run fast; the first byte varies it (odd sizes, 1 pixel).
    let size = 1 + data.first().map_or(0, |b| *b as usize % 40);
    let px = preprocess_image(&img, size, CLIP_MEAN, CLIP_STD);
    assert_eq!(px.len(), 3 * size * size);
    assert!(px.iter().all(|v| v.is_finite()));
});

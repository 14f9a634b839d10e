//! LLaVA's image preprocessing (spec section 3b), written to give the same numbers as the released
//! inference: `Image.open(p).convert("RGB")`, LLaVA `expand2square` with the mean colour, then
//! transformers' `CLIPImageProcessor` (PIL backend): resize the shortest edge with PIL's bicubic
//! `Image.resize`, centre crop, rescale by 1/255, normalise.
//!
//! The resize is PIL's algorithm (Pillow `src/libImaging/Resample.c`), reimplemented from its
//! description: separable convolution with the antialiased Keys cubic (a = -0.5), each pass on
//! uint8 with 22-bit fixed-point coefficients, so the result is the exact uint8 image PIL makes
//! (checked against Pillow 13.0.0 in `tests/image_preprocess.rs`). The coefficients and rounding
//! have been the same since Pillow 4.3; Pillow 13 may run the vertical pass first (see
//! [`pillow_vertical_first`]), which changes some non-square resizes by a few levels but never
//! LLaVA's square-to-square one. The float steps follow transformers 5.x
//! `image_transforms.rescale` / `normalize`.
use crate::ground::error::{Error, Result};
use std::path::Path;

/// CLIP's (OpenAI) normalisation constants, the defaults of `CLIPImageProcessor`, written as in
/// `preprocessor_config.json` (the f32 nearest to each, as numpy's `float32` cast gives).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// `rescale_factor` of `CLIPImageProcessor` (Python `1 / 255`, a double).
pub const RESCALE_FACTOR: f64 = 1.0 / 255.0;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved R, G, B.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` bytes, RGB interleaved (HWC order).
    pub data: Vec<u8>,
}

impl RgbImage {
    /// An image filled with one colour.
    pub fn filled(width: usize, height: usize, colour: [u8; 3]) -> Self {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&colour);
        }
        RgbImage {
            width,
            height,
            data,
        }
    }
    /// The pixel at column `x`, row `y` (panics when outside).
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

// ----------------------------------------------------------------------------------- loading

/// Decode a PNG or JPEG file into RGB the way `PIL.Image.open(path).convert("RGB")` does:
/// alpha is dropped (not composited), grey is replicated, palettes are expanded; 16-bit PNGs
/// follow Pillow's readers: RGB, RGBA and grey+alpha keep the high byte of each sample
/// (`RGB;16B` unpackers), 16-bit grey (mode `I;16`) is clamped to 255 by `convert("RGB")`.
/// EXIF orientation is not applied (neither LLaVA nor `Image.open` applies it).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = crate::ground::fsutil::read_input(path, MAX_IMAGE_FILE)?;
    decode_image(&bytes, path)
}

/// The largest image file read (a photo is a few MB; the cap keeps a huge file from being read whole).
pub const MAX_IMAGE_FILE: u64 = 256 << 20;
/// The largest image side decoded. The pad-and-resize below needs memory only for the decoded
/// image and one resampled window, but decoding an absurd canvas is refused outright.
pub const MAX_IMAGE_SIDE: u32 = 1 << 15;
/// The most pixels decoded (64 Mi, e.g. 8192 x 8192): 192 MiB as RGB.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 26;
/// What the decoder may allocate at once (a 16-bit RGBA image of MAX_IMAGE_PIXELS is 512 MiB).
const MAX_DECODE_ALLOC: u64 = 600 << 20;

/// Refuse image dimensions past [`MAX_IMAGE_SIDE`] / [`MAX_IMAGE_PIXELS`] (read from the header,
/// before anything is decoded).
pub fn check_image_size(width: u64, height: u64) -> std::result::Result<(), String> {
    if width > MAX_IMAGE_SIDE as u64 || height > MAX_IMAGE_SIDE as u64 {
        return Err(format!(
            "image is {width}x{height}; sides above {MAX_IMAGE_SIDE} pixels are not accepted"
        ));
    }
    if width * height > MAX_IMAGE_PIXELS {
        return Err(format!(
            "image is {width}x{height} = {} pixels; more than {MAX_IMAGE_PIXELS} are not accepted",
            width * height
        ));
    }
    Ok(())
}

/// [`load_image`] on bytes already in memory; `path` only names the source in errors.
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    use ::image::{DynamicImage, ImageFormat, ImageReader};
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::input(path, format!("cannot read image: {e}")))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => f,
        Some(f) => {
            return Err(Error::input(
                path,
                format!("image format {f:?} is not supported (only PNG and JPEG)"),
            ))
        }
        None => {
            return Err(Error::input(
                path,
                "not a PNG or JPEG image (unrecognised file signature)",
            ))
        }
    };
    // Dimensions from the header first: an absurd canvas is refused before any allocation.
    let header = ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let (w, h) = header
        .into_dimensions()
        .map_err(|e| Error::input(path, format!("cannot read {format:?} header: {e}")))?;
    check_image_size(w as u64, h as u64).map_err(|m| Error::input(path, m))?;
    let mut reader = reader;
    let mut limits = ::image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| Error::input(path, format!("cannot decode {format:?} image: {e}")))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(Error::input(
            path,
            format!("image is empty ({width}x{height})"),
        ));
    }
    // A 16-bit grey PNG with a tRNS colour decodes as grey+alpha here but is still mode I;16 in PIL
    // (IHDR colour type, byte 25 of a PNG, is 0 for grey).
    let png_grey = format == ImageFormat::Png && bytes.len() > 25 && bytes[25] == 0;
    let hi = |x: u16| (x >> 8) as u8;
    let clamp = |x: u16| x.min(255) as u8;
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().flat_map(|&g| [g; 3]).collect(),
        DynamicImage::ImageLumaA8(b) => {
            b.as_raw().chunks_exact(2).flat_map(|p| [p[0]; 3]).collect()
        }
        DynamicImage::ImageRgb16(b) => b.as_raw().iter().map(|&x| hi(x)).collect(),
        DynamicImage::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [hi(p[0]), hi(p[1]), hi(p[2])])
            .collect(),
        DynamicImage::ImageLuma16(b) => b.as_raw().iter().flat_map(|&x| [clamp(x); 3]).collect(),
        DynamicImage::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| [if png_grey { clamp(p[0]) } else { hi(p[0]) }; 3])
            .collect(),
        other => other.to_rgb8().into_raw(),
    };
    if data.len() != width * height * 3 {
        return Err(Error::input(
            path,
            format!(
                "decoded image has {} bytes, expected {width}x{height}x3",
                data.len()
            ),
        ));
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

// ----------------------------------------------------------------------------------- padding

/// LLaVA's pad colour for a normalisation mean: `tuple(int(x * 255) for x in image_mean)`.
/// The mean arrives here as f32; its shortest decimal form (the number written in
/// `preprocessor_config.json`) is read back as a double first, so the product is the one Python
/// computes from the JSON value.
pub fn background_from_mean(mean: [f32; 3]) -> [u8; 3] {
    mean.map(|m| {
        let m64: f64 = format!("{m}").parse().unwrap_or(m as f64);
        (m64 * 255.0).clamp(0.0, 255.0) as u8 // `as` truncates toward zero, like Python int()
    })
}

/// LLaVA `expand2square`: pad the short side with `background`; the original is pasted at
/// `((long - short) // 2)` along the padded axis (top rows / left columns get the smaller half).
pub fn expand_to_square(img: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width, img.height);
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let (ox, oy) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    let mut out = RgbImage::filled(side, side, background);
    for y in 0..h {
        let src = &img.data[y * w * 3..(y + 1) * w * 3];
        let at = ((y + oy) * side + ox) * 3;
        out.data[at..at + w * 3].copy_from_slice(src);
    }
    out
}

// ----------------------------------------------------------------------------------- resizing

/// transformers `get_resize_output_image_size(image, size, default_to_square=False)`: the short
/// edge becomes `shortest`, the long one `int(shortest * long / short)` (true division, then
/// truncation). Returns `(new_width, new_height)`.
pub fn resize_output_size(width: usize, height: usize, shortest: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python: int * int is exact, `/` is the correctly rounded double quotient, int() truncates.
    let new_long = ((shortest as f64 * long as f64) / short as f64) as usize;
    if width <= height {
        (shortest, new_long)
    } else {
        (new_long, shortest)
    }
}

/// Resize so that the shortest edge is `shortest` (the other by [`resize_output_size`]) with PIL's
/// bicubic filter, as `CLIPImageProcessor.resize` does.
pub fn resize_shortest_edge_bicubic(img: &RgbImage, shortest: usize) -> RgbImage {
    let (w, h) = resize_output_size(img.width, img.height, shortest);
    resize_bicubic(img, w, h)
}

/// Pillow's fixed-point precision for 8-bit resampling: 32 bits minus 8 for the value minus 2
/// for the overshoot of a kernel with negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Keys' cubic convolution kernel with a = -0.5 (support 2), in Pillow's evaluation order.
fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one resampling pass: output `i` reads `len[i]` inputs from `start[i]` with the
/// fixed-point weights `weights[i * ksize ..]`.
struct Taps {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

/// Pillow's coefficient table for resampling `in_size` samples to `out_size` (box = whole axis).
/// When shrinking, the kernel is stretched by the scale (antialiasing); each output's weights are
/// normalised to sum 1 in double, then rounded half away from zero to 22-bit fixed point.
fn taps(in_size: usize, out_size: usize) -> Taps {
    // Pillow: scale = (double)(in1 - in0) / outSize with a float box (exact for image sizes).
    let scale = (in_size as f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    let one = (1u32 << PRECISION_BITS) as f64;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C `(int)` casts: truncation toward zero, then clamped to the image.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let (xmin, n) = (xmin as usize, xmax.max(0) as usize);
        let mut ww = 0.0f64;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            let v = bicubic_kernel((((x + xmin) as f64) - center + 0.5) * ss);
            *wx = v;
            ww += v;
        }
        for (x, &wx) in w.iter().enumerate().take(n) {
            let k = if ww != 0.0 { wx / ww } else { wx };
            weights[xx * ksize + x] = if k < 0.0 {
                (-0.5 + k * one) as i32
            } else {
                (0.5 + k * one) as i32
            };
        }
        start.push(xmin);
        len.push(n);
    }
    Taps {
        ksize,
        start,
        len,
        weights,
    }
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift, i.e. floor) and clamp to 0..=255.
/// The accumulator starts at one half, so the shift rounds half up.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow 13's choice of pass order (Pillow PR #9549, "if height is scaled down significantly
/// more than width, resize vertically first"): the vertical pass goes first when the height
/// shrinks and loses more than twice as many pixels as the width does. Found by probing Pillow
/// 13.0.0 (17,000 size combinations plus 1,500 random ones, no exception; ties go horizontal
/// first). Pillow 12 and older always go horizontal first. LLaVA's padded pipeline resizes a
/// square to a square, where both rules pick horizontal first.
pub fn pillow_vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    out_w != in_w && out_h < in_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64)
}

/// `PIL.Image.resize((width, height), Image.BICUBIC)` on an RGB image, bit for bit (Pillow 13):
/// one pass per changed axis into a uint8 intermediate, in [`pillow_vertical_first`] order; same
/// size returns a copy.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    resize_bicubic_ordered(
        img,
        width,
        height,
        pillow_vertical_first(img.width, img.height, width, height),
    )
}

/// [`resize_bicubic`] with the pass order given (`false` = horizontal first, as Pillow <= 12
/// always does). The order matters only through the uint8 rounding of the intermediate.
pub fn resize_bicubic_ordered(
    img: &RgbImage,
    width: usize,
    height: usize,
    vertical_first: bool,
) -> RgbImage {
    assert!(
        width > 0 && height > 0,
        "resize to an empty image ({width}x{height})"
    );
    if vertical_first {
        resample_horizontal(&resample_vertical(img, height), width)
    } else {
        resample_vertical(&resample_horizontal(img, width), height)
    }
}

/// One horizontal pass (identity when the width is unchanged, as in Pillow).
fn resample_horizontal(img: &RgbImage, width: usize) -> RgbImage {
    if width == img.width {
        return img.clone();
    }
    let t = taps(img.width, width);
    let mut out = Vec::with_capacity(img.height * width * 3);
    for y in 0..img.height {
        let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        out.extend_from_slice(&resample_row(row, &t, width));
    }
    RgbImage {
        width,
        height: img.height,
        data: out,
    }
}

/// One RGB row resampled to `width` pixels with the taps `t`.
fn resample_row(row: &[u8], t: &Taps, width: usize) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; width * 3];
    for xx in 0..width {
        let k = &t.weights[xx * t.ksize..xx * t.ksize + t.len[xx]];
        let mut acc = [half; 3];
        for (i, &kw) in k.iter().enumerate() {
            let p = (t.start[xx] + i) * 3;
            for c in 0..3 {
                acc[c] += row[p + c] as i32 * kw;
            }
        }
        for c in 0..3 {
            out[xx * 3 + c] = clip8(acc[c]);
        }
    }
    out
}

/// One vertical pass (identity when the height is unchanged, as in Pillow).
fn resample_vertical(img: &RgbImage, height: usize) -> RgbImage {
    if height == img.height {
        return img.clone();
    }
    let half = 1i32 << (PRECISION_BITS - 1);
    let t = taps(img.height, height);
    let w3 = img.width * 3;
    let mut out = vec![0u8; height * w3];
    let mut acc = vec![0i32; w3];
    for yy in 0..height {
        acc.fill(half);
        let k = &t.weights[yy * t.ksize..yy * t.ksize + t.len[yy]];
        for (i, &kw) in k.iter().enumerate() {
            let row = &img.data[(t.start[yy] + i) * w3..(t.start[yy] + i + 1) * w3];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as i32 * kw;
            }
        }
        for (o, &a) in out[yy * w3..(yy + 1) * w3].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage {
        width: img.width,
        height,
        data: out,
    }
}

// ----------------------------------------------------------------------------------- crop, normalise

/// transformers `center_crop(image, (height, width))`: offsets `(size - crop) // 2`; where the crop
/// is larger than the image, the image is first centred (offset `ceil((crop - size) / 2)`) on a
/// zero (black) canvas, as transformers does.
pub fn center_crop(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    // Per axis: the source index of output index 0 (may be negative = zero padding).
    let origin = |size: usize, crop: usize| -> isize {
        if size >= crop {
            ((size - crop) / 2) as isize
        } else {
            -(((crop - size).div_ceil(2)) as isize)
        }
    };
    let (oy, ox) = (origin(img.height, height), origin(img.width, width));
    let mut out = RgbImage::filled(width, height, [0, 0, 0]);
    for y in 0..height {
        let sy = y as isize + oy;
        if sy < 0 || sy >= img.height as isize {
            continue;
        }
        for x in 0..width {
            let sx = x as isize + ox;
            if sx < 0 || sx >= img.width as isize {
                continue;
            }
            let s = (sy as usize * img.width + sx as usize) * 3;
            let d = (y * width + x) * 3;
            out.data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    out
}

/// The model input: `[3, H, W]` (C order) of `(x * rescale - mean) / std`, computed as
/// transformers does: `rescale` multiplies in double by the Python double `1/255` and casts to
/// float32; `normalize` subtracts and divides in float32 (mean and std cast to float32).
pub fn to_pixel_values(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let n = img.width * img.height;
    let mut out = vec![0f32; 3 * n];
    for c in 0..3 {
        for i in 0..n {
            let x = (img.data[i * 3 + c] as f64 * RESCALE_FACTOR) as f32;
            out[c * n + i] = (x - mean[c]) / std[c];
        }
    }
    out
}

/// The whole LLaVA `image_aspect_ratio: pad` preprocessing of a decoded image: pad to a square
/// with the mean colour, resize the shortest edge to `image_size` (bicubic), centre crop
/// `image_size x image_size`, normalise. Returns `[3, image_size, image_size]` values.
pub fn preprocess_image(
    img: &RgbImage,
    image_size: usize,
    mean: [f32; 3],
    std: [f32; 3],
) -> Vec<f32> {
    let crop = pad_and_resize(img, background_from_mean(mean), image_size);
    to_pixel_values(&crop, mean, std)
}

/// `expand_to_square`, then `resize_shortest_edge_bicubic` and `center_crop` to `size x size`,
/// without building the padded square (a 30000 x 1 image would pad to 2.7 GB): a square resized
/// to a square needs no crop, and Pillow goes horizontal first (see [`pillow_vertical_first`]), so
/// each output row is the vertical pass over horizontally resampled rows of the padded image.
/// Those are made on demand: all padding rows resample to one row, and only the window of image
/// rows the current output row reads is kept. Memory: the image plus `size` x (kernel height)
/// pixels. Same bytes as the three steps in turn (unit test below).
pub fn pad_and_resize(img: &RgbImage, background: [u8; 3], size: usize) -> RgbImage {
    let mut rows = PaddedRows::new(img, background, size);
    let side = rows.side;
    let w3 = size * 3;
    let mut out = vec![0u8; size * w3];
    if side == size {
        for y in 0..size {
            out[y * w3..(y + 1) * w3].copy_from_slice(rows.get(y));
        }
    } else {
        let half = 1i32 << (PRECISION_BITS - 1);
        let t = taps(side, size);
        let mut acc = vec![0i32; w3];
        for yy in 0..size {
            rows.forget_before(t.start[yy]);
            acc.fill(half);
            let k = &t.weights[yy * t.ksize..yy * t.ksize + t.len[yy]];
            for (i, &kw) in k.iter().enumerate() {
                for (a, &v) in acc.iter_mut().zip(rows.get(t.start[yy] + i)) {
                    *a += v as i32 * kw;
                }
            }
            for (o, &a) in out[yy * w3..(yy + 1) * w3].iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
    }
    RgbImage {
        width: size,
        height: size,
        data: out,
    }
}

/// Rows of an image padded to a square (never built whole), each resampled horizontally to
/// `size` pixels when asked for: the padding rows share one, image rows are kept in a window
/// of consecutive rows that the caller trims with `forget_before`.
struct PaddedRows<'a> {
    img: &'a RgbImage,
    background: [u8; 3],
    side: usize,
    ox: usize,
    oy: usize,
    taps: Option<Taps>,
    /// Each output pixel's weight sum (horizontal taps).
    tap_sums: Vec<i32>,
    size: usize,
    background_row: Vec<u8>,
    /// Resampled image rows `first..first + window.len()`.
    first: usize,
    window: std::collections::VecDeque<Vec<u8>>,
}

impl<'a> PaddedRows<'a> {
    fn new(img: &'a RgbImage, background: [u8; 3], size: usize) -> Self {
        let (w, h) = (img.width, img.height);
        let side = w.max(h);
        let (ox, oy) = if w >= h {
            (0, (w - h) / 2)
        } else {
            ((h - w) / 2, 0)
        };
        let t = (side != size).then(|| taps(side, size));
        let tap_sums = t.as_ref().map_or(vec![], |t| {
            (0..size)
                .map(|xx| {
                    t.weights[xx * t.ksize..xx * t.ksize + t.len[xx]]
                        .iter()
                        .sum()
                })
                .collect()
        });
        let mut r = PaddedRows {
            img,
            background,
            side,
            ox,
            oy,
            taps: t,
            tap_sums,
            size,
            background_row: vec![],
            first: 0,
            window: Default::default(),
        };
        r.background_row = r.resampled(side); // row `side` lies outside the image: all padding
        r
    }
    fn is_image_row(&self, y: usize) -> bool {
        (self.oy..self.oy + self.img.height).contains(&y)
    }
    /// Row `y` of the padded square, resampled.
    fn resampled(&self, y: usize) -> Vec<u8> {
        let w3 = self.img.width * 3;
        let t = match &self.taps {
            Some(t) if self.is_image_row(y) => t,
            _ => {
                let mut padded = self.background.repeat(self.side);
                if self.is_image_row(y) {
                    let src = &self.img.data[(y - self.oy) * w3..(y - self.oy + 1) * w3];
                    padded[self.ox * 3..self.ox * 3 + w3].copy_from_slice(src);
                }
                return match &self.taps {
                    None => padded,
                    Some(t) => resample_row(&padded, t, self.size),
                };
            }
        };
        // Only the taps over image columns read pixels; those over the padding add
        // background x their weight sum (the same integer sum in another order). A 37 x 16437
        // image then costs its pixels, not 16437 rows of the whole padded width.
        let row = &self.img.data[(y - self.oy) * w3..(y - self.oy + 1) * w3];
        let (lo, hi) = (self.ox, self.ox + self.img.width);
        let half = 1i32 << (PRECISION_BITS - 1);
        let mut out = vec![0u8; self.size * 3];
        for xx in 0..self.size {
            let k = &t.weights[xx * t.ksize..xx * t.ksize + t.len[xx]];
            let mut acc = [half; 3];
            let s = t.start[xx];
            // Taps i with s + i in lo..hi (the image columns).
            let (a, b) = (
                lo.saturating_sub(s).min(k.len()),
                hi.saturating_sub(s).min(k.len()),
            );
            let mut pad_w = self.tap_sums[xx];
            for (i, &kw) in k.iter().enumerate().take(b).skip(a) {
                pad_w -= kw;
                let p = (s + i - lo) * 3;
                for c in 0..3 {
                    acc[c] += row[p + c] as i32 * kw;
                }
            }
            for c in 0..3 {
                out[xx * 3 + c] = clip8(acc[c] + self.background[c] as i32 * pad_w);
            }
        }
        out
    }
    fn forget_before(&mut self, y: usize) {
        while self.first < y && !self.window.is_empty() {
            self.window.pop_front();
            self.first += 1;
        }
    }
    fn get(&mut self, y: usize) -> &[u8] {
        if !self.is_image_row(y) {
            return &self.background_row;
        }
        let end = self.first + self.window.len();
        if y < self.first || y > end || self.window.is_empty() {
            // Not next to the window (only on a first or non-overlapping request): start anew.
            self.window.clear();
            self.first = y;
        }
        if y == self.first + self.window.len() {
            let r = self.resampled(y);
            self.window.push_back(r);
        }
        &self.window[y - self.first]
    }
}

/// [`load_image`] then [`preprocess_image`].
pub fn preprocess(
    path: &Path,
    image_size: usize,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<Vec<f32>> {
    if image_size == 0 {
        return Err(Error::usage("image size must be positive"));
    }
    Ok(preprocess_image(&load_image(path)?, image_size, mean, std))
}

// ----------------------------------------------------------------------------------- probe

/// Width and height of the synthetic probe image (4:3, so the padding path is exercised; larger
/// than the usual 224/336 crops, so the resize shrinks with antialiasing).
pub const SYNTHETIC_SIZE: (usize, usize) = (400, 300);

/// A deterministic synthetic RGB photo stand-in: smooth colour gradients (a triangle wave, linear
/// ramps), a disc, a rectangle, a band of stripes and a little hash noise. Integer arithmetic only,
/// so the bytes are the same on every machine.
pub fn synthetic_image(width: usize, height: usize) -> RgbImage {
    let (w, h) = (width.max(2) as i64, height.max(2) as i64);
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height as i64 {
        for x in 0..width as i64 {
            let t = (512 * x / w + 150 * y / h) % 512;
            let mut rgb = [
                if t < 256 { t } else { 511 - t },
                255 * y / (h - 1),
                255 - 255 * x * (h - 1 - y) / ((w - 1) * (h - 1)),
            ];
            // a disc around (0.3, 0.4) of radius ~0.17 (in units of width and height)
            let (dx, dy) = (10 * x - 3 * w, 10 * y - 4 * h);
            if dx * dx * h * h + dy * dy * w * w < 3 * w * w * h * h {
                rgb = [240, 220, 30];
            }
            // a rectangle over [0.6, 0.85) x [0.55, 0.8)
            if (60 * w..85 * w).contains(&(100 * x)) && (55 * h..80 * h).contains(&(100 * y)) {
                rgb = [20, 40, 200];
            }
            // diagonal stripes along the bottom
            if 100 * y > 88 * h && ((x + y) / 4) % 2 == 0 {
                rgb = [250, 250, 250];
            }
            // hash noise in [-12, 12]
            let mut hsh =
                (x as u32).wrapping_mul(0x9E37_79B1) ^ (y as u32).wrapping_mul(0x85EB_CA77);
            for (c, val) in rgb.iter().enumerate() {
                hsh ^= hsh >> 15;
                hsh = hsh.wrapping_mul(0x2C1B_3C6D).wrapping_add(c as u32);
                hsh ^= hsh >> 12;
                let noise = (hsh % 25) as i64 - 12;
                data.push((val + noise).clamp(0, 255) as u8);
            }
        }
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// The probe `verify` uses when no image is given: [`synthetic_image`] of [`SYNTHETIC_SIZE`]
/// through [`preprocess_image`]. Returns `[3, image_size, image_size]` values.
pub fn synthetic_probe(image_size: usize, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = SYNTHETIC_SIZE;
    preprocess_image(&synthetic_image(w, h), image_size, mean, std)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> RgbImage {
        let data = (0..w * h)
            .flat_map(|i| {
                [
                    (i % 251) as u8,
                    (i * 7 % 256) as u8,
                    (i / w * 13 % 256) as u8,
                ]
            })
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn expand_to_square_wide_pads_rows_with_floor_half_on_top() {
        let img = gradient(7, 2); // (7 - 2) // 2 = 2 rows on top, 3 below
        let bg = [122, 116, 104];
        let sq = expand_to_square(&img, bg);
        assert_eq!((sq.width, sq.height), (7, 7));
        for y in 0..7 {
            for x in 0..7 {
                let want = if (2..4).contains(&y) {
                    img.pixel(x, y - 2)
                } else {
                    bg
                };
                assert_eq!(sq.pixel(x, y), want, "({x},{y})");
            }
        }
    }

    #[test]
    fn expand_to_square_tall_pads_columns_and_square_is_unchanged() {
        let img = gradient(3, 8); // (8 - 3) // 2 = 2 columns on the left, 3 on the right
        let sq = expand_to_square(&img, [1, 2, 3]);
        assert_eq!((sq.width, sq.height), (8, 8));
        for y in 0..8 {
            for x in 0..8 {
                let want = if (2..5).contains(&x) {
                    img.pixel(x - 2, y)
                } else {
                    [1, 2, 3]
                };
                assert_eq!(sq.pixel(x, y), want, "({x},{y})");
            }
        }
        let same = gradient(5, 5);
        assert_eq!(expand_to_square(&same, [0, 0, 0]), same);
        // the fixture image: 70x45 -> 12 rows on top (fixtures/README.md)
        let sq = expand_to_square(&gradient(70, 45), [9, 9, 9]);
        assert_eq!(sq.pixel(0, 11), [9, 9, 9]);
        assert_eq!(sq.pixel(0, 12), gradient(70, 45).pixel(0, 0));
        assert_eq!(sq.pixel(0, 57), [9, 9, 9]);
    }

    #[test]
    fn background_is_int_of_mean_times_255() {
        assert_eq!(background_from_mean(CLIP_MEAN), [122, 116, 104]);
        assert_eq!(background_from_mean([0.5, 0.0, 1.0]), [127, 0, 255]);
    }

    #[test]
    fn output_size_rule_matches_transformers() {
        // transformers get_resize_output_image_size(default_to_square=False), values from Python
        assert_eq!(resize_output_size(70, 45, 56), (87, 56)); // int(56*70/45) = int(87.11)
        assert_eq!(resize_output_size(45, 70, 56), (56, 87));
        assert_eq!(resize_output_size(640, 480, 336), (448, 336)); // exact 448.0
        assert_eq!(resize_output_size(500, 333, 224), (336, 224)); // int(336.336...)
        assert_eq!(resize_output_size(333, 500, 224), (224, 336));
        assert_eq!(resize_output_size(1000, 999, 336), (336, 336)); // int(336.336...)
        assert_eq!(resize_output_size(3, 1000, 336), (336, 112000));
        assert_eq!(resize_output_size(70, 70, 56), (56, 56));
        assert_eq!(resize_output_size(30, 20, 56), (84, 56)); // upscale
        assert_eq!(resize_output_size(7, 3, 10), (23, 10)); // int(23.33)
    }

    #[test]
    fn resize_keeps_constant_images_and_same_size_is_a_copy() {
        for &(w, h, nw, nh) in &[
            (70, 70, 56, 56),
            (20, 30, 56, 56),
            (9, 4, 3, 17),
            (400, 300, 37, 23),
        ] {
            for v in [0u8, 1, 77, 128, 254, 255] {
                let img = RgbImage::filled(w, h, [v, 255 - v, v / 2]);
                let r = resize_bicubic(&img, nw, nh);
                assert_eq!((r.width, r.height), (nw, nh));
                assert!(
                    r.data.chunks(3).all(|p| p == [v, 255 - v, v / 2]),
                    "{w}x{h}->{nw}x{nh} value {v}"
                );
            }
        }
        let g = gradient(13, 9);
        assert_eq!(resize_bicubic(&g, 13, 9), g);
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point_and_stay_inside() {
        for &(n_in, n_out) in &[(70, 56), (30, 56), (1000, 336), (5, 1), (1, 5), (336, 336)] {
            let t = taps(n_in, n_out);
            for i in 0..n_out {
                assert!(t.start[i] + t.len[i] <= n_in && t.len[i] <= t.ksize && t.len[i] > 0);
                let s: i64 = t.weights[i * t.ksize..(i + 1) * t.ksize]
                    .iter()
                    .map(|&k| k as i64)
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= t.ksize as i64,
                    "{n_in}->{n_out} tap {i}: {s}"
                );
            }
        }
        // downscale by 1.25: support 2.5, so up to 7 taps; upscale keeps support 2 (5 taps)
        assert_eq!(taps(70, 56).ksize, 2 * 3 + 1);
        assert_eq!(taps(30, 56).ksize, 5);
    }

    #[test]
    fn center_crop_offsets_and_zero_padding() {
        let img = gradient(87, 56);
        let c = center_crop(&img, 56, 56); // left = (87 - 56) // 2 = 15
        assert_eq!((c.width, c.height), (56, 56));
        assert_eq!(c.pixel(0, 0), img.pixel(15, 0));
        assert_eq!(c.pixel(55, 55), img.pixel(70, 55));
        // larger than the image along x: image at ceil((6 - 3) / 2) = 2, zeros elsewhere
        let small = gradient(3, 4);
        let c = center_crop(&small, 2, 6); // rows: (4 - 2) // 2 = 1
        assert_eq!((c.width, c.height), (6, 2));
        for y in 0..2 {
            for x in 0..6 {
                let want = if (2..5).contains(&x) {
                    small.pixel(x - 2, y + 1)
                } else {
                    [0, 0, 0]
                };
                assert_eq!(c.pixel(x, y), want);
            }
        }
    }

    #[test]
    fn pixel_values_are_chw_and_normalised() {
        let img = RgbImage {
            width: 2,
            height: 1,
            data: vec![0, 255, 51, 255, 0, 102],
        };
        let v = to_pixel_values(&img, [0.5, 0.25, 0.0], [0.5, 0.25, 2.0]);
        assert_eq!(v.len(), 6);
        assert_eq!(&v[0..2], &[-1.0, 1.0]);
        assert_eq!(&v[2..4], &[3.0, -1.0]);
        assert!((v[4] - 0.1).abs() < 1e-7 && (v[5] - 0.2).abs() < 1e-7);
    }

    #[test]
    fn synthetic_probe_is_deterministic_and_sane() {
        let a = synthetic_probe(56, CLIP_MEAN, CLIP_STD);
        assert_eq!(a, synthetic_probe(56, CLIP_MEAN, CLIP_STD));
        assert_eq!(a.len(), 3 * 56 * 56);
        assert!(a.iter().all(|v| v.is_finite() && v.abs() < 2.2));
        let img = synthetic_image(SYNTHETIC_SIZE.0, SYNTHETIC_SIZE.1);
        // not flat: many distinct colours
        let mut seen = std::collections::HashSet::new();
        for p in img.data.chunks(3) {
            seen.insert([p[0], p[1], p[2]]);
        }
        assert!(seen.len() > 5000, "{}", seen.len());
        let b = synthetic_probe(336, CLIP_MEAN, CLIP_STD);
        assert_eq!(b.len(), 3 * 336 * 336);
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("mmfuser-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.png");
        let e = load_image(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.png"), "{e}");
        let junk = dir.join("junk.png");
        std::fs::write(&junk, b"not an image at all").unwrap();
        let e = load_image(&junk).unwrap_err().to_string();
        assert!(e.contains("junk.png"), "{e}");
        let trunc = dir.join("trunc.png");
        std::fs::write(&trunc, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0").unwrap();
        let e = load_image(&trunc).unwrap_err().to_string();
        assert!(e.contains("trunc.png"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The streamed pad + resize gives the bytes of the three steps in turn (those are checked
    /// against Pillow / transformers in tests/image_preprocess.rs): wide, tall, square, odd
    /// padding, shrink, enlarge and same size, down to one-pixel strips.
    #[test]
    fn pad_and_resize_equals_pad_then_resize_then_crop() {
        let bg = [122, 116, 104];
        for &(w, h) in &[
            (40, 30),
            (30, 40),
            (33, 33),
            (41, 8),
            (8, 41),
            (1, 57),
            (57, 1),
            (7, 2),
            (2, 7),
            (3, 1),
            (1, 1),
            (12, 20),
            (20, 12),
            (200, 3),
            (3, 200),
        ] {
            for size in [1, 5, 12, 20, 24, 56] {
                let img = gradient(w, h);
                let sq = expand_to_square(&img, bg);
                let r = resize_shortest_edge_bicubic(&sq, size);
                let want = center_crop(&r, size, size);
                assert_eq!(pad_and_resize(&img, bg, size), want, "{w}x{h} -> {size}");
            }
        }
    }

    #[test]
    fn absurd_sizes_are_refused_from_the_header() {
        assert!(check_image_size(100_000, 1).is_err());
        assert!(check_image_size(20_000, 20_000).is_err());
        assert!(check_image_size(8192, 8192).is_ok());
        assert!(check_image_size(32768, 2048).is_ok());
    }
}

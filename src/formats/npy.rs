//! Minimal .npy (NumPy format 1.0/2.0) reader and writer for little-endian f32/f64/i64/i32/u8 arrays.
//! Hand-written: the format is a 10-line header plus raw data, and the npy crates pull in far more
//! than we need (we only exchange dense C-order arrays with the Python oracles).
use crate::ground::error::{Error, Result};
use std::path::Path;

/// A dense C-order array read from a .npy file, converted to f32 or kept as raw bytes.
#[derive(Debug, Clone)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    /// NumPy dtype descriptor, e.g. "<f4".
    pub descr: String,
    pub data: Vec<u8>,
}

impl NpyArray {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Values as f32 (from f4, f8, f2, i8, i4, u1 data).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = &self.data;
        Ok(match self.descr.as_str() {
            "<f4" => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            "<f8" => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            "<f2" => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            "<i8" => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            "<i4" => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            "|u1" => d.iter().map(|&b| b as f32).collect(),
            other => return Err(Error::other(format!("npy dtype {other} is not supported"))),
        })
    }
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        if self.descr == "<f8" {
            return Ok(self
                .data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect());
        }
        Ok(self.to_f32()?.into_iter().map(|v| v as f64).collect())
    }
}

fn parse_header(path: &Path, header: &str) -> Result<(String, bool, Vec<usize>)> {
    let bad = |m: &str| Error::input(path, format!("bad .npy header ({m}): {header}"));
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))?;
        let rest = &header[at + key.len() + 2..];
        let colon = rest.find(':')?;
        Some(rest[colon + 1..].trim_start())
    };
    let descr = field("descr").ok_or_else(|| bad("no descr"))?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| bad("descr"))?;
    let fortran = field("fortran_order")
        .ok_or_else(|| bad("no fortran_order"))?
        .starts_with("True");
    let shape = field("shape").ok_or_else(|| bad("no shape"))?;
    let shape = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("shape"))?;
    let dims = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("shape value")))
        .collect::<Result<Vec<_>>>()?;
    Ok((descr.to_string(), fortran, dims))
}

pub fn read(path: impl AsRef<Path>) -> Result<NpyArray> {
    let path = path.as_ref();
    let bytes = crate::ground::fsutil::read_input(path, crate::ground::fsutil::CAP_PROBE)?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(Error::input(path, "not a .npy file (bad magic)"));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => {
            return Err(Error::input(
                path,
                format!(".npy version {v} is not supported"),
            ))
        }
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| Error::input(path, "truncated .npy header"))?;
    let (descr, fortran, shape) = parse_header(path, header)?;
    if descr.starts_with('>') {
        return Err(Error::input(
            path,
            format!("npy dtype '{descr}' is big-endian; only little-endian arrays are read"),
        ));
    }
    if fortran {
        return Err(Error::input(
            path,
            "Fortran-order .npy arrays are not supported",
        ));
    }
    let itemsize: usize = descr
        .get(2..)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::input(path, format!("npy dtype '{descr}' is not understood")))?;
    let need = shape
        .iter()
        .try_fold(itemsize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::input(path, format!("shape {shape:?} overflows")))?;
    let data = &bytes[hstart + hlen..];
    if data.len() != need {
        return Err(Error::input(
            path,
            format!(
                "expected {need} data bytes for shape {shape:?}, found {}",
                data.len()
            ),
        ));
    }
    Ok(NpyArray {
        shape,
        descr,
        data: data.to_vec(),
    })
}

/// Write an f32 array (C order) as .npy version 1.0.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], values: &[f32]) -> Result<()> {
    let path = path.as_ref();
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    // Pad so that the data starts at a multiple of 64 bytes, header ends with '\n'.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + values.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    crate::ground::fsutil::write_atomic(path, &out)
}

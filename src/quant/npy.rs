//! A tiny reader for the `.npy` fixtures (little-endian f32, C order, format 1.0/2.0/3.0).
//! Test-only: the quantizer fixtures are written by numpy's `np.save`.

use std::path::Path;

/// Reads a `<f4` C-order array: returns (shape, values).
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>), String> {
    let b = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |m: &str| format!("{}: {m}", path.display());
    if b.len() < 10 || &b[0..6] != b"\x93NUMPY" {
        return Err(bad("not an .npy file"));
    }
    let (hlen, hstart) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        _ => return Err(bad("unsupported .npy version")),
    };
    let header = std::str::from_utf8(b.get(hstart..hstart + hlen).ok_or_else(|| bad("short header"))?)
        .map_err(|_| bad("header not UTF-8"))?;
    if !header.contains("'descr': '<f4'") {
        return Err(bad(&format!("expected '<f4' data, header {header}")));
    }
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order not supported"));
    }
    let shape_start = header.find("'shape': (").ok_or_else(|| bad("no shape"))? + "'shape': (".len();
    let shape_end = shape_start + header[shape_start..].find(')').ok_or_else(|| bad("bad shape"))?;
    let shape: Vec<usize> = header[shape_start..shape_end]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape entry")))
        .collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let data = &b[hstart + hlen..];
    if data.len() != 4 * n {
        return Err(bad(&format!("{} data bytes for {n} f32 values", data.len())));
    }
    let vals = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((shape, vals))
}

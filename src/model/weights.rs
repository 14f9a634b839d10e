//! Where the model's weights come from: one trait over source checkpoints and GGUF files.
//!
//! Names are GGUF names (llama.cpp naming; `v.*` for the CLIP tower, `mm.*` for the projector);
//! shapes are PyTorch order ([out, in] for linear weights). The model fetches each weight when the
//! layer that uses it runs and drops it afterwards, so a source should hand out borrowed bytes
//! (an mmap) wherever it can.
use crate::ground::dtype::GgmlType;
use crate::ground::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::borrow::Cow;
use std::path::PathBuf;

/// One stored tensor: its type, its PyTorch-order shape and its bytes (little-endian, as in GGUF).
#[derive(Debug, Clone)]
pub struct RawTensor<'a> {
    pub ty: GgmlType,
    /// PyTorch order, e.g. [out, in] (the reverse of GGUF `ne`).
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl RawTensor<'_> {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// How a source's Q/K projection rows are ordered within each head, which decides the rope form
/// that computes the model from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeMode {
    /// llama.cpp's layout (rows permuted by its converter): interleaved pairs, ggml "NORM" rope.
    Interleaved,
    /// HF's layout (rows as the checkpoint stores them): rotate_half, ggml "NEOX" rope.
    Neox,
}

pub trait WeightSource: Send + Sync {
    /// The Q/K row layout of `blk.*.attn_q/attn_k` (GGUF names are llama.cpp's, so its layout).
    fn rope_mode(&self) -> RopeMode {
        RopeMode::Interleaved
    }
    /// A weight by its GGUF name, in its stored type (F32/F16/BF16 or a block-quantized type).
    fn raw(&self, name: &str) -> Result<RawTensor<'_>>;
    fn has(&self, name: &str) -> bool;
    /// The file or directory the weights come from, for error messages.
    fn origin(&self) -> PathBuf {
        PathBuf::from("<weights>")
    }
    /// The file the weight `name` comes from (sources split over several files override this).
    fn origin_of(&self, name: &str) -> PathBuf {
        let _ = name;
        self.origin()
    }
    /// A hint that the model is done with this weight's stored bytes for now: memory-mapped
    /// sources drop its pages from the process (they stay in the page cache), so resident memory
    /// stays near one layer instead of growing to the whole mapped model.
    fn release(&self, _name: &str) {}
    /// Where the weight's stored bytes lie, if they stay in one place for the source's lifetime
    /// (a memory-mapped file). Two weights of one name at the same place are the same bytes, so
    /// the same product, up to the order of rows (`paired` shares it between two forwards).
    /// None (the default): bytes made on demand, never shared.
    fn stored_at(&self, _name: &str) -> Option<StoredAt> {
        None
    }
    /// f32 candle Tensor (CPU) of the weight, in its PyTorch shape.
    fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        raw_to_f32(self, name, self.raw(name)?)
    }
}

/// Where a weight's stored bytes lie ([`WeightSource::stored_at`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAt {
    /// Address and length of the bytes.
    pub bytes: (usize, usize),
    /// None: the weight is those bytes, rows in order. Some(order): the weight is those bytes
    /// with row `i` moved to row `order[i]` (a permutation of whole rows).
    pub rows: Option<Vec<usize>>,
}

impl StoredAt {
    /// The place of `data`, rows in order.
    pub fn of(data: &[u8]) -> Self {
        StoredAt {
            bytes: (data.as_ptr() as usize, data.len()),
            rows: None,
        }
    }
}

/// A weight fetched with `raw` as an f32 candle Tensor (CPU) in its PyTorch shape; its bytes
/// are released afterwards.
pub fn raw_to_f32<W: WeightSource + ?Sized>(
    ws: &W,
    name: &str,
    raw: RawTensor<'_>,
) -> Result<Tensor> {
    let n = raw.n_elements();
    let values =
        dequantize(raw.ty, &raw.data, n).map_err(|m| Error::tensor(ws.origin_of(name), name, m))?;
    let shape = raw.shape.clone();
    drop(raw);
    ws.release(name);
    Ok(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?)
}

/// Selected rows of a 2-D weight (an embedding table) as f32 [ids.len(), cols], dequantizing only
/// those rows (a quantized row is a whole number of blocks for every model this tool handles).
pub fn rows_f32(ws: &dyn WeightSource, name: &str, ids: &[usize]) -> Result<Tensor> {
    let raw = ws.raw(name)?;
    let err = |m: String| Error::tensor(ws.origin_of(name), name, m);
    let [n_rows, cols] = raw.shape[..] else {
        return Err(err(format!(
            "expected a 2-D table, found shape {:?}",
            raw.shape
        )));
    };
    let row_bytes = raw.ty.bytes_for(cols as u64).ok_or_else(|| {
        err(format!(
            "a row of {cols} values is not a whole number of {} blocks",
            raw.ty
        ))
    })? as usize;
    if raw.data.len() != row_bytes * n_rows {
        return Err(err(format!(
            "{} bytes for shape {:?} of type {}",
            raw.data.len(),
            raw.shape,
            raw.ty
        )));
    }
    let mut out = Vec::with_capacity(ids.len() * cols);
    for &id in ids {
        if id >= n_rows {
            return Err(err(format!(
                "row {id} is out of range (the table has {n_rows} rows)"
            )));
        }
        let bytes = &raw.data[id * row_bytes..(id + 1) * row_bytes];
        out.extend(dequantize(raw.ty, bytes, cols).map_err(err)?);
    }
    drop(raw);
    ws.release(name);
    Ok(Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)?)
}

/// `n` values of `ty` from `bytes` as f32 (crate::quant does the block formats), converted in
/// parallel chunks of whole blocks.
pub(crate) fn dequantize(
    ty: GgmlType,
    bytes: &[u8],
    n: usize,
) -> std::result::Result<Vec<f32>, String> {
    use rayon::prelude::*;
    let need = ty
        .bytes_for(n as u64)
        .ok_or_else(|| format!("{n} values are not a whole number of {ty} blocks"))?
        as usize;
    if bytes.len() != need {
        return Err(format!(
            "expected {need} bytes of {ty} for {n} values, found {}",
            bytes.len()
        ));
    }
    let blocks = (1usize << 16).div_ceil(ty.block_size());
    let mut out = vec![0f32; n];
    out.par_chunks_mut(blocks * ty.block_size())
        .zip(bytes.par_chunks(blocks * ty.type_size()))
        .try_for_each(|(o, b)| crate::quant::dequantize_into(ty, b, o))
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// An in-memory weight source (tests, small probes): name -> (type, shape, bytes).
#[derive(Debug, Default, Clone)]
pub struct MemWeights {
    pub tensors: std::collections::HashMap<String, (GgmlType, Vec<usize>, Vec<u8>)>,
}

impl MemWeights {
    pub fn new() -> Self {
        Self::default()
    }
    /// Insert an f32 tensor.
    pub fn insert_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "{name}: shape/value count mismatch"
        );
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors
            .insert(name.to_string(), (GgmlType::F32, shape.to_vec(), bytes));
    }
}

impl WeightSource for MemWeights {
    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let (ty, shape, data) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor("<memory>", name, "no such tensor"))?;
        Ok(RawTensor {
            ty: *ty,
            shape: shape.clone(),
            data: Cow::Borrowed(data),
        })
    }
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn origin(&self) -> PathBuf {
        PathBuf::from("<memory>")
    }
    /// The bytes stay where they are while the source is borrowed (no insert can move them).
    fn stored_at(&self, name: &str) -> Option<StoredAt> {
        let (_, _, data) = self.tensors.get(name)?;
        Some(StoredAt::of(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::Rng;

    #[test]
    fn rows_equal_full_dequantization() {
        let (rows, cols) = (5, 512);
        let v = Rng::new(2).vec(rows * cols, 1.0);
        let mut ws = MemWeights::new();
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q6K,
        ] {
            let bytes = crate::quant::quantize(ty, &v).unwrap();
            ws.tensors
                .insert(ty.name().to_string(), (ty, vec![rows, cols], bytes));
            let full = ws.tensor_f32(ty.name()).unwrap().to_vec2::<f32>().unwrap();
            let want = crate::quant::dequantize(ty, &ws.raw(ty.name()).unwrap().data, rows * cols)
                .unwrap();
            assert_eq!(full.concat(), want, "{ty}");
            let picked = rows_f32(&ws, ty.name(), &[3, 0, 3])
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(
                picked,
                vec![full[3].clone(), full[0].clone(), full[3].clone()],
                "{ty}"
            );
            let tol = if ty.is_quantized() { 0.1 } else { 1e-2 };
            assert!(
                full.concat()
                    .iter()
                    .zip(&v)
                    .all(|(a, b)| (a - b).abs() < tol),
                "{ty}"
            );
        }
        assert!(rows_f32(&ws, "F32", &[5]).is_err());
        assert!(ws.tensor_f32("missing").is_err());
    }
}

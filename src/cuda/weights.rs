//! The device weight cache: each weight uploaded once, in its stored type where a kernel reads
//! that type, and kept while device memory allows; parameters (norm weights, biases, embeddings)
//! as f32 activations.
use super::memory::{CudaTensor, MemStats};
use super::{cu, CudaBackend};
use crate::ground::dtype::GgmlType;
use crate::ground::error::{Error, Result};
use crate::model::weights::WeightSource;
use cudarc::driver::CudaSlice;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Device memory left free when deciding whether to keep a weight cached.
const RESERVE_BYTES: usize = 2 << 30;

/// A weight matrix [rows (out), cols (in)] on the device, in its stored type.
pub struct DevWeight {
    pub(super) ty: GgmlType,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) row_bytes: usize,
    pub(super) data: CudaSlice<u8>,
    stats: Arc<MemStats>,
    cached: bool,
}

impl Drop for DevWeight {
    fn drop(&mut self) {
        if self.cached {
            self.stats
                .weights
                .fetch_sub(self.data.len(), Ordering::Relaxed);
        }
    }
}

/// The cache key of a weight or parameter: (origin, name).
fn key(ws: &dyn WeightSource, name: &str) -> String {
    format!("{}\0{name}", ws.origin().display())
}

impl CudaBackend {
    /// Drop every cached weight and parameter (their device memory is freed).
    pub fn clear_weights(&self) {
        self.weights.lock().unwrap().clear();
        self.params.lock().unwrap().clear();
        self.inner.pool.clear();
    }

    /// The weight `name` if it is on the device already (nothing is fetched).
    pub(super) fn cached_weight(
        &self,
        ws: &dyn WeightSource,
        name: &str,
    ) -> Option<Arc<DevWeight>> {
        self.weights.lock().unwrap().get(&key(ws, name)).cloned()
    }

    /// Upload a weight's bytes (or reuse them): F32/F16/BF16/Q8_0/Q4_0/Q4_K/Q6_K as stored,
    /// anything else dequantized to F32 on the host.
    pub(super) fn device_weight(
        &self,
        ws: &dyn WeightSource,
        name: &str,
    ) -> Result<Arc<DevWeight>> {
        let key = key(ws, name);
        if let Some(w) = self.weights.lock().unwrap().get(&key) {
            return Ok(w.clone());
        }
        let raw = ws.raw(name)?;
        if raw.shape.len() < 2 {
            return Err(Error::tensor(
                ws.origin_of(name),
                name,
                format!("expected a matrix, found shape {:?}", raw.shape),
            ));
        }
        let rows = raw.shape[0];
        let cols: usize = raw.shape[1..].iter().product();
        let direct = matches!(
            raw.ty,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4K
                | GgmlType::Q6K
        ) && (!raw.ty.is_quantized() || cols.is_multiple_of(raw.ty.block_size()));
        let (ty, bytes): (GgmlType, std::borrow::Cow<[u8]>) = if direct {
            let need = raw.ty.bytes_for((rows * cols) as u64).unwrap_or(u64::MAX) as usize;
            if raw.data.len() != need {
                return Err(Error::tensor(
                    ws.origin_of(name),
                    name,
                    format!(
                        "{} bytes for shape {:?} of type {}",
                        raw.data.len(),
                        raw.shape,
                        raw.ty
                    ),
                ));
            }
            (raw.ty, raw.data)
        } else {
            drop(raw);
            let t = ws.tensor_f32(name)?;
            let v = crate::model::backend::with_f32(&t, |s| {
                s.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()
            })?;
            (GgmlType::F32, std::borrow::Cow::Owned(v))
        };
        let row_bytes = ty.bytes_for(cols as u64).unwrap_or(0) as usize;
        let (free, _) = self.inner.ctx.mem_get_info().unwrap_or((usize::MAX, 0));
        let keep = free.saturating_sub(bytes.len()) > RESERVE_BYTES;
        let data = match self.stream().clone_htod(&bytes[..]) {
            Ok(d) => d,
            Err(_) => {
                // Out of memory: drop the cache and try once more.
                self.clear_weights();
                self.synchronize()?;
                self.stream().clone_htod(&bytes[..]).map_err(cu)?
            }
        };
        let n_bytes = bytes.len();
        drop(bytes);
        ws.release(name);
        let s = &self.inner.stats;
        s.uploaded.fetch_add(n_bytes, Ordering::Relaxed);
        let w = Arc::new(DevWeight {
            ty,
            rows,
            cols,
            row_bytes,
            data,
            stats: s.clone(),
            cached: keep,
        });
        if keep {
            let now = s.weights.fetch_add(n_bytes, Ordering::Relaxed) + n_bytes;
            s.weights_peak.fetch_max(now, Ordering::Relaxed);
            self.weights.lock().unwrap().insert(key, w.clone());
        }
        Ok(w)
    }

    pub(super) fn op_param(&self, ws: &dyn WeightSource, name: &str) -> Result<CudaTensor> {
        let key = key(ws, name);
        if let Some(t) = self.params.lock().unwrap().get(&key) {
            return Ok(t.clone());
        }
        let t = ws.tensor_f32(name)?;
        let t = self.op_upload(&t)?;
        self.params.lock().unwrap().insert(key, t.clone());
        Ok(t)
    }
}

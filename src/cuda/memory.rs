//! Device memory: activation buffers (counted while they live, recycled through a pool of freed
//! buffers), uploads and downloads, and the memory report.
use super::{cu, grid1d, CudaBackend};
use crate::ground::error::Result;
use candle_core::{Device, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, PushKernelArg};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Byte counters (activations are counted by `DevBuf`, weights by the caches).
#[derive(Default)]
pub(super) struct MemStats {
    live: AtomicUsize,
    peak: AtomicUsize,
    pub(super) weights: AtomicUsize,
    pub(super) weights_peak: AtomicUsize,
    pub(super) uploaded: AtomicUsize,
}

impl MemStats {
    fn add(&self, n: usize) {
        let now = self.live.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
}

/// Freed activation buffers by length, reused by later ops of the same shapes (every layer
/// allocates the same sizes) instead of a driver allocation per op. Stream-ordered reuse: all
/// work is on one stream.
#[derive(Default)]
pub(super) struct Pool {
    free: Mutex<HashMap<usize, Vec<CudaSlice<f32>>>>,
    bytes: AtomicUsize,
}

/// At most this many bytes of freed activations are kept for reuse.
const POOL_MAX_BYTES: usize = 1 << 30;

impl Pool {
    pub(super) fn take(&self, n: usize) -> Option<CudaSlice<f32>> {
        let s = self.free.lock().unwrap().get_mut(&n)?.pop()?;
        self.bytes.fetch_sub(n * 4, Ordering::Relaxed);
        Some(s)
    }
    pub(super) fn give(&self, s: CudaSlice<f32>) {
        let b = s.len() * 4;
        if self.bytes.load(Ordering::Relaxed) + b <= POOL_MAX_BYTES {
            self.bytes.fetch_add(b, Ordering::Relaxed);
            self.free
                .lock()
                .unwrap()
                .entry(s.len())
                .or_default()
                .push(s);
        }
    }
    pub(super) fn clear(&self) {
        self.free.lock().unwrap().clear();
        self.bytes.store(0, Ordering::Relaxed);
    }
}

/// A device f32 buffer; its bytes count as activations while it lives.
pub struct DevBuf {
    data: Option<CudaSlice<f32>>,
    bytes: usize,
    stats: Arc<MemStats>,
    pool: Arc<Pool>,
}

impl DevBuf {
    pub(super) fn slice(&self) -> &CudaSlice<f32> {
        self.data.as_ref().expect("live buffer")
    }
    pub(super) fn slice_mut(&mut self) -> &mut CudaSlice<f32> {
        self.data.as_mut().expect("live buffer")
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        self.stats.live.fetch_sub(self.bytes, Ordering::Relaxed);
        if let Some(d) = self.data.take() {
            self.pool.give(d);
        }
    }
}

/// An activation: a row-major f32 [rows, cols] matrix on the device (immutable, cheap to clone).
#[derive(Clone)]
pub struct CudaTensor {
    pub(super) buf: Arc<DevBuf>,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl CudaTensor {
    pub(super) fn ptr(&self, stream: &CudaStream) -> u64 {
        self.buf.slice().device_ptr(stream).0
    }
    pub(super) fn len(&self) -> usize {
        self.rows * self.cols
    }
}

impl CudaBackend {
    /// Device memory: (weights cached now, peak weights cached, peak activations, bytes uploaded,
    /// device memory in use now (all processes), total).
    pub fn memory(&self) -> (usize, usize, usize, usize, usize, usize) {
        let s = &self.inner.stats;
        let (free, total) = self
            .inner
            .ctx
            .mem_get_info()
            .unwrap_or((0, self.inner.total_mem));
        (
            s.weights.load(Ordering::Relaxed),
            s.weights_peak.load(Ordering::Relaxed),
            s.peak.load(Ordering::Relaxed),
            s.uploaded.load(Ordering::Relaxed),
            total.saturating_sub(free),
            total,
        )
    }

    /// One line on device memory use, for the end of a run.
    pub fn memory_report(&self) -> String {
        let g = |b: usize| b as f64 / (1u64 << 30) as f64;
        let (_, wpeak, apeak, up, used, total) = self.memory();
        format!(
            "cuda memory: {} — weights on the device peaked at {:.2} GiB ({:.2} GiB uploaded), activations peaked at {:.2} GiB; {:.2} of {:.2} GiB in use now",
            self.inner.device_name,
            g(wpeak),
            g(up),
            g(apeak),
            g(used),
            g(total)
        )
    }

    pub(super) fn alloc(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        let n = (rows * cols).max(1);
        let data = match self.inner.pool.take(n) {
            Some(d) => d,
            None => unsafe { self.stream().alloc::<f32>(n) }.map_err(cu)?,
        };
        let bytes = n * 4;
        self.inner.stats.add(bytes);
        let t = CudaTensor {
            buf: Arc::new(DevBuf {
                data: Some(data),
                bytes,
                stats: self.inner.stats.clone(),
                pool: self.inner.pool.clone(),
            }),
            rows,
            cols,
        };
        if self.poison.load(Ordering::Relaxed) {
            launch!(self.inner, "fill_f32", grid1d(n); t.ptr(self.stream()), f32::NAN, n as i64);
        }
        Ok(t)
    }

    pub(super) fn scratch_u16(
        &self,
        n: usize,
    ) -> Result<std::sync::MutexGuard<'_, Option<CudaSlice<u16>>>> {
        let mut g = self.inner.scratch.lock().unwrap();
        if g.as_ref().map(|s| s.len() < n).unwrap_or(true) {
            *g = None;
            *g = Some(unsafe { self.stream().alloc::<u16>(n) }.map_err(cu)?);
        }
        Ok(g)
    }

    pub(super) fn upload_f32(&self, v: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        let t = self.alloc(rows, cols)?;
        if !v.is_empty() {
            let mut buf = Arc::into_inner(t.buf).expect("fresh buffer");
            self.stream().memcpy_htod(v, buf.slice_mut()).map_err(cu)?;
            return Ok(CudaTensor {
                buf: Arc::new(buf),
                rows,
                cols,
            });
        }
        Ok(t)
    }

    pub(super) fn op_upload(&self, x: &Tensor) -> Result<CudaTensor> {
        let (r, c) = match x.dims() {
            [r, c] => (*r, *c),
            [n] => (1, *n),
            d => (d[0], d[1..].iter().product()),
        };
        let x = x.to_dtype(candle_core::DType::F32)?;
        crate::model::backend::with_f32(&x, |v| self.upload_f32(v, r, c))?
    }

    pub(super) fn op_download(&self, x: &CudaTensor) -> Result<Tensor> {
        let v = if x.len() == 0 {
            vec![]
        } else {
            let mut v = self.stream().clone_dtoh(x.buf.slice()).map_err(cu)?;
            v.truncate(x.len());
            v
        };
        Ok(Tensor::from_vec(v, (x.rows, x.cols), &Device::Cpu)?)
    }
}

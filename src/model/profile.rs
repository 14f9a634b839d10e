//! `Profiled`: any backend with each call timed, for finding where a forward pass spends its
//! time (examples/cuda_bench.rs). Every op is bracketed by `Backend::sync`, so its time is its
//! own even on a backend that queues work (CUDA), at the price of one wait per op: a profiled
//! run is slower than a plain one. Nothing here prints; `report` hands back the figures.
use super::backend::{Backend, KvType};
use super::weights::WeightSource;
use crate::ground::error::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// The calls filed under one label.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// The op (or the road a backend names for it: `Backend::linear_label` and the like).
    pub name: String,
    pub calls: usize,
    /// Milliseconds the calls took to return (for a backend that queues work: to issue it).
    pub host_ms: f64,
    /// Milliseconds from each call until the backend had finished it (`sync` after the call).
    pub device_ms: f64,
}

/// `B` with every op timed (see the module docs). Same activations and weights as `B`.
pub struct Profiled<'a, B: Backend + ?Sized> {
    inner: &'a B,
    /// (label, host ms, ms until done) per call.
    calls: Mutex<Vec<(String, f64, f64)>>,
}

impl<'a, B: Backend + ?Sized> Profiled<'a, B> {
    pub fn new(inner: &'a B) -> Self {
        Profiled {
            inner,
            calls: Mutex::new(Vec::new()),
        }
    }

    /// The calls timed since the last report, summed per label, the most device time first.
    pub fn report(&self) -> Result<Vec<OpTime>> {
        self.inner.sync()?;
        let calls = std::mem::take(&mut *self.calls.lock().unwrap());
        let mut agg: HashMap<String, OpTime> = HashMap::new();
        for (name, host, done) in calls {
            let a = agg.entry(name.clone()).or_insert(OpTime {
                name,
                calls: 0,
                host_ms: 0.0,
                device_ms: 0.0,
            });
            a.calls += 1;
            a.host_ms += host;
            a.device_ms += done;
        }
        let mut v: Vec<OpTime> = agg.into_values().collect();
        v.sort_by(|a, b| b.device_ms.total_cmp(&a.device_ms));
        Ok(v)
    }

    /// Run one op between two `sync`s and file its times under `label`.
    fn timed<R>(&self, label: String, op: impl FnOnce() -> Result<R>) -> Result<R> {
        // Work queued before this op is not its time.
        self.inner.sync()?;
        let t0 = Instant::now();
        let r = op()?;
        let host = t0.elapsed().as_secs_f64() * 1e3;
        self.inner.sync()?;
        let done = t0.elapsed().as_secs_f64() * 1e3;
        self.calls.lock().unwrap().push((label, host, done));
        Ok(r)
    }
}

impl<B: Backend + ?Sized> Backend for Profiled<'_, B> {
    type T = B::T;
    type W = B::W;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn upload(&self, x: &Tensor) -> Result<B::T> {
        self.timed("upload".into(), || self.inner.upload(x))
    }
    fn download(&self, x: &B::T) -> Result<Tensor> {
        self.timed("download".into(), || self.inner.download(x))
    }
    fn dims(&self, x: &B::T) -> (usize, usize) {
        self.inner.dims(x)
    }
    fn weight(&self, ws: &dyn WeightSource, name: &str) -> Result<B::W> {
        self.timed("weight".into(), || self.inner.weight(ws, name))
    }
    fn weight_dims(&self, w: &B::W) -> (usize, usize) {
        self.inner.weight_dims(w)
    }
    fn param(&self, ws: &dyn WeightSource, name: &str) -> Result<B::T> {
        self.timed("param".into(), || self.inner.param(ws, name))
    }
    fn linear(&self, x: &B::T, w: &B::W, bias: Option<&B::T>) -> Result<B::T> {
        self.timed(self.inner.linear_label(x, w), || {
            self.inner.linear(x, w, bias)
        })
    }
    fn linear_from(
        &self,
        ws: &dyn WeightSource,
        name: &str,
        x: &B::T,
        bias: Option<&B::T>,
    ) -> Result<B::T> {
        self.timed(self.inner.linear_from_label(ws, name, x), || {
            self.inner.linear_from(ws, name, x, bias)
        })
    }
    fn attention(
        &self,
        q: &B::T,
        k: &B::T,
        v: &B::T,
        n_head: usize,
        n_head_kv: usize,
        causal: bool,
    ) -> Result<B::T> {
        self.timed(self.inner.attention_label(q, k, n_head), || {
            self.inner.attention(q, k, v, n_head, n_head_kv, causal)
        })
    }
    fn layer_norm(&self, x: &B::T, w: &B::T, b: &B::T, eps: f32) -> Result<B::T> {
        self.timed("layer_norm".into(), || self.inner.layer_norm(x, w, b, eps))
    }
    fn rms_norm(&self, x: &B::T, w: &B::T, eps: f32) -> Result<B::T> {
        self.timed("rms_norm".into(), || self.inner.rms_norm(x, w, eps))
    }
    fn softmax_groups(&self, x: &B::T, group: usize) -> Result<B::T> {
        self.timed("softmax_groups".into(), || {
            self.inner.softmax_groups(x, group)
        })
    }
    fn add(&self, a: &B::T, b: &B::T) -> Result<B::T> {
        self.timed("add".into(), || self.inner.add(a, b))
    }
    fn mul(&self, a: &B::T, b: &B::T) -> Result<B::T> {
        self.timed("mul".into(), || self.inner.mul(a, b))
    }
    fn quick_gelu(&self, x: &B::T) -> Result<B::T> {
        self.timed("quick_gelu".into(), || self.inner.quick_gelu(x))
    }
    fn gelu_erf(&self, x: &B::T) -> Result<B::T> {
        self.timed("gelu_erf".into(), || self.inner.gelu_erf(x))
    }
    fn silu_mul(&self, gate: &B::T, up: &B::T) -> Result<B::T> {
        self.timed("silu_mul".into(), || self.inner.silu_mul(gate, up))
    }
    fn rope_interleaved(&self, x: &B::T, n_head: usize, pos0: usize, theta: f32) -> Result<B::T> {
        self.timed("rope".into(), || {
            self.inner.rope_interleaved(x, n_head, pos0, theta)
        })
    }
    fn rope_neox(&self, x: &B::T, n_head: usize, pos0: usize, theta: f32) -> Result<B::T> {
        self.timed("rope".into(), || {
            self.inner.rope_neox(x, n_head, pos0, theta)
        })
    }
    fn msda(
        &self,
        value: &B::T,
        levels: &[(usize, usize)],
        offsets: &B::T,
        weights: &B::T,
        ref_grid: (usize, usize),
        n_heads: usize,
        n_points: usize,
    ) -> Result<B::T> {
        self.timed("msda".into(), || {
            self.inner
                .msda(value, levels, offsets, weights, ref_grid, n_heads, n_points)
        })
    }
    fn rows(&self, x: &B::T, start: usize, len: usize) -> Result<B::T> {
        self.timed("rows".into(), || self.inner.rows(x, start, len))
    }
    fn concat_rows(&self, xs: &[&B::T]) -> Result<B::T> {
        self.timed("concat_rows".into(), || self.inner.concat_rows(xs))
    }
    fn kv_append(&self, cache: Option<(B::T, usize)>, new: &B::T, ty: KvType) -> Result<B::T> {
        self.timed("kv_append".into(), || self.inner.kv_append(cache, new, ty))
    }
    fn kv_view(&self, cache: &B::T, used: usize) -> Result<B::T> {
        self.timed("kv_view".into(), || self.inner.kv_view(cache, used))
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn linear_label(&self, x: &B::T, w: &B::W) -> String {
        self.inner.linear_label(x, w)
    }
    fn linear_from_label(&self, ws: &dyn WeightSource, name: &str, x: &B::T) -> String {
        self.inner.linear_from_label(ws, name, x)
    }
    fn attention_label(&self, q: &B::T, k: &B::T, n_head: usize) -> String {
        self.inner.attention_label(q, k, n_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use candle_core::Device;

    /// The wrapper changes no result and files every call under its op.
    #[test]
    fn profiled_cpu_matches_and_counts() {
        let x =
            Tensor::from_vec(vec![1f32, -2.0, 3.0, 0.5, 4.0, -1.0], (2, 3), &Device::Cpu).unwrap();
        let p = Profiled::new(&CpuBackend);
        let xu = p.upload(&x).unwrap();
        let y = p.add(&p.quick_gelu(&xu).unwrap(), &xu).unwrap();
        let y = p.softmax_groups(&y, 3).unwrap();
        let want = CpuBackend
            .softmax_groups(
                &CpuBackend
                    .add(&CpuBackend.quick_gelu(&x).unwrap(), &x)
                    .unwrap(),
                3,
            )
            .unwrap();
        assert_eq!(
            p.download(&y).unwrap().to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        let rep = p.report().unwrap();
        let mut names: Vec<(&str, usize)> =
            rep.iter().map(|o| (o.name.as_str(), o.calls)).collect();
        names.sort();
        assert_eq!(
            names,
            [
                ("add", 1),
                ("download", 1),
                ("quick_gelu", 1),
                ("softmax_groups", 1),
                ("upload", 1)
            ]
        );
        assert!(rep.iter().all(|o| o.device_ms >= o.host_ms));
        assert!(p.report().unwrap().is_empty(), "a report starts afresh");
    }
}

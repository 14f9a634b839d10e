//! `attention`: for a few queries (decode) one kernel per (query, head) with the scores in shared
//! memory; otherwise cuBLAS strided-batched GEMMs for the scores and P.V (GQA without repeating
//! K/V) around a row-softmax kernel with the causal mask, on f32 or (`set_f16_attention`) f16.
use super::gemm::{self, Ty};
use super::linear::MATVEC_MAX_ROWS;
use super::memory::CudaTensor;
use super::{bad, cu, grid1d, rows_cfg, CudaBackend};
use crate::ground::error::Result;
use crate::model::backend::attention_head_dim;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Whether attention of `n` queries over `m` keys with head size `hd` runs as the one fused
/// kernel (few queries; scores and the query in at most 40 KiB of shared memory).
fn attention_in_one_kernel(n: usize, m: usize, hd: usize) -> bool {
    n <= MATVEC_MAX_ROWS && (m + hd) * 4 <= 40 * 1024
}

/// The road `op_attention` takes for q over k, for profiles.
pub(super) fn road(q: &CudaTensor, k: &CudaTensor, n_head: usize) -> &'static str {
    if attention_in_one_kernel(q.rows, k.rows, q.cols / n_head.max(1)) {
        "attention (few queries, one kernel)"
    } else {
        "attention (SGEMM, softmax, SGEMM)"
    }
}

impl CudaBackend {
    pub(super) fn op_attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        n_head: usize,
        n_head_kv: usize,
        causal: bool,
    ) -> Result<CudaTensor> {
        let (n, qc) = (q.rows, q.cols);
        let (m, kc) = (k.rows, k.cols);
        // Kept although the front checked it: the kernels and GEMMs index q, k and v by these
        // shapes (and it gives the head size).
        let hd = attention_head_dim(
            (n, qc),
            (m, kc),
            (v.rows, v.cols),
            n_head,
            n_head_kv,
            causal,
        )
        .map_err(bad)?;
        let out = self.alloc(n, qc)?;
        if n == 0 || hd == 0 {
            return Ok(out);
        }
        if m == 0 {
            let s = self.stream();
            let len = out.len();
            launch!(self.inner, "fill_f32", grid1d(len); out.ptr(s), 0.0f32, len as i64);
            return Ok(out);
        }
        let s = self.stream();
        let scale = 1.0f32 / (hd as f32).sqrt();
        // A few queries (decode): one fused kernel, scores in shared memory.
        if attention_in_one_kernel(n, m, hd) {
            let smem = (m + hd) * 4;
            let cfg = LaunchConfig {
                grid_dim: (n_head as u32, n as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            launch!(self.inner, "attn_small_f32", cfg;
                q.ptr(s), k.ptr(s), v.ptr(s), out.ptr(s), n as i32, m as i32,
                n_head as i32, n_head_kv as i32, hd as i32, causal as i32, scale);
            return Ok(out);
        }
        let sn = n_head * n * m;
        if sn > (1usize << 30) {
            return Err(bad(format!(
                "attention over {n} x {m} positions x {n_head} heads needs {} GiB of scores",
                (sn * 4) >> 30
            )));
        }
        let scores = self.alloc(1, sn)?;
        let sp = scores.ptr(s);
        let rep = n_head / n_head_kv;
        // f16 attention: Q, K, V and the probabilities rounded to f16 for tensor-core GEMMs
        // (f32 accumulation and softmax); otherwise SGEMMs on the f32 activations.
        let fast = self.f16_attention();
        let half = |t: &CudaTensor| -> Result<Option<CudaTensor>> {
            if !fast {
                return Ok(None);
            }
            let len = t.len();
            let h = self.alloc(1, len.div_ceil(2))?; // u16 plane in an f32 buffer
            launch!(self.inner, "split_f16", grid1d(len); t.ptr(s), h.ptr(s), len as i64, 1i32);
            Ok(Some(h))
        };
        let ty = if fast { Ty::F16 } else { Ty::F32 };
        let (qh, kh) = (half(q)?, half(k)?);
        let ptr = |h: &Option<CudaTensor>, t: &CudaTensor| h.as_ref().unwrap_or(t).ptr(s);
        for r in 0..rep {
            unsafe {
                gemm::run(
                    &self.inner.blas,
                    &gemm::attn_scores(n, m, n_head, n_head_kv, hd, r),
                    ptr(&kh, k),
                    ty,
                    ptr(&qh, q),
                    ty,
                    sp,
                    0.0,
                )
            }
            .map_err(bad)?;
        }
        drop((qh, kh));
        launch!(self.inner, "softmax_attn_f32", rows_cfg(n_head * n);
            sp, m as i32, n as i32, causal as i32, scale);
        let (ph, vh) = (half(&scores)?, half(v)?);
        for r in 0..rep {
            unsafe {
                gemm::run(
                    &self.inner.blas,
                    &gemm::attn_pv(n, m, n_head, n_head_kv, hd, r),
                    ptr(&vh, v),
                    ty,
                    ptr(&ph, &scores),
                    ty,
                    out.ptr(s),
                    0.0,
                )
            }
            .map_err(bad)?;
        }
        drop((ph, vh, scores));
        Ok(out)
    }
}

//! The other ops: norms, softmax over groups, element-wise kernels, rope, the fused deformable
//! attention core, and the row copies.
use super::memory::CudaTensor;
use super::{bad, cu, grid1d, i32_of, rows_cfg, CudaBackend};
use crate::ground::error::Result;
use crate::model::backend::{broadcast_shapes, msda_shapes, norm_param, same_shapes};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Mirrors `struct MsdaLevels` in kernels/msda.cu.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MsdaLevels {
    n: i32,
    start: [i32; 8],
    h: [i32; 8],
    w: [i32; 8],
}
unsafe impl DeviceRepr for MsdaLevels {}

/// (rows, cols) of an activation, for the shape rules.
fn dims(x: &CudaTensor) -> (usize, usize) {
    (x.rows, x.cols)
}

impl CudaBackend {
    /// `add` / `mul` (`op`) by the kernel `kernel`: b of a's shape or one row broadcast.
    pub(super) fn elementwise(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        op: &str,
        kernel: &str,
    ) -> Result<CudaTensor> {
        // Kept although the front checked it: the kernel reads b by a's shape.
        broadcast_shapes(op, dims(a), dims(b)).map_err(bad)?;
        let y = self.alloc(a.rows, a.cols)?;
        let n = a.len();
        if n > 0 {
            let s = self.stream();
            let bcast = (a.rows != b.rows) as i32;
            launch!(self.inner, kernel, grid1d(n);
                a.ptr(s), b.ptr(s), y.ptr(s), n as i64, a.cols as i32, bcast);
        }
        Ok(y)
    }

    /// An element-wise kernel of one input.
    pub(super) fn unary(&self, x: &CudaTensor, name: &str) -> Result<CudaTensor> {
        let y = self.alloc(x.rows, x.cols)?;
        let n = x.len();
        if n > 0 {
            let s = self.stream();
            launch!(self.inner, name, grid1d(n); x.ptr(s), y.ptr(s), n as i64);
        }
        Ok(y)
    }

    pub(super) fn op_layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        // Kept although the front checked them: the kernel reads w and b by x's width.
        norm_param("layer_norm weight", dims(x), dims(w)).map_err(bad)?;
        norm_param("layer_norm bias", dims(x), dims(b)).map_err(bad)?;
        let y = self.alloc(x.rows, x.cols)?;
        if x.len() > 0 {
            let s = self.stream();
            launch!(self.inner, "layer_norm_f32", rows_cfg(x.rows);
                x.ptr(s), w.ptr(s), b.ptr(s), y.ptr(s), x.cols as i32, eps);
        }
        Ok(y)
    }

    pub(super) fn op_rms_norm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        // Kept although the front checked it: the kernel reads w by x's width.
        norm_param("rms_norm weight", dims(x), dims(w)).map_err(bad)?;
        let y = self.alloc(x.rows, x.cols)?;
        if x.len() > 0 {
            let s = self.stream();
            launch!(self.inner, "rms_norm_f32", rows_cfg(x.rows);
                x.ptr(s), w.ptr(s), y.ptr(s), x.cols as i32, eps);
        }
        Ok(y)
    }

    /// Shapes checked by the front; the kernel stays within x whatever the group.
    pub(super) fn op_softmax_groups(&self, x: &CudaTensor, group: usize) -> Result<CudaTensor> {
        let y = self.alloc(x.rows, x.cols)?;
        let groups = x.len() / group;
        if groups > 0 {
            let s = self.stream();
            launch!(self.inner, "softmax_groups_f32", grid1d(groups);
                x.ptr(s), y.ptr(s), groups as i64, group as i32);
        }
        Ok(y)
    }

    pub(super) fn op_silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        // Kept although the front checked it: the kernel reads up by gate's length.
        same_shapes("silu_mul", dims(gate), dims(up)).map_err(bad)?;
        let y = self.alloc(gate.rows, gate.cols)?;
        let n = gate.len();
        if n > 0 {
            let s = self.stream();
            launch!(self.inner, "silu_mul_f32", grid1d(n); gate.ptr(s), up.ptr(s), y.ptr(s), n as i64);
        }
        Ok(y)
    }

    /// Either rope kernel (same arguments; `kernel` picks the pair layout). Shapes checked by
    /// the front; the kernel stays within x whatever the heads.
    pub(super) fn op_rope(
        &self,
        x: &CudaTensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
        kernel: &'static str,
    ) -> Result<CudaTensor> {
        let c = x.cols;
        let hd = c / n_head;
        let y = self.alloc(x.rows, c)?;
        let work = x.rows * hd / 2;
        if work > 0 {
            let s = self.stream();
            launch!(self.inner, kernel, grid1d(work);
                x.ptr(s), y.ptr(s), x.rows as i32, n_head as i32, hd as i32,
                i32_of(pos0, "rope position")?, theta);
        }
        Ok(y)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn op_msda(
        &self,
        value: &CudaTensor,
        levels: &[(usize, usize)],
        offsets: &CudaTensor,
        weights: &CudaTensor,
        ref_grid: (usize, usize),
        n_heads: usize,
        n_points: usize,
    ) -> Result<CudaTensor> {
        let c = value.cols;
        let nq = ref_grid.0 * ref_grid.1;
        let per_q = n_heads * levels.len() * n_points;
        // Kept although the front checked it: the kernel samples value, offsets and weights by
        // these shapes.
        msda_shapes(
            dims(value),
            levels,
            dims(offsets),
            dims(weights),
            ref_grid,
            n_heads,
            n_points,
        )
        .map_err(bad)?;
        // The kernel's own limits (MsdaLevels holds 8 levels; the samples sit in shared memory).
        if levels.len() > 8 {
            return Err(bad(format!("msda: {} levels (at most 8)", levels.len())));
        }
        let smem = per_q * 8 * 4;
        if smem > 48 * 1024 {
            return Err(bad(format!(
                "msda: {per_q} samples per query (at most 1536)"
            )));
        }
        let mut lv = MsdaLevels {
            n: levels.len() as i32,
            ..Default::default()
        };
        let mut start = 0usize;
        for (i, &(h, w)) in levels.iter().enumerate() {
            lv.start[i] = i32_of(start, "level start")?;
            lv.h[i] = i32_of(h, "level height")?;
            lv.w[i] = i32_of(w, "level width")?;
            start += h * w;
        }
        let out = self.alloc(nq, c)?;
        if nq == 0 || c == 0 {
            return Ok(out);
        }
        let s = self.stream();
        let cfg = LaunchConfig {
            grid_dim: (nq as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        launch!(self.inner, "msda_f32", cfg;
            value.ptr(s), offsets.ptr(s), weights.ptr(s), out.ptr(s), lv,
            ref_grid.0 as i32, ref_grid.1 as i32, n_heads as i32, n_points as i32, c as i32);
        Ok(out)
    }

    /// Range checked by the front; the copy's slices are bounds-checked (a panic, not a wild read).
    pub(super) fn op_rows(&self, x: &CudaTensor, start: usize, len: usize) -> Result<CudaTensor> {
        let y = self.alloc(len, x.cols)?;
        if len * x.cols > 0 {
            let mut buf = Arc::into_inner(y.buf).expect("fresh buffer");
            let src = x.buf.slice().slice(start * x.cols..(start + len) * x.cols);
            self.stream()
                .memcpy_dtod(&src, &mut buf.slice_mut().slice_mut(0..len * x.cols))
                .map_err(cu)?;
            return Ok(CudaTensor {
                buf: Arc::new(buf),
                rows: len,
                cols: x.cols,
            });
        }
        Ok(y)
    }

    /// Widths checked by the front; the copies' slices are bounds-checked (a panic, not a wild
    /// write).
    pub(super) fn op_concat_rows(&self, xs: &[&CudaTensor]) -> Result<CudaTensor> {
        let cols = xs.first().map_or(0, |x| x.cols);
        let rows: usize = xs.iter().map(|x| x.rows).sum();
        let y = self.alloc(rows, cols)?;
        let mut buf = Arc::into_inner(y.buf).expect("fresh buffer");
        let mut off = 0;
        for x in xs {
            let n = x.len();
            if n > 0 {
                self.stream()
                    .memcpy_dtod(
                        &x.buf.slice().slice(0..n),
                        &mut buf.slice_mut().slice_mut(off..off + n),
                    )
                    .map_err(cu)?;
            }
            off += n;
        }
        Ok(CudaTensor {
            buf: Arc::new(buf),
            rows,
            cols,
        })
    }
}

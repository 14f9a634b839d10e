//! `linear`: up to `MATVEC_MAX_ROWS` rows by mat-vec kernels reading the stored blocks, more by
//! cuBLAS (SGEMM for F32 weights, tensor-core GEMMs on f16 / bf16 activation planes otherwise,
//! quantized weights dequantized to f16 one chunk of rows at a time).
use super::gemm::{self, Ty};
use super::memory::CudaTensor;
use super::weights::DevWeight;
use super::{bad, cu, grid1d, i32_of, CudaBackend, GemmMode};
use crate::ground::dtype::GgmlType;
use crate::ground::error::Result;
use crate::model::backend::linear_shapes;
use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

/// Rows handled by the mat-vec kernels (MAXN in kernels/quant.cu); more go to cuBLAS.
pub(super) const MATVEC_MAX_ROWS: usize = 8;
/// f16 elements of dequantized weight per cuBLAS call (64 MiB of scratch).
const DEQUANT_CHUNK_ELEMS: usize = 32 << 20;

impl CudaBackend {
    /// The weight as a raw device pointer plus its element type for cuBLAS (float types).
    fn gemm_ty(ty: GgmlType) -> Option<Ty> {
        match ty {
            GgmlType::F32 => Some(Ty::F32),
            GgmlType::F16 => Some(Ty::F16),
            GgmlType::BF16 => Some(Ty::BF16),
            _ => None,
        }
    }

    fn matvec(
        &self,
        x: &CudaTensor,
        w: &DevWeight,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let s = self.stream();
        let y = self.alloc(x.rows, w.rows)?;
        let threads = 256usize;
        // One token: the kernels built for one accumulator (fewer registers, more warps).
        let one = x.rows == 1;
        let rows_per_warp = match (w.ty, one) {
            (GgmlType::Q4K, true) => self.q4k_rows_per_warp() as usize,
            _ => 1,
        };
        let cfg = LaunchConfig {
            grid_dim: (
                (w.rows.div_ceil(rows_per_warp) * 32).div_ceil(threads) as u32,
                1,
                1,
            ),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let wp = w.data.device_ptr(s).0;
        let bp = bias.map(|b| b.ptr(s)).unwrap_or(0);
        let (rows, cols, n) = (
            i32_of(w.rows, "rows")?,
            i32_of(w.cols, "cols")?,
            x.rows as i32,
        );
        let rb = w.row_bytes as i64;
        let q = match (w.ty, one) {
            (GgmlType::Q8_0, false) => Some("mv_q8_0"),
            (GgmlType::Q4_0, false) => Some("mv_q4_0"),
            (GgmlType::Q4K, false) => Some("mv_q4_k"),
            (GgmlType::Q6K, false) => Some("mv_q6_k"),
            (GgmlType::Q8_0, true) => Some("mv1_q8_0"),
            (GgmlType::Q4_0, true) => Some("mv1_q4_0"),
            (GgmlType::Q4K, true) => Some(match rows_per_warp {
                1 => "mv1_q4_k",
                2 => "mv1_q4_k_r2",
                _ => "mv1_q4_k_r4",
            }),
            (GgmlType::Q6K, true) => Some("mv1_q6_k"),
            _ => None,
        };
        if let Some(k) = q {
            launch!(self.inner, k, cfg; wp, x.ptr(s), bp, y.ptr(s), rows, cols, n, rb);
        } else {
            let ty: i32 = match w.ty {
                GgmlType::F32 => 0,
                GgmlType::F16 => 1,
                _ => 2,
            };
            launch!(self.inner, "mv_float", cfg; wp, x.ptr(s), bp, y.ptr(s), rows, cols, n, rb, ty);
        }
        Ok(y)
    }

    fn gemm_linear(
        &self,
        x: &CudaTensor,
        w: &DevWeight,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let s = self.stream();
        let (n, out, inp) = (x.rows, w.rows, w.cols);
        let y = self.alloc(n, out)?;
        let wp = w.data.device_ptr(s).0;
        let bp = bias.map(|b| b.ptr(s)).unwrap_or(0);
        let exact = self.gemm_mode() == GemmMode::Exact;
        if w.ty == GgmlType::F32 {
            unsafe {
                gemm::run(
                    &self.inner.blas,
                    &gemm::linear(n, out, inp),
                    wp,
                    Ty::F32,
                    x.ptr(s),
                    Ty::F32,
                    y.ptr(s),
                    0.0,
                )
            }
            .map_err(bad)?;
            if bias.is_some() {
                let len = n * out;
                launch!(self.inner, "add_bias_f32", grid1d(len); y.ptr(s), bp, len as i64, out as i32);
            }
            return Ok(y);
        }
        // Activation planes for the tensor cores.
        let (plane_ty, parts, split) = match w.ty {
            GgmlType::BF16 => (Ty::BF16, if exact { 3 } else { 1 }, "split_bf16"),
            GgmlType::F16 => (Ty::F16, if exact { 2 } else { 1 }, "split_f16"),
            _ => (Ty::F16, 1, "split_f16"),
        };
        let xn = n * inp;
        // Temporaries come from the activation pool (u16 planes in an f32 buffer of half the
        // length): no driver allocation per call.
        let planes = self.alloc(1, (parts * xn).div_ceil(2))?;
        let pp = planes.ptr(s);
        launch!(self.inner, split, grid1d(xn); x.ptr(s), pp, xn as i64, parts as i32);
        // Products of every plane: [parts*n, out] f32, or y itself for one plane.
        let yp_buf = if parts > 1 {
            Some(self.alloc(parts * n, out)?)
        } else {
            None
        };
        let yp = yp_buf
            .as_ref()
            .map(|b| b.ptr(s))
            .unwrap_or_else(|| y.ptr(s));
        let pn = parts * n;
        if let Some(wt) = Self::gemm_ty(w.ty) {
            unsafe {
                gemm::run(
                    &self.inner.blas,
                    &gemm::linear(pn, out, inp),
                    wp,
                    wt,
                    pp,
                    plane_ty,
                    yp,
                    0.0,
                )
            }
            .map_err(bad)?;
        } else {
            let dq = match w.ty {
                GgmlType::Q8_0 => "dq_q8_0",
                GgmlType::Q4_0 => "dq_q4_0",
                GgmlType::Q4K => "dq_q4_k",
                GgmlType::Q6K => "dq_q6_k",
                t => return Err(bad(format!("no dequantization kernel for {t}"))),
            };
            let chunk = ((DEQUANT_CHUNK_ELEMS / inp.max(1)) / 64 * 64)
                .max(64)
                .min(out);
            let scratch = self.scratch_u16(chunk * inp)?;
            let sp = scratch.as_ref().expect("allocated").device_ptr(s).0;
            let mut r0 = 0;
            while r0 < out {
                let rows = chunk.min(out - r0);
                let units = rows * inp / 32;
                let src = wp + (r0 * w.row_bytes) as u64;
                launch!(self.inner, dq, grid1d(units); src, sp, units as i64);
                unsafe {
                    gemm::run(
                        &self.inner.blas,
                        &gemm::linear_rows(pn, out, inp, r0, rows),
                        sp,
                        Ty::F16,
                        pp,
                        plane_ty,
                        yp,
                        0.0,
                    )
                }
                .map_err(bad)?;
                r0 += rows;
            }
        }
        let len = n * out;
        if parts > 1 {
            launch!(self.inner, "combine_parts", grid1d(len);
                yp, bp, y.ptr(s), len as i64, out as i32, parts as i32);
        } else if bias.is_some() {
            launch!(self.inner, "add_bias_f32", grid1d(len); y.ptr(s), bp, len as i64, out as i32);
        }
        drop(planes);
        drop(yp_buf);
        Ok(y)
    }

    pub(super) fn op_linear(
        &self,
        x: &CudaTensor,
        w: &DevWeight,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        // Kept although the front checked it: the kernels read x by the weight's width and the
        // bias by its height, so a wrong shape would read past a device buffer.
        linear_shapes(
            (x.rows, x.cols),
            (w.rows, w.cols),
            bias.map(|b| (b.rows, b.cols)),
        )
        .map_err(bad)?;
        if x.rows == 0 || w.rows == 0 {
            return self.alloc(x.rows, w.rows);
        }
        if x.rows <= MATVEC_MAX_ROWS {
            self.matvec(x, w, bias)
        } else {
            self.gemm_linear(x, w, bias)
        }
    }

    /// The road `op_linear` takes for x and w, for profiles.
    pub(super) fn linear_road(&self, x: &CudaTensor, w: &DevWeight) -> String {
        if x.rows <= MATVEC_MAX_ROWS {
            format!("linear mat-vec {}", w.ty)
        } else if w.ty.is_quantized() {
            format!("linear dequant {} + f16 GEMM", w.ty)
        } else {
            format!("linear GEMM {} {:?}", w.ty, self.gemm_mode())
        }
    }
}

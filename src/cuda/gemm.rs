//! GEMM shapes for cuBLAS (column-major) derived from the backend's row-major activations, as
//! plain descriptors: the mapping is unit-tested on the CPU against a reference column-major
//! GEMM (no GPU needed), and `run` hands a descriptor to cublasGemmStridedBatchedEx.
//!
//! A row-major [r, c] matrix with row stride ld is, to cuBLAS, the column-major [c, r] matrix
//! with leading dimension ld. So for y[n, out] = x[n, in] . w[out, in]^T we ask for
//! y^T[out, n] = op_T(w)[out, in] . x^T[in, n] ("TN").
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::cublas::CudaBlas;

/// C[c_off + i*sc + r + col*ldc] = sum_p op(A)[r, p] * op(B)[p, col] for batch i (column-major),
/// op(A)[r, p] = A[a_off + i*sa + (ta ? p + r*lda : r + p*lda)], likewise B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmDesc {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub a_off: usize,
    pub b_off: usize,
    pub c_off: usize,
    pub sa: usize,
    pub sb: usize,
    pub sc: usize,
    pub batch: usize,
}

/// y[n, out] = x[n, inp] . w[out, inp]^T: A = w, B = x, C = y.
pub fn linear(n: usize, out: usize, inp: usize) -> GemmDesc {
    GemmDesc {
        ta: true,
        tb: false,
        m: out,
        n,
        k: inp,
        lda: inp,
        ldb: inp,
        ldc: out,
        a_off: 0,
        b_off: 0,
        c_off: 0,
        sa: 0,
        sb: 0,
        sc: 0,
        batch: 1,
    }
}

/// Rows r0..r0+rows of the weight only (the weight pointer already starts at row r0): writes
/// columns r0.. of y.
pub fn linear_rows(n: usize, out: usize, inp: usize, r0: usize, rows: usize) -> GemmDesc {
    GemmDesc {
        m: rows,
        c_off: r0,
        ..linear(n, out, inp)
    }
}

/// Attention scores for query heads h = g*rep + r (g over the kv heads, one batch each):
/// S[h] [n, m] = Q_h [n, hd] . K_g [m, hd]^T, with q [n, n_head*hd], k [m, n_kv*hd] row-major and
/// S [n_head, n, m]. A = k, B = q, C = S.
pub fn attn_scores(
    n: usize,
    m: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    r: usize,
) -> GemmDesc {
    let rep = n_head / n_kv;
    GemmDesc {
        ta: true,
        tb: false,
        m,
        n,
        k: hd,
        lda: n_kv * hd,
        ldb: n_head * hd,
        ldc: m,
        a_off: 0,
        b_off: r * hd,
        c_off: r * n * m,
        sa: hd,
        sb: rep * hd,
        sc: rep * n * m,
        batch: n_kv,
    }
}

/// O_h [n, hd] = P_h [n, m] . V_g [m, hd] into out [n, n_head*hd]. A = v, B = P (= S), C = out.
pub fn attn_pv(n: usize, m: usize, n_head: usize, n_kv: usize, hd: usize, r: usize) -> GemmDesc {
    let rep = n_head / n_kv;
    GemmDesc {
        ta: false,
        tb: false,
        m: hd,
        n,
        k: m,
        lda: n_kv * hd,
        ldb: m,
        ldc: n_head * hd,
        a_off: 0,
        b_off: r * n * m,
        c_off: r * hd,
        sa: hd,
        sb: rep * n * m,
        sc: rep * hd,
        batch: n_kv,
    }
}

/// Element type of a GEMM operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    F32,
    F16,
    BF16,
}

impl Ty {
    fn cuda(self) -> cudaDataType_t {
        match self {
            Ty::F32 => cudaDataType_t::CUDA_R_32F,
            Ty::F16 => cudaDataType_t::CUDA_R_16F,
            Ty::BF16 => cudaDataType_t::CUDA_R_16BF,
        }
    }
    pub fn size(self) -> usize {
        match self {
            Ty::F32 => 4,
            _ => 2,
        }
    }
}

/// Run a descriptor: A and B of types `at`/`bt`, C f32, f32 accumulation (CUBLAS_COMPUTE_32F:
/// for f32 operands this is plain SGEMM, no TF32). Pointers are raw device addresses of the
/// operands' first elements; offsets in the descriptor are in elements.
///
/// # Safety
/// The pointers must be live device allocations on the handle's stream, large enough for the
/// descriptor.
#[allow(clippy::too_many_arguments)]
pub unsafe fn run(
    blas: &CudaBlas,
    d: &GemmDesc,
    a: u64,
    at: Ty,
    b: u64,
    bt: Ty,
    c: u64,
    beta: f32,
) -> Result<(), String> {
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let alpha = 1.0f32;
    let i32c = |v: usize, what: &str| -> Result<i32, String> {
        i32::try_from(v).map_err(|_| format!("gemm: {what} = {v} does not fit cuBLAS's int"))
    };
    let a_ptr = a + (d.a_off * at.size()) as u64;
    let b_ptr = b + (d.b_off * bt.size()) as u64;
    let c_ptr = c + (d.c_off * 4) as u64;
    if d.batch == 1 {
        return cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(d.ta),
            op(d.tb),
            i32c(d.m, "m")?,
            i32c(d.n, "n")?,
            i32c(d.k, "k")?,
            &alpha as *const f32 as *const _,
            a_ptr as *const _,
            at.cuda(),
            i32c(d.lda, "lda")?,
            b_ptr as *const _,
            bt.cuda(),
            i32c(d.ldb, "ldb")?,
            &beta as *const f32 as *const _,
            c_ptr as *mut _,
            cudaDataType_t::CUDA_R_32F,
            i32c(d.ldc, "ldc")?,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| format!("cuBLAS gemm {d:?}: {e:?}"));
    }
    cudarc::cublas::result::gemm_strided_batched_ex(
        *blas.handle(),
        op(d.ta),
        op(d.tb),
        i32c(d.m, "m")?,
        i32c(d.n, "n")?,
        i32c(d.k, "k")?,
        &alpha as *const f32 as *const _,
        a_ptr as *const _,
        at.cuda(),
        i32c(d.lda, "lda")?,
        d.sa as i64,
        b_ptr as *const _,
        bt.cuda(),
        i32c(d.ldb, "ldb")?,
        d.sb as i64,
        &beta as *const f32 as *const _,
        c_ptr as *mut _,
        cudaDataType_t::CUDA_R_32F,
        i32c(d.ldc, "ldc")?,
        d.sc as i64,
        i32c(d.batch, "batch")?,
        cublasComputeType_t::CUBLAS_COMPUTE_32F,
        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(|e| format!("cuBLAS gemm {d:?}: {e:?}"))
}

/// The descriptor's semantics on the CPU (f64 accumulation), for tests.
pub fn reference(d: &GemmDesc, a: &[f32], b: &[f32], c: &mut [f32]) {
    for i in 0..d.batch {
        for col in 0..d.n {
            for r in 0..d.m {
                let mut s = 0f64;
                for p in 0..d.k {
                    let ai = d.a_off + i * d.sa + if d.ta { p + r * d.lda } else { r + p * d.lda };
                    let bi = d.b_off
                        + i * d.sb
                        + if d.tb {
                            col + p * d.ldb
                        } else {
                            p + col * d.ldb
                        };
                    s += a[ai] as f64 * b[bi] as f64;
                }
                c[d.c_off + i * d.sc + r + col * d.ldc] = s as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cpu::CpuBackend, model::backend::Backend};
    use candle_core::{Device, Tensor};

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
    fn t(v: &[f32], r: usize, c: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu).unwrap()
    }
    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{i}: {x} vs {y}");
        }
    }

    #[test]
    fn linear_descriptor_matches_cpu_linear() {
        let (n, out, inp) = (5, 7, 9);
        let x = rnd(n * inp, 1);
        let w = rnd(out * inp, 2);
        let want = CpuBackend
            .linear(&t(&x, n, inp), &t(&w, out, inp), None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut y = vec![f32::NAN; n * out];
        reference(&linear(n, out, inp), &w, &x, &mut y);
        close(&y, &want);
        // In two row chunks of the weight.
        let mut y2 = vec![f32::NAN; n * out];
        for (r0, rows) in [(0, 4), (4, 3)] {
            reference(
                &linear_rows(n, out, inp, r0, rows),
                &w[r0 * inp..],
                &x,
                &mut y2,
            );
        }
        close(&y2, &want);
    }

    /// Scores, causal softmax (done here on the CPU) and P.V through the descriptors equal the
    /// CPU backend's attention, with GQA.
    #[test]
    fn attention_descriptors_match_cpu_attention() {
        for (n, m, nh, nkv, hd, causal) in [
            (4, 6, 4, 2, 3, true),
            (5, 5, 3, 3, 4, false),
            (1, 7, 8, 2, 2, true),
        ] {
            let q = rnd(n * nh * hd, 3);
            let k = rnd(m * nkv * hd, 4);
            let v = rnd(m * nkv * hd, 5);
            let want = CpuBackend
                .attention(
                    &t(&q, n, nh * hd),
                    &t(&k, m, nkv * hd),
                    &t(&v, m, nkv * hd),
                    nh,
                    nkv,
                    causal,
                )
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut s = vec![f32::NAN; nh * n * m];
            for r in 0..nh / nkv {
                reference(&attn_scores(n, m, nh, nkv, hd, r), &k, &q, &mut s);
            }
            let scale = 1.0 / (hd as f32).sqrt();
            for (row, sr) in s.chunks_mut(m).enumerate() {
                let valid = if causal { m - n + row % n + 1 } else { m };
                let mx = sr[..valid]
                    .iter()
                    .map(|a| a * scale)
                    .fold(f32::NEG_INFINITY, f32::max);
                let z: f64 = sr[..valid]
                    .iter()
                    .map(|a| ((a * scale - mx) as f64).exp())
                    .sum();
                for (j, a) in sr.iter_mut().enumerate() {
                    *a = if j < valid {
                        (((*a * scale - mx) as f64).exp() / z) as f32
                    } else {
                        0.0
                    };
                }
            }
            let mut o = vec![f32::NAN; n * nh * hd];
            for r in 0..nh / nkv {
                reference(&attn_pv(n, m, nh, nkv, hd, r), &v, &s, &mut o);
            }
            close(&o, &want);
        }
    }
}

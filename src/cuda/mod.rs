//! The CUDA backend: `model::backend::Backend` on an NVIDIA GPU, with the kernels of `kernels/*.cu`
//! compiled at run time by NVRTC (`kernels`), cuBLAS for the large matrix products (`gemm`), and
//! no CUDA toolkit at build time (cudarc with `dynamic-loading`: libcuda, libnvrtc and libcublas
//! are dlopen'ed when a backend is opened, and their absence is an `Err`, never a panic).
//!
//! Numerics (the CPU backend is the reference):
//! - activations are f32 row-major matrices on the device; norms and softmaxes use f64
//!   statistics like the CPU ops; the deformable-attention core is one fused kernel with the CPU
//!   op's arithmetic in the same order;
//! - weights stay on the device in their stored type (the GGUF / safetensors bytes: F32, F16,
//!   BF16, Q8_0, Q4_0, Q4_K, Q6_K; other block types are dequantized to F32 on the host first),
//!   uploaded once when the model first asks for them and cached by (origin, name);
//! - `linear` with at most 8 rows runs mat-vec kernels that read the stored blocks directly, in
//!   f32; larger batches go to cuBLAS: F32 weights by SGEMM, F16/BF16 weights by a tensor-core
//!   GEMM with f32 accumulation, quantized weights dequantized to f16 one chunk of rows at a time
//!   (never a whole f16 copy of the model). With `GemmMode::Exact` (the default) the f32
//!   activations meeting F16 / BF16 weights are split into 2 f16 (3 bf16) planes, so the
//!   tensor-core product is as exact as f32 inputs; `GemmMode::Fast` rounds them to one plane.
//!   Quantized weights always take one f16 activation plane: their f16 dequantization already
//!   rounds each weight to 2^-11, so a second plane would cost a second GEMM and buy nothing
//!   (measured on random data: 2.0e-4 vs 2.8e-4 relative error, tests/cuda_gpu.rs);
//! - attention: cuBLAS strided-batched SGEMMs for the scores and P.V (GQA without repeating
//!   K/V), a row-softmax kernel with the causal mask in between (`set_f16_attention`, off by
//!   default until measured on a GPU: the same GEMMs on the tensor cores with Q, K, V and the
//!   probabilities rounded to f16); for at most 8 queries (decode)
//!   one kernel per (query, head) with the scores in shared memory.
//!
//! Files by job: `open` (library probing, opening the device, loading the kernels), `memory`
//! (activation buffers, their pool, the memory report), `weights` (the device weight cache),
//! `linear` (mat-vec kernels and cuBLAS GEMMs), `attention`, `ops` (norms, element-wise, rope,
//! deformable attention, rows); this file holds the backend and its one `impl Backend`.
//! Shapes are checked by the model's front (`model::backend::Checked`); an op keeps a guard
//! only where its kernel would otherwise read past a buffer.
pub mod gemm;
pub mod kernels;

use crate::ground::error::{Error, Result};
use crate::model::backend::Backend;
use crate::model::weights::WeightSource;
use candle_core::Tensor;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig};
use memory::{MemStats, Pool};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// How `linear` feeds f32 activations to the tensor cores for F16 / BF16 weights (see the
/// module docs; quantized weights always use one f16 plane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmMode {
    /// Activations split into 2 f16 / 3 bf16 planes: f32-exact inputs (the default).
    Exact,
    /// Activations rounded to one f16 / bf16 plane (what llama.cpp's cuBLAS path does).
    Fast,
}

fn cu<E: std::fmt::Debug>(e: E) -> Error {
    Error::other(format!("cuda: {e:?}"))
}

fn bad(msg: impl Into<String>) -> Error {
    Error::other(format!("cuda backend: {}", msg.into()))
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    device_name: String,
    arch: &'static str,
    total_mem: usize,
    compile_note: String,
    stats: Arc<MemStats>,
    scratch: Mutex<Option<CudaSlice<u16>>>,
    pool: Arc<Pool>,
}

impl Inner {
    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| bad(format!("kernel {name} is not loaded")))
    }
}

/// Launch a kernel: `launch!(inner, "name", cfg; arg, arg, ...)`. Every argument is bound to a
/// local before the launch builder borrows it.
macro_rules! launch {
    ($inner:expr, $name:expr, $cfg:expr; $($arg:expr),+ $(,)?) => {
        launch!(@go $inner, $name, $cfg; []; $($arg),+)
    };
    (@go $inner:expr, $name:expr, $cfg:expr; [$($bound:ident),*]; ) => {{
        let f = $inner.func($name)?;
        let mut b = $inner.stream.launch_builder(f);
        $( b.arg(&$bound); )*
        unsafe { b.launch($cfg) }.map_err(cu)?;
    }};
    (@go $inner:expr, $name:expr, $cfg:expr; [$($bound:ident),*]; $head:expr $(, $rest:expr)*) => {{
        let arg = $head;
        launch!(@go $inner, $name, $cfg; [$($bound,)* arg]; $($rest),*)
    }};
}

fn grid1d(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| bad(format!("{what} = {v} is too large")))
}

mod attention;
mod linear;
mod memory;
mod open;
mod ops;
mod weights;

pub use memory::{CudaTensor, DevBuf};
pub use open::probe_libraries;
pub use weights::DevWeight;

/// The CUDA backend. One per process is enough; `clear_weights` drops the cached weights of a
/// model (verify does that between the source and the artefact).
pub struct CudaBackend {
    inner: Arc<Inner>,
    weights: Mutex<HashMap<String, Arc<DevWeight>>>,
    params: Mutex<HashMap<String, CudaTensor>>,
    mode: AtomicU8,
    /// Weight rows per warp of the one-token Q4_K mat-vec: 1, 2 or 4 (`set_q4k_rows_per_warp`).
    q4k_rows: AtomicU8,
    /// Attention GEMMs on f16 inputs (`set_f16_attention`).
    f16_attention: AtomicBool,
    poison: AtomicBool,
}

impl CudaBackend {
    /// "NVIDIA H200 (sm_90, 140.4 GiB)".
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, {:.1} GiB)",
            self.inner.device_name,
            self.inner.arch,
            self.inner.total_mem as f64 / (1u64 << 30) as f64
        )
    }

    /// How the kernels were obtained (compiled now or from the PTX cache).
    pub fn compile_note(&self) -> &str {
        &self.inner.compile_note
    }

    pub fn gemm_mode(&self) -> GemmMode {
        if self.mode.load(Ordering::Relaxed) == GemmMode::Fast as u8 {
            GemmMode::Fast
        } else {
            GemmMode::Exact
        }
    }

    pub fn set_gemm_mode(&self, m: GemmMode) {
        self.mode.store(m as u8, Ordering::Relaxed);
    }

    /// Weight rows per warp in the one-token Q4_K mat-vec (1, 2 or 4; others round down to
    /// one of those): several rows share each lane's activation reads. Same sums either way.
    /// 1 (the kernel measured on a GPU) unless MMFUSER_CUDA_Q4K_ROWS=2|4: the others are
    /// built and tested by tests/cuda_gpu.rs but have not run on a GPU yet.
    pub fn set_q4k_rows_per_warp(&self, r: u8) {
        let r = match r {
            0 | 1 => 1,
            2 | 3 => 2,
            _ => 4,
        };
        self.q4k_rows.store(r, Ordering::Relaxed);
    }

    pub fn q4k_rows_per_warp(&self) -> u8 {
        self.q4k_rows.load(Ordering::Relaxed)
    }

    /// Attention's two GEMMs on the tensor cores with Q, K, V and the probabilities rounded to
    /// f16 (f32 accumulation and softmax), instead of f32 SGEMMs. Off unless
    /// MMFUSER_CUDA_ATTN=f16: tested by tests/cuda_gpu.rs, not yet run on a GPU.
    pub fn set_f16_attention(&self, on: bool) {
        self.f16_attention.store(on, Ordering::Relaxed);
    }

    pub fn f16_attention(&self) -> bool {
        self.f16_attention.load(Ordering::Relaxed)
    }

    /// Fill every new activation with NaN before an op writes it (tests: an element an op fails
    /// to write shows up as NaN).
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Wait for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(cu)
    }

    /// The one stream every op is queued on.
    fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }
}

/// Each op is written once, in the file of its job; these are the entries.
impl Backend for CudaBackend {
    type T = CudaTensor;
    type W = Arc<DevWeight>;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn upload(&self, x: &Tensor) -> Result<CudaTensor> {
        self.op_upload(x)
    }
    fn download(&self, x: &CudaTensor) -> Result<Tensor> {
        self.op_download(x)
    }
    fn dims(&self, x: &CudaTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }
    fn weight(&self, ws: &dyn WeightSource, name: &str) -> Result<Arc<DevWeight>> {
        self.device_weight(ws, name)
    }
    fn weight_dims(&self, w: &Arc<DevWeight>) -> (usize, usize) {
        (w.rows, w.cols)
    }
    fn param(&self, ws: &dyn WeightSource, name: &str) -> Result<CudaTensor> {
        self.op_param(ws, name)
    }
    fn linear(
        &self,
        x: &CudaTensor,
        w: &Arc<DevWeight>,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        self.op_linear(x, w, bias)
    }
    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        n_head: usize,
        n_head_kv: usize,
        causal: bool,
    ) -> Result<CudaTensor> {
        self.op_attention(q, k, v, n_head, n_head_kv, causal)
    }
    fn layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        self.op_layer_norm(x, w, b, eps)
    }
    fn rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        self.op_rms_norm(x, w, eps)
    }
    fn softmax_groups(&self, x: &CudaTensor, group: usize) -> Result<CudaTensor> {
        self.op_softmax_groups(x, group)
    }
    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.elementwise(a, b, "add", "add_f32")
    }
    fn mul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.elementwise(a, b, "mul", "mul_f32")
    }
    fn quick_gelu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary(x, "quick_gelu_f32")
    }
    fn gelu_erf(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary(x, "gelu_erf_f32")
    }
    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        self.op_silu_mul(gate, up)
    }
    fn rope_interleaved(
        &self,
        x: &CudaTensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<CudaTensor> {
        self.op_rope(x, n_head, pos0, theta, "rope_interleaved_f32")
    }
    fn rope_neox(
        &self,
        x: &CudaTensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<CudaTensor> {
        self.op_rope(x, n_head, pos0, theta, "rope_neox_f32")
    }
    fn msda(
        &self,
        value: &CudaTensor,
        levels: &[(usize, usize)],
        offsets: &CudaTensor,
        weights: &CudaTensor,
        ref_grid: (usize, usize),
        n_heads: usize,
        n_points: usize,
    ) -> Result<CudaTensor> {
        self.op_msda(value, levels, offsets, weights, ref_grid, n_heads, n_points)
    }
    fn rows(&self, x: &CudaTensor, start: usize, len: usize) -> Result<CudaTensor> {
        self.op_rows(x, start, len)
    }
    fn concat_rows(&self, xs: &[&CudaTensor]) -> Result<CudaTensor> {
        self.op_concat_rows(xs)
    }
    fn sync(&self) -> Result<()> {
        self.synchronize()
    }
    fn linear_label(&self, x: &CudaTensor, w: &Arc<DevWeight>) -> String {
        self.linear_road(x, w)
    }
    fn linear_from_label(&self, ws: &dyn WeightSource, name: &str, x: &CudaTensor) -> String {
        match self.cached_weight(ws, name) {
            Some(w) => self.linear_road(x, &w),
            None => "linear (weight upload first)".into(),
        }
    }
    fn attention_label(&self, q: &CudaTensor, k: &CudaTensor, n_head: usize) -> String {
        attention::road(q, k, n_head).into()
    }
}

//! The CUDA backend: `model::ops::Backend` on an NVIDIA GPU, with the kernels of `kernels/*.cu`
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
pub mod gemm;
pub mod kernels;

use crate::ground::dtype::GgmlType;
use crate::ground::error::{Error, Result};
use crate::model::backend::Backend;
use crate::model::weights::WeightSource;
use candle_core::{Device, Tensor};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use gemm::Ty;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Rows handled by the mat-vec kernels (MAXN in kernels/quant.cu); more go to cuBLAS.
const MATVEC_MAX_ROWS: usize = 8;

/// Whether attention of `n` queries over `m` keys with head size `hd` runs as the one fused
/// kernel (few queries; scores and the query in at most 40 KiB of shared memory).
fn attention_in_one_kernel(n: usize, m: usize, hd: usize) -> bool {
    n <= MATVEC_MAX_ROWS && (m + hd) * 4 <= 40 * 1024
}
/// f16 elements of dequantized weight per cuBLAS call (64 MiB of scratch).
const DEQUANT_CHUNK_ELEMS: usize = 32 << 20;
/// Device memory left free when deciding whether to keep a weight cached.
const RESERVE_BYTES: usize = 2 << 30;

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

/// Checks that libcuda, NVRTC and cuBLAS can be loaded, without loading anything that could
/// panic. Err is a one-line reason.
pub fn probe_libraries() -> std::result::Result<(), String> {
    let present =
        |f: unsafe fn() -> bool| std::panic::catch_unwind(|| unsafe { f() }).unwrap_or(false);
    if !present(cudarc::driver::sys::is_culib_present) {
        return Err("no NVIDIA driver library (libcuda.so) was found".into());
    }
    if !present(cudarc::nvrtc::sys::is_culib_present) {
        return Err(
            "the NVIDIA driver is present but the NVRTC library (libnvrtc.so) is not".into(),
        );
    }
    if !present(cudarc::cublas::sys::is_culib_present) {
        return Err(
            "the NVIDIA driver is present but the cuBLAS library (libcublas.so) is not".into(),
        );
    }
    Ok(())
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "unknown panic".into()
    }
}

/// Byte counters (activations are counted by `DevBuf`, weights by the caches).
#[derive(Default)]
struct MemStats {
    live: AtomicUsize,
    peak: AtomicUsize,
    weights: AtomicUsize,
    weights_peak: AtomicUsize,
    uploaded: AtomicUsize,
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
struct Pool {
    free: Mutex<HashMap<usize, Vec<CudaSlice<f32>>>>,
    bytes: AtomicUsize,
}

/// At most this many bytes of freed activations are kept for reuse.
const POOL_MAX_BYTES: usize = 1 << 30;

impl Pool {
    fn take(&self, n: usize) -> Option<CudaSlice<f32>> {
        let s = self.free.lock().unwrap().get_mut(&n)?.pop()?;
        self.bytes.fetch_sub(n * 4, Ordering::Relaxed);
        Some(s)
    }
    fn give(&self, s: CudaSlice<f32>) {
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
    fn clear(&self) {
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
    fn slice(&self) -> &CudaSlice<f32> {
        self.data.as_ref().expect("live buffer")
    }
    fn slice_mut(&mut self) -> &mut CudaSlice<f32> {
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
    buf: Arc<DevBuf>,
    rows: usize,
    cols: usize,
}

impl CudaTensor {
    fn ptr(&self, stream: &CudaStream) -> u64 {
        self.buf.slice().device_ptr(stream).0
    }
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// A weight matrix [rows (out), cols (in)] on the device, in its stored type.
pub struct DevWeight {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: CudaSlice<u8>,
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
    profiling: AtomicBool,
    prof: Mutex<Vec<(String, f64, CudaEvent, CudaEvent)>>,
}

impl CudaBackend {
    /// Open device 0: load the libraries, create the context, compile (or load cached) kernels,
    /// create the cuBLAS handle. Err is a one-line reason; never panics.
    pub fn open() -> std::result::Result<CudaBackend, String> {
        probe_libraries()?;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(Self::open_inner)) {
            Ok(r) => r,
            Err(p) => Err(format!(
                "CUDA initialisation failed: {}",
                panic_text(p).lines().next().unwrap_or("")
            )),
        }
    }

    fn open_inner() -> std::result::Result<CudaBackend, String> {
        let count =
            CudaContext::device_count().map_err(|e| format!("no usable CUDA device ({e:?})"))?;
        if count < 1 {
            return Err("the NVIDIA driver reports no CUDA device".into());
        }
        let ctx = CudaContext::new(0).map_err(|e| format!("cannot open CUDA device 0 ({e:?})"))?;
        // One stream: no cross-stream event tracking needed.
        unsafe { ctx.disable_event_tracking() };
        let device_name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let cc = ctx
            .compute_capability()
            .map_err(|e| format!("compute capability: {e:?}"))?;
        if cc.0 < 7 {
            return Err(format!(
                "{device_name} has compute capability {}.{}; these kernels need 7.0 or newer",
                cc.0, cc.1
            ));
        }
        let arch = kernels::arch_name(cc);
        let total_mem = ctx.total_mem().unwrap_or(0);
        let stream = ctx.default_stream();
        let mut funcs = HashMap::new();
        let mut cached = 0;
        for m in kernels::MODULES {
            let (ptx, hit) = kernels::ptx_cached(m, arch)?;
            cached += hit as usize;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| format!("loading kernels/{}.cu for {arch}: {e:?}", m.name))?;
            for f in m.functions {
                let func = module
                    .load_function(f)
                    .map_err(|e| format!("kernel {f} in kernels/{}.cu: {e:?}", m.name))?;
                funcs.insert(*f, func);
            }
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e:?}"))?;
        let compile_note = format!(
            "{} kernel modules for {arch} ({} compiled by NVRTC, {cached} from the PTX cache)",
            kernels::MODULES.len(),
            kernels::MODULES.len() - cached
        );
        let mode = match std::env::var("MMFUSER_CUDA_GEMM").as_deref() {
            Ok("fast") => GemmMode::Fast,
            _ => GemmMode::Exact,
        };
        let q4k_rows = match std::env::var("MMFUSER_CUDA_Q4K_ROWS").as_deref() {
            Ok("2") => 2,
            Ok("4") => 4,
            _ => 1,
        };
        Ok(CudaBackend {
            inner: Arc::new(Inner {
                ctx,
                stream,
                blas,
                funcs,
                device_name,
                arch,
                total_mem,
                compile_note,
                stats: Arc::new(MemStats::default()),
                scratch: Mutex::new(None),
                pool: Arc::new(Pool::default()),
            }),
            weights: Mutex::new(HashMap::new()),
            params: Mutex::new(HashMap::new()),
            mode: AtomicU8::new(mode as u8),
            q4k_rows: AtomicU8::new(q4k_rows),
            f16_attention: AtomicBool::new(
                std::env::var("MMFUSER_CUDA_ATTN").as_deref() == Ok("f16"),
            ),
            poison: AtomicBool::new(false),
            profiling: AtomicBool::new(false),
            prof: Mutex::new(Vec::new()),
        })
    }

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

    /// Start recording the device time of every op (CUDA events around each; no extra
    /// synchronisation).
    pub fn profile_begin(&self) {
        self.prof.lock().unwrap().clear();
        self.profiling.store(true, Ordering::Relaxed);
    }

    /// Stop recording; per op name: (name, calls, host milliseconds spent issuing it, device
    /// milliseconds between the events around it), largest device time first. Device time
    /// includes the device waiting for the host when the host is the bottleneck.
    pub fn profile_end(&self) -> Result<Vec<(String, usize, f64, f64)>> {
        self.profiling.store(false, Ordering::Relaxed);
        self.synchronize()?;
        let recs = std::mem::take(&mut *self.prof.lock().unwrap());
        let mut agg: HashMap<String, (usize, f64, f64)> = HashMap::new();
        for (name, host, e0, e1) in &recs {
            let ms = e0.elapsed_ms(e1).map_err(cu)? as f64;
            let a = agg.entry(name.clone()).or_default();
            a.0 += 1;
            a.1 += host;
            a.2 += ms;
        }
        let mut v: Vec<(String, usize, f64, f64)> = agg
            .into_iter()
            .map(|(k, (n, h, ms))| (k, n, h, ms))
            .collect();
        v.sort_by(|a, b| b.3.partial_cmp(&a.3).unwrap_or(std::cmp::Ordering::Equal));
        Ok(v)
    }

    fn op<R>(&self, name: impl FnOnce() -> String, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if !self.profiling.load(Ordering::Relaxed) {
            return f();
        }
        let ev = || -> Result<CudaEvent> {
            let e = self
                .inner
                .ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(cu)?;
            e.record(self.stream()).map_err(cu)?;
            Ok(e)
        };
        let e0 = ev()?;
        let t0 = std::time::Instant::now();
        let r = f()?;
        let host = t0.elapsed().as_secs_f64() * 1e3;
        let e1 = ev()?;
        self.prof.lock().unwrap().push((name(), host, e0, e1));
        Ok(r)
    }

    /// Drop every cached weight and parameter (their device memory is freed).
    pub fn clear_weights(&self) {
        self.weights.lock().unwrap().clear();
        self.params.lock().unwrap().clear();
        self.inner.pool.clear();
    }

    /// Wait for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(cu)
    }

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

    fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
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

    fn scratch_u16(&self, n: usize) -> Result<std::sync::MutexGuard<'_, Option<CudaSlice<u16>>>> {
        let mut g = self.inner.scratch.lock().unwrap();
        if g.as_ref().map(|s| s.len() < n).unwrap_or(true) {
            *g = None;
            *g = Some(unsafe { self.stream().alloc::<u16>(n) }.map_err(cu)?);
        }
        Ok(g)
    }

    fn upload_f32(&self, v: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
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

    fn elementwise(&self, a: &CudaTensor, b: &CudaTensor, name: &str) -> Result<CudaTensor> {
        if a.cols != b.cols || (a.rows != b.rows && b.rows != 1) {
            return Err(bad(format!(
                "{name}: shapes [{}, {}] and [{}, {}] do not match",
                a.rows, a.cols, b.rows, b.cols
            )));
        }
        let y = self.alloc(a.rows, a.cols)?;
        let n = a.len();
        if n > 0 {
            let s = self.stream();
            let bcast = (a.rows != b.rows) as i32;
            launch!(self.inner, name, grid1d(n);
                a.ptr(s), b.ptr(s), y.ptr(s), n as i64, a.cols as i32, bcast);
        }
        Ok(y)
    }

    fn unary(&self, x: &CudaTensor, name: &str) -> Result<CudaTensor> {
        let y = self.alloc(x.rows, x.cols)?;
        let n = x.len();
        if n > 0 {
            let s = self.stream();
            launch!(self.inner, name, grid1d(n); x.ptr(s), y.ptr(s), n as i64);
        }
        Ok(y)
    }

    /// Upload a weight's bytes (or reuse them): F32/F16/BF16/Q8_0/Q4_0/Q4_K/Q6_K as stored,
    /// anything else dequantized to F32 on the host.
    fn device_weight(&self, ws: &dyn WeightSource, name: &str) -> Result<Arc<DevWeight>> {
        let key = format!("{}\0{name}", ws.origin().display());
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
            let v = crate::cpu::with_f32(&t, |s| {
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
}

/// The ops themselves; `impl Backend` below wraps each in the optional profiler.
impl CudaBackend {
    fn op_upload(&self, x: &Tensor) -> Result<CudaTensor> {
        let (r, c) = match x.dims() {
            [r, c] => (*r, *c),
            [n] => (1, *n),
            d => (d[0], d[1..].iter().product()),
        };
        let x = x.to_dtype(candle_core::DType::F32)?;
        crate::cpu::with_f32(&x, |v| self.upload_f32(v, r, c))?
    }

    fn op_download(&self, x: &CudaTensor) -> Result<Tensor> {
        let v = if x.len() == 0 {
            vec![]
        } else {
            let mut v = self.stream().clone_dtoh(x.buf.slice()).map_err(cu)?;
            v.truncate(x.len());
            v
        };
        Ok(Tensor::from_vec(v, (x.rows, x.cols), &Device::Cpu)?)
    }

    fn op_dims(&self, x: &CudaTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn op_weight(&self, ws: &dyn WeightSource, name: &str) -> Result<Arc<DevWeight>> {
        self.device_weight(ws, name)
    }

    fn op_weight_dims(&self, w: &Arc<DevWeight>) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn op_param(&self, ws: &dyn WeightSource, name: &str) -> Result<CudaTensor> {
        let key = format!("{}\0{name}", ws.origin().display());
        if let Some(t) = self.params.lock().unwrap().get(&key) {
            return Ok(t.clone());
        }
        let t = ws.tensor_f32(name)?;
        let t = self.op_upload(&t)?;
        self.params.lock().unwrap().insert(key, t.clone());
        Ok(t)
    }

    fn op_linear(
        &self,
        x: &CudaTensor,
        w: &Arc<DevWeight>,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        if x.cols != w.cols {
            return Err(bad(format!(
                "linear: input [{}, {}] does not match weight [{}, {}]",
                x.rows, x.cols, w.rows, w.cols
            )));
        }
        if let Some(b) = bias {
            if (b.rows, b.cols) != (1, w.rows) {
                return Err(bad(format!(
                    "linear: bias [{}, {}] for {} outputs",
                    b.rows, b.cols, w.rows
                )));
            }
        }
        if x.rows == 0 || w.rows == 0 {
            return self.alloc(x.rows, w.rows);
        }
        if x.rows <= MATVEC_MAX_ROWS {
            self.matvec(x, w, bias)
        } else {
            self.gemm_linear(x, w, bias)
        }
    }

    fn op_attention(
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
        let hd = crate::model::backend::attention_head_dim(
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

    fn op_layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        if (w.rows, w.cols) != (1, x.cols) || (b.rows, b.cols) != (1, x.cols) {
            return Err(bad(format!(
                "layer_norm: weight/bias for {} columns",
                x.cols
            )));
        }
        let y = self.alloc(x.rows, x.cols)?;
        if x.len() > 0 {
            let s = self.stream();
            launch!(self.inner, "layer_norm_f32", rows_cfg(x.rows);
                x.ptr(s), w.ptr(s), b.ptr(s), y.ptr(s), x.cols as i32, eps);
        }
        Ok(y)
    }

    fn op_rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        if (w.rows, w.cols) != (1, x.cols) {
            return Err(bad(format!("rms_norm: weight for {} columns", x.cols)));
        }
        let y = self.alloc(x.rows, x.cols)?;
        if x.len() > 0 {
            let s = self.stream();
            launch!(self.inner, "rms_norm_f32", rows_cfg(x.rows);
                x.ptr(s), w.ptr(s), y.ptr(s), x.cols as i32, eps);
        }
        Ok(y)
    }

    fn op_softmax_groups(&self, x: &CudaTensor, group: usize) -> Result<CudaTensor> {
        if group == 0 || !x.cols.is_multiple_of(group) {
            return Err(bad(format!(
                "softmax over groups of {group} in {} columns",
                x.cols
            )));
        }
        let y = self.alloc(x.rows, x.cols)?;
        let groups = x.len() / group;
        if groups > 0 {
            let s = self.stream();
            launch!(self.inner, "softmax_groups_f32", grid1d(groups);
                x.ptr(s), y.ptr(s), groups as i64, group as i32);
        }
        Ok(y)
    }

    fn op_add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.elementwise(a, b, "add_f32")
    }

    fn op_mul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.elementwise(a, b, "mul_f32")
    }

    fn op_quick_gelu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary(x, "quick_gelu_f32")
    }

    fn op_gelu_erf(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary(x, "gelu_erf_f32")
    }

    fn op_silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        if (gate.rows, gate.cols) != (up.rows, up.cols) {
            return Err(bad(format!(
                "silu_mul: [{}, {}] vs [{}, {}]",
                gate.rows, gate.cols, up.rows, up.cols
            )));
        }
        let y = self.alloc(gate.rows, gate.cols)?;
        let n = gate.len();
        if n > 0 {
            let s = self.stream();
            launch!(self.inner, "silu_mul_f32", grid1d(n); gate.ptr(s), up.ptr(s), y.ptr(s), n as i64);
        }
        Ok(y)
    }

    fn op_rope_interleaved(
        &self,
        x: &CudaTensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<CudaTensor> {
        self.op_rope(x, n_head, pos0, theta, "rope_interleaved_f32")
    }

    /// Either rope kernel (same arguments; `kernel` picks the pair layout).
    fn op_rope(
        &self,
        x: &CudaTensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
        kernel: &'static str,
    ) -> Result<CudaTensor> {
        let c = x.cols;
        if n_head == 0 || !c.is_multiple_of(n_head) || !(c / n_head).is_multiple_of(2) {
            return Err(bad(format!("rope: {c} columns in {n_head} heads")));
        }
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
    fn op_msda(
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
        let n_tokens: usize = levels.iter().map(|(h, w)| h * w).sum();
        if n_heads == 0 || !c.is_multiple_of(n_heads) || value.rows != n_tokens {
            return Err(bad(format!(
                "msda: value [{}, {c}] for levels {levels:?} and {n_heads} heads",
                value.rows
            )));
        }
        if (offsets.rows, offsets.cols) != (nq, per_q * 2)
            || (weights.rows, weights.cols) != (nq, per_q)
        {
            return Err(bad(format!(
                "msda: offsets [{}, {}] / weights [{}, {}] for {nq} queries x {per_q} samples",
                offsets.rows, offsets.cols, weights.rows, weights.cols
            )));
        }
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

    fn op_rows(&self, x: &CudaTensor, start: usize, len: usize) -> Result<CudaTensor> {
        if start + len > x.rows {
            return Err(bad(format!(
                "rows {start}..{} of a [{}, {}] tensor",
                start + len,
                x.rows,
                x.cols
            )));
        }
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

    fn op_concat_rows(&self, xs: &[&CudaTensor]) -> Result<CudaTensor> {
        let Some(first) = xs.first() else {
            return Err(bad("concat of no tensors"));
        };
        let cols = first.cols;
        if let Some(x) = xs.iter().find(|x| x.cols != cols) {
            return Err(bad(format!("concat: {} columns vs {cols}", x.cols)));
        }
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

impl Backend for CudaBackend {
    type T = CudaTensor;
    type W = Arc<DevWeight>;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn upload(&self, x: &Tensor) -> Result<CudaTensor> {
        self.op(|| "upload (host -> device)".into(), || self.op_upload(x))
    }
    fn download(&self, x: &CudaTensor) -> Result<Tensor> {
        self.op(
            || "download (device -> host)".into(),
            || self.op_download(x),
        )
    }
    fn dims(&self, x: &CudaTensor) -> (usize, usize) {
        self.op_dims(x)
    }
    fn weight(&self, ws: &dyn WeightSource, name: &str) -> Result<Arc<DevWeight>> {
        self.op(
            || "weight lookup / upload".into(),
            || self.op_weight(ws, name),
        )
    }
    fn weight_dims(&self, w: &Arc<DevWeight>) -> (usize, usize) {
        self.op_weight_dims(w)
    }
    fn param(&self, ws: &dyn WeightSource, name: &str) -> Result<CudaTensor> {
        self.op(
            || "param lookup / upload".into(),
            || self.op_param(ws, name),
        )
    }
    fn linear(
        &self,
        x: &CudaTensor,
        w: &Arc<DevWeight>,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        self.op(
            || {
                if x.rows <= MATVEC_MAX_ROWS {
                    format!("linear mat-vec {}", w.ty)
                } else if w.ty.is_quantized() {
                    format!("linear dequant {} + f16 GEMM", w.ty)
                } else {
                    format!("linear GEMM {} {:?}", w.ty, self.gemm_mode())
                }
            },
            || self.op_linear(x, w, bias),
        )
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
        self.op(
            || {
                let hd = q.cols / n_head.max(1);
                if attention_in_one_kernel(q.rows, k.rows, hd) {
                    "attention (few queries, one kernel)".into()
                } else {
                    "attention (SGEMM, softmax, SGEMM)".into()
                }
            },
            || self.op_attention(q, k, v, n_head, n_head_kv, causal),
        )
    }
    fn layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        self.op(|| "layer_norm".into(), || self.op_layer_norm(x, w, b, eps))
    }
    fn rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        self.op(|| "rms_norm".into(), || self.op_rms_norm(x, w, eps))
    }
    fn softmax_groups(&self, x: &CudaTensor, group: usize) -> Result<CudaTensor> {
        self.op(
            || "softmax_groups".into(),
            || self.op_softmax_groups(x, group),
        )
    }
    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.op(|| "add".into(), || self.op_add(a, b))
    }
    fn mul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.op(|| "mul".into(), || self.op_mul(a, b))
    }
    fn quick_gelu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.op(|| "quick_gelu".into(), || self.op_quick_gelu(x))
    }
    fn gelu_erf(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.op(|| "gelu_erf".into(), || self.op_gelu_erf(x))
    }
    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        self.op(|| "silu_mul".into(), || self.op_silu_mul(gate, up))
    }
    fn rope_interleaved(
        &self,
        x: &CudaTensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<CudaTensor> {
        self.op(
            || "rope".into(),
            || self.op_rope_interleaved(x, n_head, pos0, theta),
        )
    }
    fn rope_neox(
        &self,
        x: &CudaTensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<CudaTensor> {
        self.op(
            || "rope".into(),
            || self.op_rope(x, n_head, pos0, theta, "rope_neox_f32"),
        )
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
        self.op(
            || "msda (fused deformable attention)".into(),
            || self.op_msda(value, levels, offsets, weights, ref_grid, n_heads, n_points),
        )
    }
    fn rows(&self, x: &CudaTensor, start: usize, len: usize) -> Result<CudaTensor> {
        self.op(|| "rows (copy)".into(), || self.op_rows(x, start, len))
    }
    fn concat_rows(&self, xs: &[&CudaTensor]) -> Result<CudaTensor> {
        self.op(|| "concat_rows (copy)".into(), || self.op_concat_rows(xs))
    }
}

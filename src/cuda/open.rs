//! Opening the backend: probing the libraries before cudarc touches them, creating the context,
//! loading the kernels (NVRTC-compiled or from the PTX cache), creating the cuBLAS handle.
use super::memory::{MemStats, Pool};
use super::{kernels, CudaBackend, GemmMode, Inner};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaContext;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Mutex};

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
        })
    }
}

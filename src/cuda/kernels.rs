//! The CUDA C sources (kernels/*.cu, embedded), compiled at run time with NVRTC and cached as PTX
//! on disk, keyed by a hash of the source, the target architecture and the NVRTC version.
//!
//! Nothing here needs a GPU: `compile_ptx` only needs the NVRTC library, which is how CI checks
//! that every kernel compiles (tests/cuda_nvrtc.rs).
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Prepended to every module (type aliases, half conversions, reductions).
pub const COMMON: &str = include_str!("../../kernels/common.cu");

/// One NVRTC module: its name, its source (without `COMMON`) and the kernels it defines.
pub struct KernelModule {
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

pub const MODULES: &[KernelModule] = &[
    KernelModule {
        name: "elementwise",
        source: include_str!("../../kernels/elementwise.cu"),
        functions: &[
            "add_f32",
            "mul_f32",
            "quick_gelu_f32",
            "gelu_erf_f32",
            "silu_mul_f32",
            "split_f16",
            "split_bf16",
            "combine_parts",
            "add_bias_f32",
            "fill_f32",
        ],
    },
    KernelModule {
        name: "norm",
        source: include_str!("../../kernels/norm.cu"),
        functions: &[
            "layer_norm_f32",
            "rms_norm_f32",
            "softmax_groups_f32",
            "softmax_attn_f32",
            "rope_interleaved_f32",
            "rope_neox_f32",
            "attn_small_f32",
        ],
    },
    KernelModule {
        name: "msda",
        source: include_str!("../../kernels/msda.cu"),
        functions: &["msda_f32"],
    },
    KernelModule {
        name: "quant",
        source: include_str!("../../kernels/quant.cu"),
        functions: &[
            "mv_q8_0",
            "mv_q4_0",
            "mv_q4_k",
            "mv_q6_k",
            "mv1_q8_0",
            "mv1_q4_0",
            "mv1_q4_k",
            "mv1_q4_k_r2",
            "mv1_q4_k_r4",
            "mv1_q6_k",
            "mv_float",
            "dq_q8_0",
            "dq_q4_0",
            "dq_q4_k",
            "dq_q6_k",
        ],
    },
];

/// The full source NVRTC compiles for a module.
pub fn full_source(m: &KernelModule) -> String {
    format!("{COMMON}\n// ---- {}.cu ----\n{}", m.name, m.source)
}

/// Whether the NVRTC shared library can be loaded (never panics).
pub fn nvrtc_present() -> bool {
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    if !nvrtc_present() {
        return Err("the NVRTC library (libnvrtc.so) was not found".into());
    }
    std::panic::catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map(|_| (major, minor))
            .map_err(|e| format!("nvrtcVersion: {e:?}"))
    })
    .unwrap_or_else(|_| Err("NVRTC could not be loaded".into()))
}

/// "sm_90" for compute capability (9, 0); names NVRTC accepts as `--gpu-architecture`.
pub fn arch_name(cc: (i32, i32)) -> &'static str {
    match cc {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (7, 5) => "sm_75",
        (7, 0) => "sm_70",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        (a, b) => Box::leak(format!("sm_{a}{b}").into_boxed_str()),
    }
}

/// Compile one module to PTX for `arch` (no GPU needed). Errors carry NVRTC's log.
pub fn compile_ptx(m: &KernelModule, arch: &'static str) -> Result<String, String> {
    if !nvrtc_present() {
        return Err("the NVRTC library (libnvrtc.so) was not found".into());
    }
    let src = full_source(m);
    let name = format!("{}.cu", m.name);
    let res = std::panic::catch_unwind(move || {
        cudarc::nvrtc::compile_ptx_with_opts(
            &src,
            cudarc::nvrtc::CompileOptions {
                arch: Some(arch),
                name: Some(name),
                ..Default::default()
            },
        )
    });
    match res {
        Ok(Ok(ptx)) => Ok(ptx.to_src()),
        Ok(Err(cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. })) => Err(format!(
            "NVRTC failed on kernels/{}.cu for {arch} ({nvrtc:?}):\n{}",
            m.name,
            log.to_string_lossy()
        )),
        Ok(Err(e)) => Err(format!("NVRTC failed on kernels/{}.cu: {e}", m.name)),
        Err(_) => Err(format!("NVRTC panicked on kernels/{}.cu", m.name)),
    }
}

/// Where compiled PTX is kept: $MMFUSER_CACHE_DIR, else $XDG_CACHE_HOME/mmfuser-convert,
/// else ~/.cache/mmfuser-convert (then `ptx/` below it).
pub fn cache_dir() -> Option<PathBuf> {
    let base = if let Some(d) = std::env::var_os("MMFUSER_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("mmfuser-convert")
    } else {
        PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache")
            .join("mmfuser-convert")
    };
    Some(base.join("ptx"))
}

/// PTX for a module, from the disk cache when present; returns (ptx, came from the cache).
/// Cache problems are never errors: the module is then just compiled.
pub fn ptx_cached(m: &KernelModule, arch: &'static str) -> Result<(String, bool), String> {
    let (major, minor) = nvrtc_version()?;
    let mut h = Sha256::new();
    h.update(full_source(m).as_bytes());
    h.update(format!("\0{arch}\0nvrtc{major}.{minor}").as_bytes());
    let key: String = h
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = cache_dir().map(|d| d.join(format!("{}-{arch}-{key}.ptx", m.name)));
    if let Some(f) = &file {
        if let Ok(s) = std::fs::read_to_string(f) {
            if s.contains(".entry") {
                return Ok((s, true));
            }
        }
    }
    let ptx = compile_ptx(m, arch)?;
    if let Some(f) = &file {
        if let Some(dir) = f.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = f.with_extension(format!("tmp-{}", std::process::id()));
                if std::fs::write(&tmp, &ptx).is_ok() && std::fs::rename(&tmp, f).is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
        }
    }
    Ok((ptx, false))
}

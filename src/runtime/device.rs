//! Choosing where the model runs: `--device auto|cuda|cpu`.
//!
//! `auto` opens the CUDA backend when libcuda, NVRTC and cuBLAS load and a device opens, and
//! otherwise says why in one line and uses the CPU; `cuda` makes that reason a usage error
//! (exit 2). Nothing here can panic for want of a library: `cuda::probe_libraries` checks every
//! library before cudarc touches it.
use crate::cuda::CudaBackend;
use crate::ground::error::{Error, Result};

/// Where the model runs.
pub enum Device {
    Cpu,
    Cuda(Box<CudaBackend>),
}

impl Device {
    /// "cpu" or "cuda" (the verify report's `device`).
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }

    pub fn cuda(&self) -> Option<&CudaBackend> {
        match self {
            Device::Cuda(b) => Some(b),
            Device::Cpu => None,
        }
    }
}

/// Resolve `--device`: the device, and one line for stderr saying which device runs the model
/// (and, under auto without a usable GPU, why not CUDA); the CLI prints it unless told to be quiet.
pub fn select(requested: &str) -> Result<(Device, String)> {
    match requested {
        "cpu" => Ok((Device::Cpu, "device: cpu".into())),
        "auto" => match CudaBackend::open() {
            Ok(b) => {
                let line = format!("device: cuda, {}", b.describe());
                Ok((Device::Cuda(Box::new(b)), line))
            }
            Err(why) => Ok((
                Device::Cpu,
                format!("note: no usable CUDA GPU ({why}); running on the CPU"),
            )),
        },
        "cuda" => match CudaBackend::open() {
            Ok(b) => {
                let line = format!("device: cuda, {}", b.describe());
                Ok((Device::Cuda(Box::new(b)), line))
            }
            Err(why) => Err(Error::usage(format!(
                "--device cuda: {why} (use --device cpu or auto)"
            ))),
        },
        other => Err(Error::usage(format!(
            "unknown device '{other}' (auto, cpu, cuda)"
        ))),
    }
}

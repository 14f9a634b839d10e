//! Choosing where the model runs. The CUDA backend (kernels/, NVRTC via cudarc) is not part of
//! this build yet: `auto` says so in one line and uses the CPU; `cuda` is an error.
use crate::error::{Error, Result};

/// Returns the device name to use ("cpu"), or an error for an unavailable explicit choice.
pub fn select(requested: &str) -> Result<String> {
    match requested {
        "cpu" => Ok("cpu".into()),
        "auto" => {
            eprintln!("note: this build has no CUDA backend yet; running on the CPU");
            Ok("cpu".into())
        }
        "cuda" => Err(Error::usage(
            "--device cuda: this build has no CUDA backend yet (use --device cpu or auto)",
        )),
        other => Err(Error::usage(format!(
            "unknown device '{other}' (auto, cpu, cuda)"
        ))),
    }
}

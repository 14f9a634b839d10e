//! The manifest written next to the artefacts: tool version, command line, sha256 of every input
//! and output file, and the per-tensor mapping. `verify` checks artefacts against it.
use crate::convert::recipe::ArtefactKind;
use crate::ground::digest::{lossy_path, FileHash};
use crate::ground::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST_SCHEMA: &str = "mmfuser-convert/manifest/v1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputRecord {
    pub kind: ArtefactKind,
    #[serde(serialize_with = "lossy_path")]
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub file_type: String,
    pub tensors: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorRecord {
    pub source: String,
    pub source_file: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub gguf: String,
    pub artefact: ArtefactKind,
    pub ggml_type: String,
    /// Relative RMS error of dequant(quant(x)) - x, for quantized tensors.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub quant_rel_rms: Option<f64>,
}

impl TensorRecord {
    /// `quant_rel_rms` as both writers record it: only for tensors quantized by this run (a
    /// float cast is not a quantization, a block copied unchanged has no new error).
    pub fn quant_error(
        src: crate::ground::dtype::GgmlType,
        out: crate::ground::dtype::GgmlType,
        rel_rms: f64,
    ) -> Option<f64> {
        (out.is_quantized() && out != src).then_some(rel_rms)
    }
}

/// A path's file name as recorded in the manifest.
pub fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub tool: String,
    pub version: String,
    pub command: Vec<String>,
    pub created_unix: u64,
    pub recipe: String,
    pub inputs: Vec<FileHash>,
    pub outputs: Vec<OutputRecord>,
    pub tensors: Vec<TensorRecord>,
    pub dropped: Vec<String>,
}

impl Manifest {
    pub fn new(
        command: &[String],
        recipe: &str,
        inputs: Vec<FileHash>,
        outputs: Vec<OutputRecord>,
        tensors: Vec<TensorRecord>,
        dropped: Vec<String>,
    ) -> Self {
        Manifest {
            schema: MANIFEST_SCHEMA.into(),
            tool: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            command: command.to_vec(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            recipe: recipe.into(),
            inputs,
            outputs,
            tensors,
            dropped,
        }
    }
    /// Written under a temporary name, to be renamed together with the artefacts it describes
    /// (see `fsutil::commit_all`): a full disk shows up before any earlier file is replaced.
    pub fn write_pending(&self, path: &Path) -> Result<crate::ground::fsutil::AtomicFile> {
        use std::io::Write;
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::other(e.to_string()))?;
        let mut f = crate::ground::fsutil::AtomicFile::create(path)?;
        if let Err(e) = f
            .write_all(text.as_bytes())
            .and_then(|_| f.file().sync_all())
        {
            return Err(f.error(e));
        }
        Ok(f)
    }
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::ground::fsutil::read_input_text(path, crate::ground::fsutil::CAP_INDEX)?;
        serde_json::from_str(&text).map_err(|e| Error::input(path, format!("not a manifest: {e}")))
    }
    /// Manifests in `dir` that list an output with this file name.
    pub fn find_for(artefact: &Path) -> Vec<(PathBuf, Manifest)> {
        let dir = artefact
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let fname = artefact.file_name().map(|f| f.to_os_string());
        let mut found = vec![];
        let Ok(rd) = std::fs::read_dir(dir) else {
            return found;
        };
        for e in rd.flatten() {
            let p = e.path();
            if !p.to_string_lossy().ends_with(".manifest.json") {
                continue;
            }
            if let Ok(m) = Manifest::read(&p) {
                if m.outputs
                    .iter()
                    .any(|o| o.path.file_name().map(|f| f.to_os_string()) == fname)
                {
                    found.push((p, m));
                }
            }
        }
        found
    }
}

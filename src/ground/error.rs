//! One error type for the whole crate. Every error names the file and, where
//! there is one, the tensor; `exit_code` maps errors to the CLI contract, the same for every
//! verb: 1 = bad input (a file missing, unreadable, malformed or not what the recipe expects),
//! 2 = usage error (the command line itself), 3 = the verb ran and its check came out negative
//! (verify: the artefact failed). 3 stands alone so that a script can tell "the artefact is wrong"
//! from "verify could not run".
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line itself is wrong (conflicting or missing arguments, an option that does
    /// not apply to the input given).
    #[error("usage: {0}")]
    Usage(String),
    /// A file is malformed or does not match what the recipe expects.
    #[error("{}: {msg}", path.display())]
    Input { path: PathBuf, msg: String },
    /// One tensor inside a file is malformed (shape, dtype, values).
    #[error("{}: tensor '{tensor}': {msg}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// A tensor's values cannot be turned into what was asked (a quantizer or a cast refused
    /// them), said where the tensor is not known; the step that knows it names file and tensor
    /// with [`Error::in_tensor`].
    #[error("{0}")]
    Values(String),
    /// An operating-system error while reading or writing a path.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A check ran and failed (verify's verdict): the one error that is not about the input.
    #[error("{0}")]
    Failed(String),
    /// Anything else (numerical backends, CUDA, internal invariants).
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn input(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Input {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn tensor(
        path: impl AsRef<Path>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.as_ref().to_path_buf(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }
    pub fn other(msg: impl Into<String>) -> Self {
        Error::Other(msg.into())
    }
    /// An `Error::Values` of the tensor `tensor` in `path`, as an `Error::Tensor`; other errors
    /// (an I/O error of the output, say) are about something else and stay as they are.
    pub fn in_tensor(self, path: impl AsRef<Path>, tensor: &str) -> Self {
        match self {
            Error::Values(msg) => Error::tensor(path, tensor, msg),
            e => e,
        }
    }
    /// The process exit code this error maps to.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            Error::Failed(_) => 3,
            _ => 1,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Other(format!("tensor backend: {e}"))
    }
}

/// Attach a path to an io::Result.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}
impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

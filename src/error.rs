//! One error type for the library. Every variant names the file, tensor or field at fault,
//! so that a user reading a cluster log knows what to fix without a backtrace.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its content is not what we expect (bad JSON, truncated header, ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    /// A configuration value is wrong. `file` is the config (or `--set`), `key` the dotted field.
    #[error("{file}: `{key}`: {msg}")]
    Config { file: String, key: String, msg: String },

    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<i64>, got: Vec<i64> },

    /// The model or option is outside what this tool implements.
    #[error("{path}: unsupported {what}")]
    Unsupported { path: PathBuf, what: String },

    /// Training diverged or produced a non-finite value.
    #[error("step {step}: {msg}")]
    NonFinite { step: u64, msg: String },

    #[error("distributed: {0}")]
    Dist(String),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn config(file: impl Into<String>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { file: file.into(), key: key.into(), msg: msg.into() }
    }
    pub fn unsupported(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::Unsupported { path: path.as_ref().to_path_buf(), what: what.into() }
    }
}

/// Shorthand for `Error::Other(format!(...))`.
#[macro_export]
macro_rules! other {
    ($($arg:tt)*) => { $crate::error::Error::Other(format!($($arg)*)) };
}

/// Attach a path to `std::io::Result`s.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

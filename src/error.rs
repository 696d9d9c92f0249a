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

    /// Input that is wrong but belongs to no one file or config key (command-line combinations,
    /// an output directory that may not be used, ranks given different data).
    #[error("{0}")]
    Input(String),

    /// A check found results that disagree (an ONNX export against its model, replicas across
    /// ranks, a collective's results).
    #[error("{0}")]
    Mismatch(String),

    /// Another rank failed, and this one found out through the communication library.
    #[error("a peer rank failed: {0}")]
    Peer(String),

    /// A collective did not complete within `dist.timeout_s`.
    #[error("{0}")]
    Timeout(String),

    /// The run was asked to stop (SIGTERM, SIGUSR1, SIGINT) and left a checkpoint to resume from.
    #[error("preempted by {signal} after step {step}: checkpoint {} written; run the same command again to resume", checkpoint.display())]
    Preempted { signal: String, step: u64, checkpoint: PathBuf },

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the process ends: one exit code per kind of outcome, so that a batch script (or Slurm's
/// requeue logic) can tell them apart. README "Exit codes" documents them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    /// Anything that went wrong while running: I/O while writing, libtorch, out of memory,
    /// training that stays non-finite, a panic under `mpirun`.
    Runtime = 1,
    /// The input is wrong (config, files, command line; clap's usage errors are 2 as well).
    BadInput = 2,
    /// A verification found a mismatch (`verify`, `dist.verify_every`, `comm-check`).
    Mismatch = 3,
    /// This rank stopped because another rank failed.
    PeerFailed = 4,
    /// A collective did not complete within `dist.timeout_s` (the watchdog ended the job).
    Timeout = 5,
    /// Stopped on SIGTERM/SIGUSR1/SIGINT after writing a checkpoint: run the same command again
    /// (EX_TEMPFAIL of sysexits.h: "try again later").
    Preempted = 75,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl Error {
    /// The exit code this error ends the process with.
    pub fn exit(&self) -> Exit {
        use std::io::ErrorKind as K;
        match self {
            Error::Config { .. }
            | Error::Format { .. }
            | Error::MissingTensor { .. }
            | Error::ShapeMismatch { .. }
            | Error::Unsupported { .. }
            | Error::Input(_) => Exit::BadInput,
            // Files that are not there, not readable or not what they should be are the user's to
            // fix; a full disk or a failing device is not.
            Error::Io { source, .. } => match source.kind() {
                K::NotFound | K::PermissionDenied | K::InvalidData | K::InvalidInput | K::IsADirectory | K::NotADirectory => Exit::BadInput,
                _ => Exit::Runtime,
            },
            Error::Mismatch(_) => Exit::Mismatch,
            Error::Peer(_) => Exit::PeerFailed,
            Error::Timeout(_) => Exit::Timeout,
            Error::Preempted { .. } => Exit::Preempted,
            Error::NonFinite { .. } | Error::Dist(_) | Error::Torch(_) | Error::Other(_) => Exit::Runtime,
        }
    }
}

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

/// Print one line on stderr with a single write: lines that several ranks print at once into one
/// pipe or log file then stay whole (`eprintln!` writes its pieces separately, and two ranks'
/// pieces interleave).
pub fn print_line(line: &str) {
    use std::io::Write;
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    let _ = std::io::stderr().lock().write_all(&bytes);
}

/// Shorthand for `Error::Input(format!(...))`: bad input that names what to change.
#[macro_export]
macro_rules! input {
    ($($arg:tt)*) => { $crate::error::Error::Input(format!($($arg)*)) };
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

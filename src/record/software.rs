//! Versions of the binary and of the native libraries it runs on, as far as they are cheaply
//! knowable in this process: nothing is loaded just to ask its version, except libnccl's
//! `ncclGetVersion` when libnccl is already mapped.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Software {
    /// `unlearn` crate version.
    pub unlearn: String,
    /// Commit the binary was built from (build.rs), or "unknown" outside a git checkout.
    pub git_commit: String,
    /// Whether the files that compile into the binary (src/, build.rs, Cargo.toml, Cargo.lock)
    /// had uncommitted changes at build time; absent when unknown.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub git_dirty: Option<bool>,
    /// libtorch version (from the version file next to the libtorch that is loaded).
    pub libtorch: String,
    /// CUDA runtime and cuDNN versions libtorch reports, when a GPU is available.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cuda: Option<String>,
    /// NCCL version, when libnccl is loaded in this process (the nccl backend).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub nccl: Option<String>,
    /// onnxruntime version: of the loaded library, else of the one `ORT_DYLIB_PATH` names.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub onnxruntime: Option<String>,
    /// MPI library version string (first line), when built with MPI.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mpi: Option<String>,
}

impl Software {
    pub fn detect() -> Software {
        let dirty = match env!("UNLEARN_GIT_DIRTY") {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        };
        Software {
            unlearn: env!("CARGO_PKG_VERSION").into(),
            git_commit: env!("UNLEARN_GIT_COMMIT").into(),
            git_dirty: dirty,
            libtorch: libtorch_version().unwrap_or_else(|| "unknown".into()),
            cuda: cuda_version(),
            nccl: nccl_version(),
            onnxruntime: onnxruntime_version(),
            mpi: mpi_version(),
        }
    }
}

/// Path of a shared library mapped into this process whose file name starts with `prefix`.
fn loaded_library(prefix: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix) && n.contains(".so")))
}

/// `1.31.1` from `libonnxruntime.so.1.31.1`.
fn version_suffix(path: &std::path::Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let v = name.split_once(".so.")?.1;
    (!v.is_empty()).then(|| v.to_string())
}

/// pip's torch/version.py (`__version__ = '2.11.0+cu130'`) or a libtorch zip's build-version,
/// next to the lib/ directory of the loaded libtorch_cpu.
fn libtorch_version() -> Option<String> {
    let root = loaded_library("libtorch_cpu")?.parent()?.parent()?.to_path_buf();
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        let line = text.lines().find(|l| l.starts_with("__version__"))?;
        return Some(line.split(['\'', '"']).nth(1)?.to_string());
    }
    std::fs::read_to_string(root.join("build-version")).ok().map(|s| s.trim().to_string())
}

fn cuda_version() -> Option<String> {
    if !tch::Cuda::is_available() {
        return None;
    }
    let dotted = |v: i64| format!("{}.{}", v / 1000, (v % 1000) / 10);
    let mut s = format!("cudart {}", dotted(tch::utils::version_cudart()));
    if tch::Cuda::cudnn_is_available() {
        let v = tch::utils::version_cudnn();
        s += &format!(", cudnn {}.{}.{}", v / 10000, (v / 100) % 100, v % 100);
    }
    Some(s)
}

#[cfg(feature = "nccl")]
fn nccl_version() -> Option<String> {
    loaded_library("libnccl")?;
    // cudarc panics if it cannot dlopen libnccl itself, even when another copy is mapped.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return None;
    }
    let v = cudarc::nccl::result::get_nccl_version().ok()?;
    // NCCL_VERSION_CODE: major*10000 + minor*100 + patch since 2.9.
    Some(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

#[cfg(not(feature = "nccl"))]
fn nccl_version() -> Option<String> {
    None
}

fn onnxruntime_version() -> Option<String> {
    if let Some(v) = loaded_library("libonnxruntime").as_deref().and_then(version_suffix) {
        return Some(v);
    }
    let path = std::fs::canonicalize(std::env::var_os("ORT_DYLIB_PATH")?).ok()?;
    version_suffix(&path).map(|v| format!("{v} (ORT_DYLIB_PATH, not loaded)"))
}

#[cfg(feature = "mpi")]
fn mpi_version() -> Option<String> {
    let v = mpi::environment::library_version().ok()?;
    Some(v.trim_end_matches('\0').lines().next().unwrap_or("").trim().trim_end_matches(',').to_string()).filter(|s| !s.is_empty())
}

#[cfg(not(feature = "mpi"))]
fn mpi_version() -> Option<String> {
    None
}

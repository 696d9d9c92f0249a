//! Shared helpers for the integration tests: the Python reference venv, tiny random models built
//! by transformers, and paths to the shared data.
#![allow(dead_code)]

pub mod tiny;

use std::path::{Path, PathBuf};
use std::process::Command;

/// launch/setup.sh's cache: `$UNLEARN_CACHE`, else `~/.cache/unlearn`.
pub fn cache_dir() -> PathBuf {
    std::env::var("UNLEARN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache/unlearn"))
}

/// The Python with torch/transformers/onnxruntime/rouge_score/scipy/sklearn (set up by launch/setup.sh).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("UNLEARN_PYTHON") {
        return PathBuf::from(p);
    }
    let p = cache_dir().join("venv/bin/python");
    assert!(p.exists(), "reference Python not found at {} (run launch/setup.sh or set UNLEARN_PYTHON)", p.display());
    p
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// ../shared/data (or $UNLEARN_SHARED/data).
pub fn shared_data() -> PathBuf {
    let base = std::env::var("UNLEARN_SHARED").map(PathBuf::from).unwrap_or_else(|_| repo().join("../shared"));
    base.join("data")
}

/// Run a reference script under tests/py and return its stdout; panics with stderr on failure.
pub fn run_py(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(repo().join("tests/py").join(script))
        .args(args)
        .env("UNLEARN_SHARED", shared_data().parent().unwrap())
        .output()
        .expect("spawn python");
    assert!(
        out.status.success(),
        "python {script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tiny random Llama saved by transformers, with a tokenizer trained on TOFU text.
/// `config` is JSON merged into the LlamaConfig (e.g. `{"num_key_value_heads": 4}`).
pub fn make_tiny_model(dir: &Path, config: &str, seed: u64, tokenizer: &str) -> PathBuf {
    let out = dir.to_str().unwrap();
    run_py("hf_ref.py", &["make-model", "--out", out, "--config", config, "--seed", &seed.to_string(), "--tokenizer", tokenizer]);
    dir.to_path_buf()
}

/// A tiny Llama variant: a name and the JSON merged into its LlamaConfig.
pub struct Case {
    pub name: &'static str,
    pub config: &'static str,
}

/// GQA and MHA, tied and untied embeddings, llama3 rope scaling.
pub const LLAMA_CASES: &[Case] = &[
    Case { name: "gqa-untied", config: r#"{"num_attention_heads": 4, "num_key_value_heads": 2}"# },
    Case { name: "mha-tied", config: r#"{"num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": true}"# },
    Case {
        name: "gqa-llama3-rope",
        config: r#"{"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64, "rope_theta": 500000.0,
                   "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}"#,
    },
];

/// The `unlearn` binary built for these tests.
pub fn unlearn_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_unlearn"))
}

/// Run `unlearn` with args; returns (success, stdout, stderr).
pub fn run_unlearn(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(unlearn_bin()).args(args).output().expect("spawn unlearn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Max |a - b| over positions where `mask` is 1 (`a`, `b`: [b, t, v]; mask [b, t]).
pub fn masked_max_abs_diff(a: &tch::Tensor, b: &tch::Tensor, mask: &tch::Tensor) -> f64 {
    let m = mask.to_kind(tch::Kind::Float).unsqueeze(-1);
    ((a - b).abs() * m).max().double_value(&[])
}

/// Every process below `pid` (children first found, depth-first), from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            for c in text.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// The rank Open MPI gave process `pid` (its environment's OMPI_COMM_WORLD_RANK).
pub fn rank_of(pid: u32) -> Option<usize> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|kv| {
        let s = String::from_utf8_lossy(kv);
        s.strip_prefix("OMPI_COMM_WORLD_RANK=").and_then(|v| v.parse().ok())
    })
}

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

/// launch/setup.sh's overlay with optimum-onnx and the transformers it supports (< 4.58), put in
/// front of the venv with PYTHONPATH: `$UNLEARN_OPTIMUM_PATH`, else `<cache>/py-optimum`.
pub fn optimum_path() -> PathBuf {
    let p = std::env::var("UNLEARN_OPTIMUM_PATH").map(PathBuf::from).unwrap_or_else(|_| cache_dir().join("py-optimum"));
    assert!(p.join("optimum/onnxruntime").is_dir(), "optimum-onnx not found at {} (run launch/setup.sh)", p.display());
    p
}

/// ../shared/data (or $UNLEARN_SHARED/data).
pub fn shared_data() -> PathBuf {
    let base = std::env::var("UNLEARN_SHARED").map(PathBuf::from).unwrap_or_else(|_| repo().join("../shared"));
    base.join("data")
}

/// Run a reference script under tests/py and return its stdout; panics with stderr on failure.
pub fn run_py(script: &str, args: &[&str]) -> String {
    run_py_env(script, args, &[])
}

/// [`run_py`] with extra environment variables (e.g. a PYTHONPATH overlay).
pub fn run_py_env(script: &str, args: &[&str], env: &[(&str, &Path)]) -> String {
    let out = Command::new(python())
        .arg(repo().join("tests/py").join(script))
        .args(args)
        .env("UNLEARN_SHARED", shared_data().parent().unwrap())
        .envs(env.iter().copied())
        .output()
        .expect("spawn python");
    assert!(out.status.success(), "python {script} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
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

/// The other families, each with the parts that set it apart from Llama switched on: biases
/// (Qwen2, Qwen3's and Llama's `attention_bias`), per-head q/k norms with a head_dim that is not
/// hidden/heads (Qwen3), fused projections, partial rotation and longrope on both sides of its
/// switch (Phi-3), sliding windows that hide keys of an 11-token batch (Mistral, Qwen2 on its
/// second layer only, Phi-3).
pub const FAMILY_CASES: &[Case] = &[
    Case { name: "llama-biases", config: r#"{"attention_bias": true, "mlp_bias": true}"# },
    Case { name: "mistral", config: r#"{"model_type": "mistral", "sliding_window": null}"# },
    Case { name: "mistral-window4", config: r#"{"model_type": "mistral", "sliding_window": 4, "num_key_value_heads": 1}"# },
    Case { name: "qwen2-tied", config: r#"{"model_type": "qwen2", "tie_word_embeddings": true}"# },
    Case {
        name: "qwen2-window-layer1",
        config: r#"{"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 5, "max_window_layers": 1}"#,
    },
    Case { name: "qwen3-headdim32", config: r#"{"model_type": "qwen3", "head_dim": 32}"# },
    Case {
        name: "qwen3-bias-tied",
        config: r#"{"model_type": "qwen3", "head_dim": 16, "attention_bias": true, "tie_word_embeddings": true}"#,
    },
    Case { name: "phi3", config: r#"{"model_type": "phi3"}"# },
    Case {
        name: "phi3-partial-longrope-long",
        config: r#"{"model_type": "phi3", "partial_rotary_factor": 0.5, "max_position_embeddings": 64, "original_max_position_embeddings": 8,
                   "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 4.0, 5.0]}}"#,
    },
    Case {
        name: "phi3-longrope-short-window6",
        config: r#"{"model_type": "phi3", "sliding_window": 6, "max_position_embeddings": 256, "original_max_position_embeddings": 32,
                   "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5, 1.0, 1.5, 2.0, 2.5],
                                    "long_factor": [4.0, 3.0, 2.0, 1.0, 4.0, 3.0, 2.0, 1.0]}}"#,
    },
];

/// Three token sequences of lengths 11, 7 and 3, padded with 0 to 11 tokens; left or right aligned.
pub fn padded_batch(vocab: i64, left: bool) -> (tch::Tensor, tch::Tensor) {
    let lens = [11i64, 7, 3];
    let t = 11;
    let mut ids = vec![0i64; 3 * t as usize];
    let mut mask = vec![0i64; 3 * t as usize];
    for (r, &len) in lens.iter().enumerate() {
        for j in 0..len {
            let col = if left { t - len + j } else { j };
            let idx = r * t as usize + col as usize;
            ids[idx] = 3 + (r as i64 * 37 + j * 11) % (vocab - 3);
            mask[idx] = 1;
        }
    }
    (tch::Tensor::from_slice(&ids).view([3, t]), tch::Tensor::from_slice(&mask).view([3, t]))
}

/// transformers' logits (through `hf_ref.py logits`) for a batch, with explicit positions if given.
pub fn hf_logits(
    model_dir: &std::path::Path,
    ids: &tch::Tensor,
    mask: &tch::Tensor,
    pos: Option<&tch::Tensor>,
    dtype: &str,
) -> tch::Tensor {
    let dir = model_dir.parent().unwrap();
    let inp = dir.join(format!("inputs-{dtype}.safetensors"));
    let out = dir.join(format!("logits-{dtype}.safetensors"));
    let mut named = vec![("input_ids", ids.shallow_clone()), ("attention_mask", mask.shallow_clone())];
    if let Some(p) = pos {
        named.push(("position_ids", p.shallow_clone()));
    }
    tch::Tensor::write_safetensors(&named, &inp).unwrap();
    run_py(
        "hf_ref.py",
        &[
            "logits",
            "--model",
            model_dir.to_str().unwrap(),
            "--inputs",
            inp.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--dtype",
            dtype,
        ],
    );
    tch::Tensor::read_safetensors(&out).unwrap().remove(0).1
}

/// transformers' greedy `generate` of each prompt alone (through `hf_ref.py generate`), EOS cut.
pub fn hf_generate(model_dir: &Path, prompts: &[Vec<i64>], max_new_tokens: usize) -> Vec<Vec<i64>> {
    let tmp = tempfile::tempdir().unwrap();
    let (pfile, ofile) = (tmp.path().join("prompts.json"), tmp.path().join("hf.json"));
    std::fs::write(&pfile, serde_json::to_string(prompts).unwrap()).unwrap();
    let n = max_new_tokens.to_string();
    let args = [
        "generate",
        "--model",
        model_dir.to_str().unwrap(),
        "--prompts",
        pfile.to_str().unwrap(),
        "--out",
        ofile.to_str().unwrap(),
        "--max-new-tokens",
        &n,
    ];
    run_py("hf_ref.py", &args);
    serde_json::from_str(&std::fs::read_to_string(&ofile).unwrap()).unwrap()
}

/// The `unlearn` binary built for these tests.
pub fn unlearn_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_unlearn"))
}

/// Run `unlearn` with args; returns (success, stdout, stderr).
pub fn run_unlearn(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(unlearn_bin()).args(args).output().expect("spawn unlearn");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
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

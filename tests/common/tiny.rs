//! A tiny Llama model directory written from Rust in milliseconds (config.json, model.safetensors,
//! a byte-level BPE tokenizer.json), for tests that need a valid model to break, not transformers'
//! numbers; and small QA data files.

use std::path::{Path, PathBuf};

use serde_json::json;
use tch::{Kind, Tensor};
use unlearn::model::{param_specs, Config, ParamRole};

/// 256 byte tokens, then BOS and EOS.
pub const VOCAB: i64 = 258;

pub fn tiny_config() -> Config {
    let json = json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": false, "bos_token_id": 256, "eos_token_id": 257,
    });
    Config::from_json(&json, Path::new("tiny config.json")).expect("tiny config is valid")
}

/// The model's tensors, seeded (norms at 1, matrices small and random).
pub fn tiny_tensors(cfg: &Config, seed: i64) -> Vec<(String, Tensor)> {
    tch::manual_seed(seed);
    param_specs(cfg)
        .into_iter()
        .map(|s| {
            let t = if s.role == ParamRole::Norm {
                Tensor::ones(s.shape.as_slice(), (Kind::Float, tch::Device::Cpu))
            } else {
                Tensor::randn(s.shape.as_slice(), (Kind::Float, tch::Device::Cpu)) * 0.05
            };
            (s.name, t)
        })
        .collect()
}

pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) {
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, path).unwrap();
}

/// A byte-level BPE without merges: every byte is a token, so any UTF-8 text encodes.
pub fn tokenizer_json() -> serde_json::Value {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut vocab = serde_json::Map::new();
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    let special = |id: i64, content: &str| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(256, "<s>"), special(257, "</s>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// Write a complete tiny model directory at `dir`.
pub fn make_tiny(dir: &Path, seed: i64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = tiny_config();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg.to_hf_json()).unwrap()).unwrap();
    write_tensors(&dir.join("model.safetensors"), &tiny_tensors(&cfg, seed));
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), json!({"bos_token": "<s>", "eos_token": "</s>"}).to_string()).unwrap();
    dir.to_path_buf()
}

/// `n` short question/answer records as a JSON array.
pub fn write_qa(path: &Path, n: usize, topic: &str) -> PathBuf {
    let recs: Vec<_> = (0..n)
        .map(|i| json!({"question": format!("What is fact {i} about {topic}?"), "answer": format!("Fact {i} about {topic} is number {}.", i * 7)}))
        .collect();
    std::fs::write(path, serde_json::to_string(&recs).unwrap()).unwrap();
    path.to_path_buf()
}

/// Copy a flat directory (a model directory) to `to`.
pub fn copy_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    to.to_path_buf()
}

/// A tiny model with forget and retain data in a fresh temporary directory (removed on drop).
pub struct TinyInputs {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub model: PathBuf,
    pub forget: PathBuf,
    pub retain: PathBuf,
}

pub fn tiny_inputs() -> TinyInputs {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = make_tiny(&root.join("inputs/model"), 7);
    let forget = write_qa(&root.join("inputs/forget.json"), 8, "the forget author");
    let retain = write_qa(&root.join("inputs/retain.json"), 8, "the retain author");
    TinyInputs { _tmp: tmp, root, model, forget, retain }
}

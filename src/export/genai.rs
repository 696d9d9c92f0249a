//! `genai_config.json`, written next to a KV-cache `model.onnx` so that onnxruntime-genai
//! (`og.Model(export_dir)`) loads the directory as it loads the ones its own model builder makes.
//!
//! The fields and their defaults follow onnxruntime-genai's `Config` (src/config.h) and what its
//! builder writes (`make_genai_config` in src/python/py/models/builders/base.py): the decoder's
//! tensor names, the cache geometry, the special token ids, the context length and the search
//! defaults, with `generation_config.json` overriding `config.json` as transformers does.
//! onnxruntime-genai only decodes incrementally: a graph without past/present tensors would be fed
//! one new token per step and generate garbage, so the file is written for the cache graph only.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::proto::GraphProto;
use crate::error::{Error, IoContext, Result};
use crate::model::Config;

pub const GENAI_CONFIG_FILE: &str = "genai_config.json";

/// onnxruntime-genai's per-layer name templates (`%d` = layer index), the names optimum uses too;
/// [`genai_config`] checks that the graph has every tensor they name.
const PAST_KEY: &str = "past_key_values.%d.key";
const PAST_VALUE: &str = "past_key_values.%d.value";
const PRESENT_KEY: &str = "present.%d.key";
const PRESENT_VALUE: &str = "present.%d.value";

/// The model types onnxruntime-genai runs as a plain decoder-only LLM and that `unlearn` exports.
const GENAI_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "phi3"];

/// Search settings of `generation_config.json` that onnxruntime-genai also has, each with the
/// value it takes when the file does not set it (onnxruntime-genai's builder's defaults).
fn search_defaults() -> Map<String, Value> {
    [
        ("do_sample", json!(false)),
        ("temperature", json!(1.0)),
        ("top_k", json!(50)),
        ("top_p", json!(1.0)),
        ("repetition_penalty", json!(1.0)),
        ("num_beams", json!(1)),
        ("num_return_sequences", json!(1)),
        ("length_penalty", json!(1.0)),
        ("no_repeat_ngram_size", json!(0)),
        ("diversity_penalty", json!(0.0)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The `genai_config.json` for `graph` (built from `cfg` with a KV cache), reading `model_type`
/// from `model_dir/config.json` and the generation defaults from `generation_config.json` if any.
pub fn genai_config(model_dir: &Path, cfg: &Config, graph: &GraphProto, model_file: &str) -> Result<Value> {
    let hf_config = read_json(&model_dir.join("config.json"))?.unwrap_or_default();
    let generation = read_json(&model_dir.join("generation_config.json"))?.unwrap_or_default();
    let model_type = hf_config.get("model_type").and_then(Value::as_str).unwrap_or("llama");
    if !GENAI_TYPES.contains(&model_type) {
        return Err(Error::unsupported(
            model_dir.join("config.json"),
            format!("model_type `{model_type}` has no onnxruntime-genai equivalent (known: {})", GENAI_TYPES.join(", ")),
        ));
    }
    check_graph_names(cfg, graph)?;

    // transformers' generate() takes the special ids from generation_config.json when it sets them.
    let token = |key: &str| generation.get(key).filter(|v| !v.is_null()).cloned();
    let eos: Vec<i64> = match token("eos_token_id") {
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_i64).collect(),
        Some(v) => v.as_i64().into_iter().collect(),
        None => cfg.eos_token_ids.clone(),
    };
    let bos = token("bos_token_id").and_then(|v| v.as_i64()).or(cfg.bos_token_id);
    let pad = token("pad_token_id").and_then(|v| v.as_i64()).or(cfg.pad_token_id).or(eos.first().copied());

    let mut search = search_defaults();
    for (key, default) in search.iter_mut() {
        if let Some(v) = generation.get(key.as_str()).filter(|v| !v.is_null()) {
            *default = v.clone();
        }
    }
    search.insert("max_length".into(), json!(cfg.max_position_embeddings));
    search.insert("min_length".into(), json!(0));
    search.insert("early_stopping".into(), json!(true));
    // Sharing one max_length-sized past/present buffer needs onnxruntime's GroupQueryAttention;
    // this graph concatenates the cache with plain ONNX ops, so every step gets a fresh present.
    search.insert("past_present_share_buffer".into(), json!(false));

    let mut model = json!({
        "type": model_type,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "eos_token_id": eos,
        "decoder": {
            "filename": model_file,
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "num_hidden_layers": cfg.num_hidden_layers,
            "head_size": cfg.head_dim,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "position_ids": "position_ids",
                "past_key_names": PAST_KEY,
                "past_value_names": PAST_VALUE,
            },
            "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
        },
    });
    let m = model.as_object_mut().expect("object literal");
    if let Some(bos) = bos {
        m.insert("bos_token_id".into(), json!(bos));
    }
    if let Some(pad) = pad {
        m.insert("pad_token_id".into(), json!(pad));
    }
    Ok(json!({"model": model, "search": search}))
}

/// Every tensor name the config promises is in the graph, so a change to the graph's names
/// fails the export instead of a client's load.
fn check_graph_names(cfg: &Config, graph: &GraphProto) -> Result<()> {
    let inputs: Vec<&str> = graph.input.iter().map(|v| v.name.as_str()).collect();
    let outputs: Vec<&str> = graph.output.iter().map(|v| v.name.as_str()).collect();
    let mut want_in: Vec<String> = ["input_ids", "attention_mask", "position_ids"].map(String::from).to_vec();
    let mut want_out = vec!["logits".to_string()];
    for l in 0..cfg.num_hidden_layers as usize {
        for (past, present) in [(PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)] {
            let layer = l.to_string();
            want_in.push(past.replace("%d", &layer));
            want_out.push(present.replace("%d", &layer));
        }
    }
    let missing: Vec<&String> = want_in
        .iter()
        .filter(|n| !inputs.contains(&n.as_str()))
        .chain(want_out.iter().filter(|n| !outputs.contains(&n.as_str())))
        .collect();
    if !missing.is_empty() {
        return Err(crate::other!("genai_config.json: the exported graph lacks {missing:?} (an export bug)"));
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).at(path)?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(Error::format(path, "not a JSON object")),
        Err(e) => Err(Error::format(path, format!("invalid JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::llama::{build_graph, ExportDtype, GraphOptions};

    fn model_dir(generation: Option<Value>) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2});
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        if let Some(g) = generation {
            std::fs::write(dir.path().join("generation_config.json"), g.to_string()).unwrap();
        }
        let cfg = Config::from_json(&config, &dir.path().join("config.json")).unwrap();
        (dir, cfg)
    }

    fn graph(cfg: &Config, kv_cache: bool) -> GraphProto {
        build_graph(cfg, &GraphOptions { dtype: ExportDtype::Fp32, kv_cache, opset: 21 }).0
    }

    #[test]
    fn geometry_names_and_defaults_follow_the_model() {
        let (dir, cfg) = model_dir(None);
        let g = genai_config(dir.path(), &cfg, &graph(&cfg, true), "model.onnx").unwrap();
        let (m, d) = (&g["model"], &g["model"]["decoder"]);
        assert_eq!((m["type"].as_str(), m["context_length"].as_i64(), m["vocab_size"].as_i64()), (Some("llama"), Some(128), Some(64)));
        assert_eq!((m["bos_token_id"].as_i64(), m["eos_token_id"].clone(), m["pad_token_id"].as_i64()), (Some(1), json!([2]), Some(2)));
        assert_eq!([&d["num_hidden_layers"], &d["num_key_value_heads"], &d["head_size"]], [&json!(3), &json!(2), &json!(4)]);
        assert_eq!(d["inputs"]["past_key_names"], "past_key_values.%d.key");
        assert_eq!(d["outputs"]["present_value_names"], "present.%d.value");
        assert_eq!((g["search"]["do_sample"].as_bool(), g["search"]["max_length"].as_i64()), (Some(false), Some(128)));
        assert_eq!(g["search"]["past_present_share_buffer"], false);
    }

    #[test]
    fn generation_config_overrides_ids_and_search_settings() {
        let gen = json!({"eos_token_id": [2, 7], "pad_token_id": 0, "do_sample": true, "temperature": 0.6, "top_p": 0.9});
        let (dir, cfg) = model_dir(Some(gen));
        let g = genai_config(dir.path(), &cfg, &graph(&cfg, true), "model.onnx").unwrap();
        assert_eq!((g["model"]["eos_token_id"].clone(), g["model"]["pad_token_id"].as_i64()), (json!([2, 7]), Some(0)));
        assert_eq!((g["search"]["do_sample"].as_bool(), g["search"]["temperature"].as_f64()), (Some(true), Some(0.6)));
        assert_eq!((g["search"]["top_p"].as_f64(), g["search"]["top_k"].as_i64()), (Some(0.9), Some(50)));
    }

    #[test]
    fn a_graph_without_the_cache_is_refused() {
        let (dir, cfg) = model_dir(None);
        let err = genai_config(dir.path(), &cfg, &graph(&cfg, false), "model.onnx").unwrap_err().to_string();
        assert!(err.contains("past_key_values.0.key"), "{err}");
    }
}

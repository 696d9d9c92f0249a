//! A GGUF of architecture llama (Mistral GGUFs are llama too), qwen2, qwen3 or phi3 → an HF model
//! directory (`config.json`, f32 `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`) that [`crate::model::load_model`] and transformers load.
//!
//! Two things differ from the HF layout besides names and quantization:
//! - GGUF lists dims fastest first, so a `[in, out]` GGUF tensor is the HF `[out, in]` matrix with
//!   the same bytes order; only the shape is reversed.
//! - llama.cpp's converter permutes the rows of `q_proj` and `k_proj` within each head, from HF's
//!   rotate-half RoPE pairs `(i, i + e/2)` to the interleaved pairs `(2i, 2i + 1)` its kernels
//!   use. We undo it (per query head for q, per key/value head for k), as transformers' GGUF
//!   loader does, because our Llama is rotate-half. Qwen2, Qwen3 and Phi-3 are rotate-half in
//!   llama.cpp too ("NEOX" RoPE), so their rows are stored as in HF.
//!
//! Everything is validated before the output is created, and tensors are dequantized and written
//! one at a time into a temporary directory that appears under `out` only when complete.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::reader::GgufFile;
use super::tokenizer::hf_tokenizer_from_gguf;
use crate::error::{Error, IoContext, Result};
use crate::model::llama::param_specs;
use crate::model::weights::{write_json, HfWriter, DEFAULT_MAX_SHARD_BYTES};
use crate::model::{Config, Family};
use crate::progress::Progress;

/// Per-block HF tensor suffix → GGUF tensor suffix (llama.cpp stores Phi-3's fused gate_up
/// projection as `ffn_up`).
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.o_proj.bias", "attn_output.bias"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.gate_up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// The HF family of a GGUF architecture, and whether llama.cpp's converter permuted its q/k rows
/// to interleaved RoPE.
fn family_of(arch: &str) -> Option<(Family, bool)> {
    match arch {
        "llama" => Some((Family::Llama, true)),
        "qwen2" => Some((Family::Qwen2, false)),
        "qwen3" => Some((Family::Qwen3, false)),
        "phi3" => Some((Family::Phi3, false)),
        _ => None,
    }
}

/// The GGUF name of the HF tensor `hf` (`model.layers.3.self_attn.o_proj.weight` →
/// `blk.3.attn_output.weight`).
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let (layer, suffix) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (_, g) = BLOCK_NAMES.iter().find(|(h, _)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

/// The model shape from `{arch}.*` metadata, for the architectures of [`family_of`].
pub fn config_from_gguf(g: &GgufFile) -> Result<Config> {
    let path = g.path();
    let arch = g.get_str("general.architecture")?.ok_or_else(|| Error::format(path, "missing metadata `general.architecture`"))?;
    let Some((family, _)) = family_of(arch) else {
        return Err(Error::unsupported(path, format!("GGUF architecture `{arch}` (supported: llama, qwen2, qwen3, phi3)")));
    };
    let key = |k: &str| format!("{arch}.{k}");
    let positive = |k: &str| -> Result<i64> {
        let v = g.require_i64(&key(k))?;
        if v <= 0 {
            return Err(Error::format(path, format!("metadata `{}` must be positive, got {v}", key(k))));
        }
        Ok(v)
    };
    if g.get_i64(&key("expert_count"))?.unwrap_or(0) > 0 {
        return Err(Error::unsupported(path, format!("mixture-of-experts {arch} (`{}` > 0)", key("expert_count"))));
    }
    if let Some(scaling) = g.get_str(&key("rope.scaling.type"))? {
        if scaling != "none" {
            return Err(Error::unsupported(path, format!("RoPE scaling `{scaling}` (`{}`)", key("rope.scaling.type"))));
        }
    }
    // Phi-3.5's longrope factors travel as tensors; turning them back into config.json is not done.
    if let Some(t) = g.tensors.iter().find(|t| t.name.starts_with("rope_factors")) {
        return Err(Error::unsupported(path, format!("longrope factors (tensor `{}`) are not imported", t.name)));
    }
    let hidden_size = positive("embedding_length")?;
    let num_attention_heads = positive("attention.head_count")?;
    let num_key_value_heads = g.get_i64(&key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
    let head_dim = g.get_i64(&key("attention.key_length"))?.unwrap_or(hidden_size / num_attention_heads);
    // Phi-3 may rotate only part of each head (`partial_rotary_factor`); the others rotate all.
    let rotated = g.get_i64(&key("rope.dimension_count"))?.unwrap_or(head_dim);
    let mut checks = vec![("attention.value_length", g.get_i64(&key("attention.value_length"))?)];
    if family != Family::Phi3 {
        checks.push(("rope.dimension_count", Some(rotated)));
    }
    for (k, v) in checks {
        if let Some(v) = v.filter(|v| *v != head_dim) {
            return Err(Error::unsupported(path, format!("`{}` = {v} differs from the head dim {head_dim}", key(k))));
        }
    }
    let embd = g.tensor("token_embd.weight").ok_or_else(|| Error::MissingTensor { path: path.into(), name: "token_embd.weight".into() })?;
    let vocab_size = match g.get_i64(&key("vocab_size"))? {
        Some(v) => v,
        None => embd.dims.get(1).map(|&v| v as i64).unwrap_or(0),
    };
    let bos_token_id = g.get_i64("tokenizer.ggml.bos_token_id")?;
    let eos_token_id = g.get_i64("tokenizer.ggml.eos_token_id")?;
    let pad_token_id = g.get_i64("tokenizer.ggml.padding_token_id")?;
    let mut raw = serde_json::json!({
        "model_type": family.model_type(),
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": positive("feed_forward_length")?,
        "num_hidden_layers": positive("block_count")?,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "rms_norm_eps": g.get_f64(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| Error::format(path, format!("missing metadata `{}`", key("attention.layer_norm_rms_epsilon"))))?,
        "rope_theta": g.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
        "max_position_embeddings": positive("context_length")?,
        "tie_word_embeddings": g.tensor("output.weight").is_none(),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    });
    if family == Family::Phi3 {
        raw["partial_rotary_factor"] = (rotated as f64 / head_dim as f64).into();
        raw["sliding_window"] = g.get_i64(&key("attention.sliding_window"))?.into();
    }
    // Config's own validation (GQA divisibility, even head dim) applies to the GGUF too.
    Config::from_json(&raw, path)
}

/// Undo llama.cpp's q/k row permutation: within each of `n_heads` heads of `e` rows, GGUF row
/// `2i + j` is HF row `j * e/2 + i` (j = 0, 1). `w` is row-major with `cols` columns.
pub fn unpermute_rope_rows(w: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let e = rows / n_heads;
    let half = e / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * e + j * half + i;
                let gg = h * e + 2 * i + j;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&w[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    out
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub out: PathBuf,
    pub params: i64,
    pub layers: i64,
    pub vocab_size: i64,
    pub tensors: usize,
    /// Total size of the written directory.
    pub bytes: u64,
}

/// Import `gguf` into the HF model directory `out` (replaced if it exists), weights in f32.
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<ImportSummary> {
    let g = GgufFile::open(gguf)?;
    let cfg = config_from_gguf(&g)?;
    let tok = hf_tokenizer_from_gguf(&g, cfg.max_position_embeddings)?;
    if tok.vocab_size as i64 > cfg.vocab_size {
        return Err(Error::format(
            gguf,
            format!("the tokenizer has {} tokens but the model's vocab_size is {}", tok.vocab_size, cfg.vocab_size),
        ));
    }

    // Plan and check every tensor before anything is written.
    let specs = param_specs(&cfg);
    let mut plan = Vec::with_capacity(specs.len());
    for spec in &specs {
        let name = gguf_tensor_name(&spec.name).expect("every parameter of the layout has a GGUF name");
        let info = g.tensor(&name).ok_or_else(|| Error::MissingTensor { path: gguf.into(), name: name.clone() })?;
        if info.shape() != spec.shape {
            return Err(Error::ShapeMismatch { path: gguf.into(), name, expected: spec.shape.clone(), got: info.shape() });
        }
        g.check_dequantizable(info)?;
        plan.push((spec, info));
    }
    if let Some(extra) = g.tensors.iter().find(|t| !plan.iter().any(|(_, info)| info.name == t.name)) {
        return Err(Error::unsupported(gguf, format!("tensor `{}`: no HF counterpart", extra.name)));
    }

    let hf_config = cfg.to_hf_json();
    let mut writer = HfWriter::create(out, &hf_config, &specs, Kind::Float, DEFAULT_MAX_SHARD_BYTES)?;
    let staging = writer.staging_dir().to_path_buf();
    write_json(&staging.join("tokenizer.json"), &tok.tokenizer_json)?;
    write_json(&staging.join("tokenizer_config.json"), &tok.tokenizer_config)?;
    write_json(
        &staging.join("generation_config.json"),
        &serde_json::json!({
            "bos_token_id": hf_config["bos_token_id"],
            "eos_token_id": hf_config["eos_token_id"],
            "pad_token_id": hf_config["pad_token_id"],
        }),
    )?;

    let permuted = g.get_str("general.architecture")?.and_then(family_of).is_some_and(|(_, p)| p);
    let bar = Progress::new(plan.len() as u64, "import");
    for (spec, info) in &plan {
        let mut values = g.dequantize(info)?;
        let cols = info.dims[0] as usize;
        if permuted && spec.name.ends_with("q_proj.weight") {
            values = unpermute_rope_rows(&values, cfg.num_attention_heads as usize, cols);
        } else if permuted && spec.name.ends_with("k_proj.weight") {
            values = unpermute_rope_rows(&values, cfg.num_key_value_heads as usize, cols);
        }
        let t = Tensor::from_slice(&values).view(spec.shape.as_slice());
        drop(values);
        writer.write(&spec.name, &t)?;
        bar.inc(1);
    }
    bar.finish();
    let out = writer.finish(None)?;
    Ok(ImportSummary {
        bytes: dir_size(&out)?,
        out,
        params: specs.iter().map(|s| s.numel()).sum(),
        layers: cfg.num_hidden_layers,
        vocab_size: cfg.vocab_size,
        tensors: plan.len(),
    })
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        total += entry.metadata().at(entry.path())?.len();
    }
    Ok(total)
}

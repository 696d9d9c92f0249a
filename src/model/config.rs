//! HF `config.json` for the Llama family, parsed once into the resolved [`Config`] the model uses.
//!
//! Unknown keys are ignored (HF configs carry many harmless ones: `architectures`, `torch_dtype`,
//! `use_cache`, ...), but every key that would change the computation and that we do not
//! implement is rejected with an error naming it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// `rope_type: "llama3"` frequency rescaling (Llama-3.1/3.2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// The resolved model shape: everything the forward pass needs, nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_llama3: Option<Llama3Rope>,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
}

/// `dir/config.json`, or an error saying that `dir` is not an HF model directory.
pub fn config_path(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("config.json");
    if !path.exists() {
        return Err(Error::format(dir, "no config.json in this directory (is it an HF model directory?)"));
    }
    Ok(path)
}

impl Config {
    /// Read and validate the `config.json` of the HF model directory `dir`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&config_path(dir)?)
    }

    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::files::read_text(path)?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&raw, path)
    }

    /// Validate a parsed `config.json`; `path` is only used in error messages.
    pub fn from_json(raw: &Value, path: &Path) -> Result<Self> {
        let obj = raw.as_object().ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        let field = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let int = |key: &str| -> Result<i64> {
            field(key)
                .ok_or_else(|| Error::format(path, format!("missing required field `{key}`")))?
                .as_i64()
                .filter(|v| *v > 0)
                .ok_or_else(|| Error::format(path, format!("`{key}` must be a positive integer")))
        };
        let opt_int = |key: &str| -> Result<Option<i64>> {
            match field(key) {
                None => Ok(None),
                Some(v) => v
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| Error::format(path, format!("`{key}` must be an integer"))),
            }
        };
        let float_or = |key: &str, default: f64| -> Result<f64> {
            match field(key) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| Error::format(path, format!("`{key}` must be a number"))),
            }
        };
        let bool_or = |key: &str, default: bool| -> Result<bool> {
            match field(key) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| Error::format(path, format!("`{key}` must be true or false"))),
            }
        };

        match field("model_type").and_then(Value::as_str) {
            Some("llama") => {}
            Some(other) => {
                return Err(Error::unsupported(
                    path,
                    format!("model_type `{other}` (supported: llama)"),
                ))
            }
            None => return Err(Error::format(path, "missing required field `model_type`")),
        }
        if let Some(act) = field("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(Error::unsupported(path, format!("hidden_act {act} (supported: \"silu\")")));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if bool_or(key, false)? {
                return Err(Error::unsupported(path, format!("`{key}: true` (biases are not implemented)")));
            }
        }

        let hidden_size = int("hidden_size")?;
        let num_attention_heads = int("num_attention_heads")?;
        let num_key_value_heads = opt_int("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if field("head_dim").is_none() && hidden_size % num_attention_heads != 0 {
            return Err(Error::format(
                path,
                format!("hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads}) when head_dim is not given"),
            ));
        }
        let head_dim = opt_int("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if num_key_value_heads <= 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::format(
                path,
                format!(
                    "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(Error::format(path, format!("head_dim ({head_dim}) must be even for RoPE")));
        }

        // transformers v5 writes `rope_parameters` (theta and scaling in one dict); older files
        // write `rope_theta` plus an optional `rope_scaling`. Accept both.
        let rope_params = field("rope_parameters").or_else(|| field("rope_scaling"));
        let mut rope_theta = float_or("rope_theta", 10000.0)?;
        let mut rope_llama3 = None;
        if let Some(rp) = rope_params {
            let rp = rp
                .as_object()
                .ok_or_else(|| Error::format(path, "`rope_scaling`/`rope_parameters` must be an object"))?;
            if let Some(theta) = rp.get("rope_theta").and_then(Value::as_f64) {
                rope_theta = theta;
            }
            let kind = rp.get("rope_type").or_else(|| rp.get("type")).and_then(Value::as_str).unwrap_or("default");
            match kind {
                "default" => {}
                "llama3" => {
                    let get = |k: &str| -> Result<f64> {
                        rp.get(k).and_then(Value::as_f64).ok_or_else(|| {
                            Error::format(path, format!("rope scaling `llama3` needs a number `{k}`"))
                        })
                    };
                    rope_llama3 = Some(Llama3Rope {
                        factor: get("factor")?,
                        low_freq_factor: get("low_freq_factor")?,
                        high_freq_factor: get("high_freq_factor")?,
                        original_max_position_embeddings: get("original_max_position_embeddings")?,
                    });
                }
                other => {
                    return Err(Error::unsupported(
                        path,
                        format!("rope scaling type `{other}` (supported: default, llama3)"),
                    ))
                }
            }
        }

        let eos_token_ids = match field("eos_token_id") {
            None => vec![],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_i64).collect(),
            Some(v) => v.as_i64().into_iter().collect(),
        };

        let config = Config {
            vocab_size: int("vocab_size")?,
            hidden_size,
            intermediate_size: int("intermediate_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: float_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_llama3,
            max_position_embeddings: opt_int("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: bool_or("tie_word_embeddings", false)?,
            bos_token_id: opt_int("bos_token_id")?,
            eos_token_ids,
            // Some old Llama configs say `pad_token_id: -1` for "none".
            pad_token_id: opt_int("pad_token_id")?.filter(|&p| p != -1),
        };
        config.check_ranges(path)?;
        Ok(config)
    }

    /// Values that parse but cannot describe a model: non-positive sizes, token ids outside the
    /// vocabulary, a parameter count no machine holds (checked so that nothing is sized from it).
    fn check_ranges(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::format(path, msg));
        // Layers are listed one by one (parameter specs, buckets, graph nodes): bound them too.
        if self.num_hidden_layers > 1 << 12 {
            return bad(format!("`num_hidden_layers` is {}, above the limit of 4096", self.num_hidden_layers));
        }
        if self.head_dim <= 0 || self.max_position_embeddings <= 0 {
            return bad(format!("`head_dim` ({}) and `max_position_embeddings` ({}) must be positive", self.head_dim, self.max_position_embeddings));
        }
        let positive_finite = |v: f64| v.is_finite() && v > 0.0;
        if !positive_finite(self.rms_norm_eps) || !positive_finite(self.rope_theta) {
            return bad(format!("`rms_norm_eps` ({}) and `rope_theta` ({}) must be finite and > 0", self.rms_norm_eps, self.rope_theta));
        }
        if let Some(r) = &self.rope_llama3 {
            if ![r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings].into_iter().all(positive_finite) {
                return bad("rope scaling `llama3`: every factor must be finite and > 0".into());
            }
        }
        let ids = self.bos_token_id.iter().chain(&self.eos_token_ids).chain(&self.pad_token_id);
        if let Some(id) = ids.copied().find(|id| !(0..self.vocab_size).contains(id)) {
            return bad(format!("token id {id} (bos/eos/pad_token_id) is outside the vocabulary 0..{}", self.vocab_size));
        }
        let per_layer = [
            self.hidden_size.checked_mul(self.head_dim).and_then(|x| x.checked_mul(self.num_attention_heads + 2 * self.num_key_value_heads)),
            self.hidden_size.checked_mul(self.intermediate_size).and_then(|x| x.checked_mul(3)),
        ];
        let total = per_layer
            .into_iter()
            .try_fold(0i64, |acc, x| acc.checked_add(x?))
            .and_then(|l| l.checked_mul(self.num_hidden_layers))
            .and_then(|l| l.checked_add(self.vocab_size.checked_mul(self.hidden_size)?.checked_mul(2)?));
        const MAX_PARAMS: i64 = 1 << 42;
        if total.is_none_or(|t| t > MAX_PARAMS) {
            return bad(format!("the sizes describe more than 2^42 parameters (hidden_size {}, intermediate_size {}, layers {}, vocab_size {})",
                self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size));
        }
        Ok(())
    }

    /// A `config.json` that transformers loads into the same model.
    pub fn to_hf_json(&self) -> Value {
        let rope_scaling = match &self.rope_llama3 {
            None => Value::Null,
            Some(r) => serde_json::json!({
                "rope_type": "llama3",
                "factor": r.factor,
                "low_freq_factor": r.low_freq_factor,
                "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
            }),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        })
    }

    /// Number of query heads served by one key/value head (1 for MHA).
    pub fn kv_groups(&self) -> i64 {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Llama-2-7B (the MUSE target models' shape).
    pub fn llama2_7b() -> Self {
        Config {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_llama3: None,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: None,
        }
    }

    /// Llama-3-8B.
    pub fn llama3_8b() -> Self {
        Config {
            vocab_size: 128256,
            intermediate_size: 14336,
            num_key_value_heads: 8,
            rope_theta: 500000.0,
            max_position_embeddings: 8192,
            bos_token_id: Some(128000),
            eos_token_ids: vec![128001],
            ..Self::llama2_7b()
        }
    }
}

//! HF `config.json` of the decoder families we implement (Llama, Mistral, Qwen2/2.5, Qwen3,
//! Phi-3/3.5), parsed once into the resolved [`Config`] the model uses.
//!
//! The families are one architecture with a few switches, and this file is the only place that
//! knows which family has which: the parser turns `model_type` into feature flags (biases, q/k
//! norms, fused projections, sliding window, partial rotary), with the defaults transformers'
//! config classes apply when a key is absent. The model, the exporter and the planner read only
//! the flags.
//!
//! Unknown keys are ignored (HF configs carry many harmless ones: `architectures`, `torch_dtype`,
//! `use_cache`, ...), but every key that would change the computation and that we do not
//! implement is rejected with an error naming it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A decoder family: its `model_type` in config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
}

impl Family {
    pub const ALL: [Family; 5] = [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3, Family::Phi3];

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
        }
    }

    /// transformers' causal-LM class, written into `architectures`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    fn from_model_type(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.model_type() == name)
    }
}

/// `rope_type: "llama3"` frequency rescaling (Llama-3.1/3.2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// `rope_type: "longrope"` (Phi-3/3.5 long-context models): per-frequency divisors, the short set
/// while every position of a forward is below `original_max_position_embeddings`, the long set
/// otherwise, and cos/sin scaled by `attention_factor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: i64,
    pub attention_factor: f64,
}

/// The resolved model shape: everything the forward pass needs, nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub family: Family,
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
    #[serde(default)]
    pub rope_longrope: Option<LongRope>,
    /// Leading dims of each head that are rotated (Phi-3's `partial_rotary_factor`); `None` = all.
    #[serde(default)]
    pub rotary_dim: Option<i64>,
    /// Biases on q/k/v (Qwen2, Qwen3's and Llama's `attention_bias`), on o_proj (`attention_bias`
    /// of Llama and Qwen3), on the MLP (Llama's `mlp_bias`).
    #[serde(default)]
    pub qkv_bias: bool,
    #[serde(default)]
    pub o_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// RMSNorm of each query and key head before RoPE (Qwen3).
    #[serde(default)]
    pub qk_norm: bool,
    /// One `qkv_proj` and one `gate_up_proj` instead of q/k/v and gate/up (Phi-3).
    #[serde(default)]
    pub fused_projections: bool,
    /// Keys more than this many positions behind a query are hidden (Mistral, Phi-3, Qwen with
    /// `use_sliding_window`), in layers `sliding_window_from_layer..`.
    #[serde(default)]
    pub sliding_window: Option<i64>,
    #[serde(default)]
    pub sliding_window_from_layer: i64,
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

/// Typed reads of one config.json object; every error names the file and the key.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn err(&self, msg: String) -> Error {
        Error::format(self.path, msg)
    }
    fn int(&self, key: &str) -> Result<i64> {
        self.get(key)
            .ok_or_else(|| self.err(format!("missing required field `{key}`")))?
            .as_i64()
            .filter(|v| *v > 0)
            .ok_or_else(|| self.err(format!("`{key}` must be a positive integer")))
    }
    fn opt_int(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| self.err(format!("`{key}` must be an integer"))),
        }
    }
    fn float_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(format!("`{key}` must be a number"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(format!("`{key}` must be true or false"))),
        }
    }
    /// A positive window size; absent gives `absent`, an explicit `null` gives `None`.
    fn window(&self, key: &str, absent: Option<i64>) -> Result<Option<i64>> {
        match self.obj.get(key) {
            None => Ok(absent),
            Some(Value::Null) => Ok(None),
            Some(v) => {
                v.as_i64().filter(|w| *w > 0).map(Some).ok_or_else(|| self.err(format!("`{key}` must be a positive integer or null")))
            }
        }
    }
}

/// The per-family switch: which optional parts a family's blocks have, and the defaults its
/// transformers config class uses for absent keys.
struct FamilyTraits {
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    qk_norm: bool,
    fused_projections: bool,
    default_head_dim: Option<i64>,
    default_rms_norm_eps: f64,
}

impl FamilyTraits {
    fn of(family: Family, f: &Fields) -> Result<Self> {
        let base = FamilyTraits {
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            fused_projections: false,
            default_head_dim: None,
            default_rms_norm_eps: 1e-6,
        };
        Ok(match family {
            Family::Llama => {
                let attention_bias = f.bool_or("attention_bias", false)?;
                FamilyTraits { qkv_bias: attention_bias, o_bias: attention_bias, mlp_bias: f.bool_or("mlp_bias", false)?, ..base }
            }
            // MistralAttention and Phi3Attention build their projections without biases whatever
            // the config says.
            Family::Mistral => base,
            Family::Qwen2 => FamilyTraits { qkv_bias: true, ..base },
            Family::Qwen3 => {
                let attention_bias = f.bool_or("attention_bias", false)?;
                FamilyTraits { qkv_bias: attention_bias, o_bias: attention_bias, qk_norm: true, default_head_dim: Some(128), ..base }
            }
            Family::Phi3 => FamilyTraits { fused_projections: true, default_rms_norm_eps: 1e-5, ..base },
        })
    }
}

impl Config {
    /// Read and validate the `config.json` of the HF model directory `dir`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&config_path(dir)?)
    }

    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::files::read_text(path)?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&raw, path)
    }

    /// Validate a parsed `config.json`; `path` is only used in error messages.
    pub fn from_json(raw: &Value, path: &Path) -> Result<Self> {
        let obj = raw.as_object().ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        let f = Fields { obj, path };

        let family = match f.get("model_type").and_then(Value::as_str) {
            Some(name) => Family::from_model_type(name).ok_or_else(|| {
                let supported: Vec<&str> = Family::ALL.iter().map(|f| f.model_type()).collect();
                Error::unsupported(path, format!("model_type `{name}` (supported: {})", supported.join(", ")))
            })?,
            None => return Err(Error::format(path, "missing required field `model_type`")),
        };
        if let Some(act) = f.get("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(Error::unsupported(path, format!("hidden_act {act} (supported: \"silu\")")));
            }
        }
        let traits = FamilyTraits::of(family, &f)?;

        let hidden_size = f.int("hidden_size")?;
        let num_attention_heads = f.int("num_attention_heads")?;
        let num_hidden_layers = f.int("num_hidden_layers")?;
        let num_key_value_heads = f.opt_int("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let given_head_dim = f.opt_int("head_dim")?.or(traits.default_head_dim);
        if given_head_dim.is_none() && hidden_size % num_attention_heads != 0 {
            return Err(Error::format(
                path,
                format!("hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads}) when head_dim is not given"),
            ));
        }
        let head_dim = given_head_dim.unwrap_or(hidden_size / num_attention_heads);
        if num_key_value_heads <= 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::format(
                path,
                format!("num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"),
            ));
        }
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(Error::format(path, format!("head_dim ({head_dim}) must be even for RoPE")));
        }
        let max_position_embeddings = f.opt_int("max_position_embeddings")?.unwrap_or(2048);

        // Phi-3 alone rotates only the leading `partial_rotary_factor` of each head; the other
        // families' transformers code ignores the key.
        let rotary_dim = if family == Family::Phi3 {
            let in_rope = f.get("rope_parameters").or_else(|| f.get("rope_scaling")).and_then(|r| r.get("partial_rotary_factor"));
            let factor = match in_rope.filter(|v| !v.is_null()) {
                Some(v) => v.as_f64().ok_or_else(|| f.err("`partial_rotary_factor` must be a number".into()))?,
                None => f.float_or("partial_rotary_factor", 1.0)?,
            };
            let dim = (head_dim as f64 * factor) as i64;
            if !(factor > 0.0 && factor <= 1.0) || dim % 2 != 0 || dim == 0 {
                return Err(Error::unsupported(
                    path,
                    format!("`partial_rotary_factor` {factor}: rotated dims {dim} of head_dim {head_dim} must be even and positive"),
                ));
            }
            (dim != head_dim).then_some(dim)
        } else {
            None
        };
        let rope = parse_rope(&f, family, max_position_embeddings, rotary_dim.unwrap_or(head_dim))?;
        let (sliding_window, sliding_window_from_layer) = parse_sliding_window(&f, family, num_hidden_layers)?;

        let eos_token_ids = match f.get("eos_token_id") {
            None => vec![],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_i64).collect(),
            Some(v) => v.as_i64().into_iter().collect(),
        };

        let config = Config {
            family,
            vocab_size: f.int("vocab_size")?,
            hidden_size,
            intermediate_size: f.int("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.float_or("rms_norm_eps", traits.default_rms_norm_eps)?,
            rope_theta: rope.theta,
            rope_llama3: rope.llama3,
            rope_longrope: rope.longrope,
            rotary_dim,
            qkv_bias: traits.qkv_bias,
            o_bias: traits.o_bias,
            mlp_bias: traits.mlp_bias,
            qk_norm: traits.qk_norm,
            fused_projections: traits.fused_projections,
            sliding_window,
            sliding_window_from_layer,
            max_position_embeddings,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            bos_token_id: f.opt_int("bos_token_id")?,
            eos_token_ids,
            // Some old Llama configs say `pad_token_id: -1` for "none".
            pad_token_id: f.opt_int("pad_token_id")?.filter(|&p| p != -1),
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
            return bad(format!(
                "`head_dim` ({}) and `max_position_embeddings` ({}) must be positive",
                self.head_dim, self.max_position_embeddings
            ));
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
            self.hidden_size
                .checked_mul(self.head_dim)
                .and_then(|x| x.checked_mul(self.num_attention_heads + 2 * self.num_key_value_heads)),
            self.hidden_size.checked_mul(self.intermediate_size).and_then(|x| x.checked_mul(3)),
        ];
        let total = per_layer
            .into_iter()
            .try_fold(0i64, |acc, x| acc.checked_add(x?))
            .and_then(|l| l.checked_mul(self.num_hidden_layers))
            .and_then(|l| l.checked_add(self.vocab_size.checked_mul(self.hidden_size)?.checked_mul(2)?));
        const MAX_PARAMS: i64 = 1 << 42;
        if total.is_none_or(|t| t > MAX_PARAMS) {
            return bad(format!(
                "the sizes describe more than 2^42 parameters (hidden_size {}, intermediate_size {}, layers {}, vocab_size {})",
                self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
            ));
        }
        Ok(())
    }

    /// Rotated dims of each head (all of `head_dim` unless the config says otherwise).
    pub fn rotary_dim(&self) -> i64 {
        self.rotary_dim.unwrap_or(self.head_dim)
    }

    /// The attention window of layer `l` (`None`: it sees every earlier key).
    pub fn layer_window(&self, l: usize) -> Option<i64> {
        self.sliding_window.filter(|_| l as i64 >= self.sliding_window_from_layer)
    }

    /// A `config.json` that transformers loads into the same model.
    pub fn to_hf_json(&self) -> Value {
        let mut rope_scaling = Value::Null;
        if let Some(r) = &self.rope_llama3 {
            rope_scaling = serde_json::json!({
                "rope_type": "llama3",
                "factor": r.factor,
                "low_freq_factor": r.low_freq_factor,
                "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
            });
        }
        if let Some(r) = &self.rope_longrope {
            rope_scaling = serde_json::json!({
                "rope_type": "longrope",
                "short_factor": r.short_factor,
                "long_factor": r.long_factor,
                "attention_factor": r.attention_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
            });
        }
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        let mut v = serde_json::json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
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
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        });
        let obj = v.as_object_mut().expect("an object");
        let mut set = |k: &str, val: Value| {
            obj.insert(k.to_string(), val);
        };
        match self.family {
            Family::Llama => {
                set("attention_bias", self.qkv_bias.into());
                set("mlp_bias", self.mlp_bias.into());
            }
            Family::Mistral => set("sliding_window", self.sliding_window.into()),
            Family::Qwen2 | Family::Qwen3 => {
                if self.family == Family::Qwen3 {
                    set("attention_bias", self.qkv_bias.into());
                }
                set("use_sliding_window", self.sliding_window.is_some().into());
                set("sliding_window", self.sliding_window.into());
                set("max_window_layers", self.sliding_window_from_layer.into());
            }
            Family::Phi3 => {
                set("sliding_window", self.sliding_window.into());
                set("partial_rotary_factor", (self.rotary_dim() as f64 / self.head_dim as f64).into());
                if let Some(r) = &self.rope_longrope {
                    set("original_max_position_embeddings", r.original_max_position_embeddings.into());
                }
            }
        }
        v
    }

    /// Number of query heads served by one key/value head (1 for MHA).
    pub fn kv_groups(&self) -> i64 {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Llama-2-7B (the MUSE target models' shape).
    pub fn llama2_7b() -> Self {
        Config {
            family: Family::Llama,
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
            rope_longrope: None,
            rotary_dim: None,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            fused_projections: false,
            sliding_window: None,
            sliding_window_from_layer: 0,
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

    /// HuggingFaceH4/zephyr-7b-beta (Mistral-7B-v0.1 architecture; the WMDP target).
    pub fn zephyr_7b_beta() -> Self {
        Config {
            family: Family::Mistral,
            intermediate_size: 14336,
            num_key_value_heads: 8,
            sliding_window: Some(4096),
            max_position_embeddings: 32768,
            pad_token_id: Some(2),
            ..Self::llama2_7b()
        }
    }

    /// Qwen/Qwen2.5-7B-Instruct.
    pub fn qwen2_5_7b() -> Self {
        Config {
            family: Family::Qwen2,
            vocab_size: 152064,
            hidden_size: 3584,
            intermediate_size: 18944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            qkv_bias: true,
            max_position_embeddings: 32768,
            sliding_window_from_layer: 28,
            bos_token_id: Some(151643),
            eos_token_ids: vec![151645],
            ..Self::llama2_7b()
        }
    }

    /// microsoft/Phi-3.5-mini-instruct. Its longrope factors are left out: they change the
    /// rotary angles, not the shape, and a preset is only ever used for shapes (`unlearn plan`).
    pub fn phi3_5_mini() -> Self {
        Config {
            family: Family::Phi3,
            vocab_size: 32064,
            hidden_size: 3072,
            intermediate_size: 8192,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 96,
            fused_projections: true,
            sliding_window: Some(262144),
            max_position_embeddings: 131072,
            eos_token_ids: vec![32000],
            pad_token_id: Some(32000),
            ..Self::llama2_7b()
        }
    }
}

/// Rotary settings from `rope_parameters` (transformers v5) or `rope_theta` + `rope_scaling`.
struct Rope {
    theta: f64,
    llama3: Option<Llama3Rope>,
    longrope: Option<LongRope>,
}

fn parse_rope(f: &Fields, family: Family, max_position_embeddings: i64, rotary_dim: i64) -> Result<Rope> {
    let path = f.path;
    let mut rope = Rope { theta: f.float_or("rope_theta", 10000.0)?, llama3: None, longrope: None };
    let Some(rp) = f.get("rope_parameters").or_else(|| f.get("rope_scaling")) else { return Ok(rope) };
    let rp = rp.as_object().ok_or_else(|| Error::format(path, "`rope_scaling`/`rope_parameters` must be an object"))?;
    if let Some(theta) = rp.get("rope_theta").and_then(Value::as_f64) {
        rope.theta = theta;
    }
    let number = |k: &str| -> Option<f64> { rp.get(k).and_then(Value::as_f64) };
    let mut kind = rp.get("rope_type").or_else(|| rp.get("type")).and_then(Value::as_str).unwrap_or("default");
    // Phi3Config renames the scaling types of older Phi-3 files.
    if family == Family::Phi3 && (kind == "su" || kind == "yarn") {
        kind = "longrope";
    }
    match kind {
        "default" => {}
        "llama3" => {
            let get = |k: &str| -> Result<f64> {
                number(k).ok_or_else(|| Error::format(path, format!("rope scaling `llama3` needs a number `{k}`")))
            };
            rope.llama3 = Some(Llama3Rope {
                factor: get("factor")?,
                low_freq_factor: get("low_freq_factor")?,
                high_freq_factor: get("high_freq_factor")?,
                original_max_position_embeddings: get("original_max_position_embeddings")?,
            });
        }
        "longrope" => {
            let factors = |k: &str| -> Result<Vec<f64>> {
                let list = rp
                    .get(k)
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                    .ok_or_else(|| Error::format(path, format!("rope scaling `longrope` needs a list of numbers `{k}`")))?;
                if list.len() as i64 != rotary_dim / 2 {
                    return Err(Error::format(
                        path,
                        format!("rope scaling `{k}` has {} entries, expected rotated dims / 2 = {}", list.len(), rotary_dim / 2),
                    ));
                }
                Ok(list)
            };
            // As transformers: Phi-3's top-level key wins, then the one in the rope dict, then
            // the model's maximum length.
            let original = match f.opt_int("original_max_position_embeddings")? {
                Some(v) => v,
                None => number("original_max_position_embeddings").map(|v| v as i64).unwrap_or(max_position_embeddings),
            };
            if original <= 0 {
                return Err(Error::format(path, "`original_max_position_embeddings` must be positive"));
            }
            let factor = number("factor").unwrap_or(max_position_embeddings as f64 / original as f64);
            let attention_factor = match number("attention_factor") {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            rope.longrope = Some(LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            });
        }
        other => return Err(Error::unsupported(path, format!("rope scaling type `{other}` (supported: default, llama3, longrope)"))),
    }
    Ok(rope)
}

/// `(window, first windowed layer)` as each family's transformers code applies it: every layer of
/// Mistral (window 4096 when the key is absent) and Phi-3; with Qwen's `use_sliding_window`, the
/// layers from `max_window_layers` on, or those `layer_types` marks `sliding_attention`.
fn parse_sliding_window(f: &Fields, family: Family, layers: i64) -> Result<(Option<i64>, i64)> {
    match family {
        Family::Llama => Ok((None, 0)),
        Family::Mistral => Ok((f.window("sliding_window", Some(4096))?, 0)),
        Family::Phi3 => Ok((f.window("sliding_window", None)?, 0)),
        Family::Qwen2 | Family::Qwen3 => {
            if !f.bool_or("use_sliding_window", false)? {
                return Ok((None, 0));
            }
            let Some(window) = f.window("sliding_window", Some(4096))? else { return Ok((None, 0)) };
            let from = match f.get("layer_types") {
                None => f.opt_int("max_window_layers")?.unwrap_or(28),
                Some(v) => {
                    let types: Vec<&str> = v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
                    let first = types.iter().position(|t| *t == "sliding_attention").unwrap_or(types.len());
                    let suffix_only =
                        types[first..].iter().all(|t| *t == "sliding_attention") && types[..first].iter().all(|t| *t == "full_attention");
                    if types.len() as i64 != layers || !suffix_only {
                        return Err(Error::unsupported(
                            f.path,
                            "`layer_types`: only full-attention layers followed by sliding-attention layers, one entry per layer, are implemented",
                        ));
                    }
                    first as i64
                }
            };
            Ok((Some(window).filter(|_| from < layers), from.max(0)))
        }
    }
}

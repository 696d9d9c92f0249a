//! onnxruntime through the `ort` crate: the shared library is loaded explicitly from
//! `ORT_DYLIB_PATH` (ort would otherwise load it lazily and panic when it is missing or too old),
//! a decoder session is opened and its signature read, checked against a model's config, and run
//! one step at a time with the KV cache fed back as it comes out.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::llama::{past_name, present_name};
use super::META_CONFIG;
use crate::error::{Error, Result};
use crate::model::Config;

static ENV: OnceLock<Environment> = OnceLock::new();

/// The process-wide onnxruntime environment, loading `$ORT_DYLIB_PATH` on first use.
pub fn environment() -> Result<&'static Environment> {
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let lib = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).ok_or_else(|| {
        crate::other!(
            "ORT_DYLIB_PATH is not set: point it at libonnxruntime.so (launch/env.sh sets it to the one in the onnxruntime wheel)"
        )
    })?;
    if !lib.is_file() {
        return Err(Error::format(&lib, "ORT_DYLIB_PATH names no file (expected libonnxruntime.so.1.30 or newer)"));
    }
    let builder = ort::init_from(&lib).map_err(|e| Error::format(&lib, format!("cannot load onnxruntime: {e}")))?;
    let env =
        builder.with_name("unlearn").build().map_err(|e| Error::format(&lib, format!("cannot create an onnxruntime environment: {e}")))?;
    Ok(ENV.get_or_init(|| env))
}

/// Floating-point type of the graph's logits and cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Float {
    F32,
    F16,
}

/// Shape of the graph's `past_key_values.*` inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub heads: i64,
    pub head_dim: i64,
}

/// The cache between steps: `present.{l}.key`, `present.{l}.value` for each layer, in order.
pub struct Past(Vec<DynValue>);

/// One step's results: logits `[b, s, v]` as fp32 and the cache to feed back.
pub struct StepOutput {
    pub logits: Vec<f32>,
    pub vocab: usize,
    pub present: Option<Past>,
}

pub struct Decoder {
    session: Session,
    path: PathBuf,
    float: Float,
    vocab: Option<i64>,
    has_position_ids: bool,
    kv: Option<KvShape>,
}

fn tensor_type(v: &ValueType) -> Option<(TensorElementType, &[i64])> {
    match v {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape)),
        _ => None,
    }
}

impl Decoder {
    /// Open `path` (a `model.onnx`) with `threads` intra-op threads and read its signature.
    pub fn open(path: &Path, threads: usize) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::format(path, "no such ONNX file"));
        }
        let env = environment()?;
        let fail = |what: &str, e: &dyn std::fmt::Display| Error::format(path, format!("onnxruntime: {what}: {e}"));
        let mut builder = Session::builder(env).map_err(|e| fail("session options", &e))?;
        if threads > 0 {
            builder = builder.with_intra_threads(threads).map_err(|e| fail("threads", &e))?;
        }
        let session = builder.commit_from_file(path).map_err(|e| fail("cannot load the model", &e))?;
        Self::from_session(session, path)
    }

    fn from_session(session: Session, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::format(path, msg);
        let names: Vec<String> = session.inputs().iter().map(|i| i.name().to_string()).collect();
        for required in ["input_ids", "attention_mask"] {
            let input = session
                .inputs()
                .iter()
                .find(|i| i.name() == required)
                .ok_or_else(|| bad(format!("has no input `{required}`; not a decoder language-model export (inputs: {names:?})")))?;
            if tensor_type(input.dtype()).map(|t| t.0) != Some(TensorElementType::Int64) {
                return Err(bad(format!("input `{required}` must be int64, found {:?}", input.dtype())));
            }
        }
        let has_position_ids = names.iter().any(|n| n == "position_ids");
        let logits = session.outputs().iter().find(|o| o.name() == "logits").ok_or_else(|| bad("has no output `logits`".into()))?;
        let (ty, shape) = tensor_type(logits.dtype()).ok_or_else(|| bad("output `logits` is not a tensor".into()))?;
        let float = match ty {
            TensorElementType::Float32 => Float::F32,
            TensorElementType::Float16 => Float::F16,
            other => return Err(bad(format!("output `logits` has type {other:?}; expected float32 or float16"))),
        };
        if shape.len() != 3 {
            return Err(bad(format!("output `logits` has rank {}, expected [batch, sequence, vocab]", shape.len())));
        }
        let vocab = (shape[2] >= 0).then_some(shape[2]);

        let n_past = names.iter().filter(|n| n.starts_with("past_key_values.")).count();
        let kv = if n_past == 0 {
            None
        } else {
            let layers = n_past / 2;
            let mut dims = None;
            for l in 0..layers {
                for kv in ["key", "value"] {
                    let name = past_name(l, kv);
                    let input = session
                        .inputs()
                        .iter()
                        .find(|i| i.name() == name)
                        .ok_or_else(|| bad(format!("has {n_past} past_key_values inputs but no `{name}`")))?;
                    let shape = tensor_type(input.dtype()).map(|t| t.1.to_vec()).unwrap_or_default();
                    if shape.len() != 4 || shape[1] < 0 || shape[3] < 0 {
                        return Err(bad(format!("input `{name}` has shape {shape:?}, expected [batch, heads, past, head_dim]")));
                    }
                    dims.get_or_insert((shape[1], shape[3]));
                    if !session.outputs().iter().any(|o| o.name() == present_name(l, kv)) {
                        return Err(bad(format!("has input `{name}` but no output `{}`", present_name(l, kv))));
                    }
                }
            }
            let (heads, head_dim) = dims.expect("at least one layer");
            Some(KvShape { layers, heads, head_dim })
        };
        for n in &names {
            let known = ["input_ids", "attention_mask", "position_ids"].contains(&n.as_str()) || n.starts_with("past_key_values.");
            if !known {
                return Err(bad(format!("has an input `{n}` this runner does not know how to feed")));
            }
        }
        Ok(Decoder { session, path: path.to_path_buf(), float, vocab, has_position_ids, kv })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn float(&self) -> Float {
        self.float
    }
    pub fn kv(&self) -> Option<KvShape> {
        self.kv
    }

    /// A custom metadata property of the model file.
    pub fn metadata(&self, key: &str) -> Option<String> {
        self.session.metadata().ok()?.custom(key)
    }

    /// Refuse a graph that cannot belong to the model described by `cfg` (read from `cfg_path`):
    /// vocabulary, cache shape, and, for unlearn exports, every architecture field.
    pub fn check_against(&self, cfg: &Config, cfg_path: &Path) -> Result<()> {
        let mut diffs = vec![];
        if let Some(v) = self.vocab {
            if v != cfg.vocab_size {
                diffs.push(format!("vocabulary: ONNX logits have {v} entries, the model {}", cfg.vocab_size));
            }
        }
        if let Some(kv) = self.kv {
            let ours = (cfg.num_hidden_layers as usize, cfg.num_key_value_heads, cfg.head_dim);
            if (kv.layers, kv.heads, kv.head_dim) != ours {
                diffs.push(format!(
                    "KV cache: ONNX has {} layers x {} heads x {} dims, the model {} x {} x {}",
                    kv.layers, kv.heads, kv.head_dim, ours.0, ours.1, ours.2
                ));
            }
        }
        match self.metadata(META_CONFIG) {
            Some(text) => {
                let theirs: Config = serde_json::from_str(&text)
                    .map_err(|e| Error::format(&self.path, format!("metadata `{META_CONFIG}` is not a config: {e}")))?;
                diffs.extend(architecture_diffs(&theirs, cfg));
            }
            None => tracing::warn!(
                "{}: not exported by unlearn (no `{META_CONFIG}` metadata); matched to the model by its inputs/outputs only",
                self.path.display()
            ),
        }
        if diffs.is_empty() {
            return Ok(());
        }
        Err(Error::format(&self.path, format!("was not exported from the model of {}: {}", cfg_path.display(), diffs.join("; "))))
    }

    /// A zero-length cache for the first step.
    pub fn empty_past(&self, batch: usize) -> Result<Option<Past>> {
        let Some(kv) = self.kv else { return Ok(None) };
        let shape = [batch as i64, kv.heads, 0, kv.head_dim];
        let mut values = Vec::with_capacity(2 * kv.layers);
        for _ in 0..2 * kv.layers {
            let v = match self.float {
                Float::F32 => Tensor::<f32>::from_array((shape, Vec::new())).map(|t| t.into_dyn()),
                Float::F16 => Tensor::<half::f16>::from_array((shape, Vec::new())).map(|t| t.into_dyn()),
            };
            values.push(v.map_err(|e| self.err("empty cache", e))?);
        }
        Ok(Some(Past(values)))
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::format(&self.path, format!("onnxruntime: {what}: {e}"))
    }

    /// One forward: `ids`, `pos` are `[batch, s]`, `mask` is `[batch, past + s]` (row-major).
    pub fn run(&mut self, ids: &[i64], mask: &[i64], pos: &[i64], batch: usize, past: Option<Past>) -> Result<StepOutput> {
        let s = ids.len() / batch;
        let t = mask.len() / batch;
        let int = |data: &[i64], cols: usize| Tensor::<i64>::from_array(([batch, cols], data.to_vec()));
        let mut inputs: Vec<(String, SessionInputValue<'_>)> = vec![
            ("input_ids".into(), int(ids, s).map_err(|e| self.err("input_ids", e))?.into()),
            ("attention_mask".into(), int(mask, t).map_err(|e| self.err("attention_mask", e))?.into()),
        ];
        if self.has_position_ids {
            inputs.push(("position_ids".into(), int(pos, s).map_err(|e| self.err("position_ids", e))?.into()));
        }
        let layers = self.kv.map_or(0, |kv| kv.layers);
        if layers > 0 {
            let past = past.ok_or_else(|| self.err("run", "this graph needs past_key_values (use empty_past)"))?;
            for (i, v) in past.0.into_iter().enumerate() {
                let name = past_name(i / 2, if i % 2 == 0 { "key" } else { "value" });
                inputs.push((name, SessionInputValue::from(v)));
            }
        }
        let float = self.float;
        let path = self.path.clone();
        let err = |what: &str, e: &dyn std::fmt::Display| Error::format(&path, format!("onnxruntime: {what}: {e}"));
        let mut outputs = self.session.run(inputs).map_err(|e| err("run", &e))?;
        let logits = &outputs["logits"];
        let (shape, logits) = match float {
            Float::F32 => {
                let (shape, data) = logits.try_extract_tensor::<f32>().map_err(|e| err("logits", &e))?;
                (shape.to_vec(), data.to_vec())
            }
            Float::F16 => {
                let (shape, data) = logits.try_extract_tensor::<half::f16>().map_err(|e| err("logits", &e))?;
                (shape.to_vec(), data.iter().map(|x| x.to_f32()).collect())
            }
        };
        if shape.len() != 3 || shape[0] as usize != batch || shape[1] as usize != s {
            return Err(err("logits", &format!("shape {shape:?}, expected [{batch}, {s}, vocab]")));
        }
        let present = if layers > 0 {
            let mut values = Vec::with_capacity(2 * layers);
            for l in 0..layers {
                for kv in ["key", "value"] {
                    let name = present_name(l, kv);
                    values.push(outputs.remove(name.as_str()).ok_or_else(|| err("run", &format!("no output `{name}`")))?);
                }
            }
            Some(Past(values))
        } else {
            None
        };
        Ok(StepOutput { logits, vocab: shape[2] as usize, present })
    }
}

/// Architecture fields that differ between two configs, as readable lines.
fn architecture_diffs(onnx: &Config, model: &Config) -> Vec<String> {
    let mut out = vec![];
    let mut cmp = |field: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{field}: ONNX {a}, model {b}"));
        }
    };
    cmp("model_type", onnx.family.model_type().into(), model.family.model_type().into());
    cmp("vocab_size", onnx.vocab_size.to_string(), model.vocab_size.to_string());
    cmp("hidden_size", onnx.hidden_size.to_string(), model.hidden_size.to_string());
    cmp("intermediate_size", onnx.intermediate_size.to_string(), model.intermediate_size.to_string());
    cmp("num_hidden_layers", onnx.num_hidden_layers.to_string(), model.num_hidden_layers.to_string());
    cmp("num_attention_heads", onnx.num_attention_heads.to_string(), model.num_attention_heads.to_string());
    cmp("num_key_value_heads", onnx.num_key_value_heads.to_string(), model.num_key_value_heads.to_string());
    cmp("head_dim", onnx.head_dim.to_string(), model.head_dim.to_string());
    cmp("rms_norm_eps", onnx.rms_norm_eps.to_string(), model.rms_norm_eps.to_string());
    cmp("rope_theta", onnx.rope_theta.to_string(), model.rope_theta.to_string());
    cmp("rope_scaling", format!("{:?}", onnx.rope_llama3), format!("{:?}", model.rope_llama3));
    cmp("longrope", format!("{:?}", onnx.rope_longrope), format!("{:?}", model.rope_longrope));
    cmp("rotary dims", onnx.rotary_dim().to_string(), model.rotary_dim().to_string());
    let biases = |c: &Config| format!("qkv {}, o {}, mlp {}", c.qkv_bias, c.o_bias, c.mlp_bias);
    cmp("biases", biases(onnx), biases(model));
    let window = |c: &Config| format!("{:?} from layer {}", c.sliding_window, c.sliding_window_from_layer);
    cmp("sliding_window", window(onnx), window(model));
    cmp("tie_word_embeddings", onnx.tie_word_embeddings.to_string(), model.tie_word_embeddings.to_string());
    out
}

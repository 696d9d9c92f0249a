//! The Llama decoder (and its family variants) as an ONNX graph of plain ops, computing what
//! `model::llama` (and transformers' `modeling_{llama,mistral,qwen2,qwen3,phi3}.py`) computes:
//! RMSNorm in fp32, rotate-half RoPE from `position_ids` (inv_freq from [`rope_inv_freq`], llama3
//! rescaling, longrope's short/long switch and partial rotation included), grouped-query
//! attention with a causal + padding mask (and a sliding window where the config has one),
//! SwiGLU MLP, optional tied head; biases, per-head q/k norms and fused `qkv_proj` /
//! `gate_up_proj` where the config's [`Layout`] has them.
//!
//! Interface (the names optimum and onnxruntime-genai use, so their runtimes can drive it):
//! inputs `input_ids`, `position_ids` `[batch_size, sequence_length]`, `attention_mask`
//! `[batch_size, total_sequence_length]` (int64); with a KV cache also
//! `past_key_values.{l}.key|value` `[batch_size, g, past_sequence_length, e]`; outputs `logits`
//! `[batch_size, sequence_length, v]` and, with a cache, `present.{l}.key|value`
//! `[batch_size, g, total_sequence_length, e]` (keys after RoPE, as transformers caches them).
//!
//! Shape legend: b batch, s new positions, t = past + s keys, n = b·s rows, d hidden, h query
//! heads, g key/value heads, r = h/g, m = r·s, e head dim, v vocab.
//!
//! Layout choices: hidden states travel as `[n, d]` so every projection is one `Gemm` with
//! `transB = 1` on the HF `[out, in]` weight (no transposed copies; a tied head reuses the
//! embedding initializer). GQA never materialises repeated keys: queries are viewed as
//! `[b, g, r·s, e]` and multiplied against `[b, g, e, t]` keys, which broadcasts the group.
//! In fp16 the norms and the softmax (mask added) run in fp32 between `Cast`s. Fused projections
//! are one `Gemm` followed by a `Split`, as transformers slices them. A sliding window is a second
//! additive mask, built once and used by the windowed layers; the graph applies it at any length,
//! so the export is exact beyond the window too. Longrope's switch is computed from the largest
//! position of each run; a client's KV cache filled before the switch keeps short-factor keys,
//! whereas transformers (and `model::llama`) recompute the cache there.

use std::collections::HashMap;

use tch::Device;

use super::graph::{attr_int, GraphBuilder, WeightDecl};
use super::proto::{data_type, Dim, GraphProto};
use crate::model::layout::{Layout, ParamDesc, Slot};
use crate::model::llama::{rope_inv_freq, rope_inv_freq_long};
use crate::model::Config;

/// Element type of the exported weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    Fp32,
    Fp16,
}

impl ExportDtype {
    pub fn parse(name: &str) -> crate::Result<Self> {
        match name {
            "fp32" | "float32" | "f32" => Ok(ExportDtype::Fp32),
            "fp16" | "float16" | "f16" => Ok(ExportDtype::Fp16),
            other => Err(crate::other!("unknown export dtype `{other}` (expected fp32 or fp16)")),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ExportDtype::Fp32 => "fp32",
            ExportDtype::Fp16 => "fp16",
        }
    }
    pub fn data_type(self) -> i32 {
        match self {
            ExportDtype::Fp32 => data_type::FLOAT,
            ExportDtype::Fp16 => data_type::FLOAT16,
        }
    }
    pub fn kind(self) -> tch::Kind {
        match self {
            ExportDtype::Fp32 => tch::Kind::Float,
            ExportDtype::Fp16 => tch::Kind::Half,
        }
    }
}

/// What to build.
#[derive(Debug, Clone, Copy)]
pub struct GraphOptions {
    pub dtype: ExportDtype,
    pub kv_cache: bool,
    pub opset: i64,
}

const BATCH: Dim = Dim::Named("batch_size");
const SEQ: Dim = Dim::Named("sequence_length");
const PAST: Dim = Dim::Named("past_sequence_length");
const TOTAL: Dim = Dim::Named("total_sequence_length");

/// Graph input/output names of layer `l`'s cache, as optimum names them.
pub fn past_name(l: usize, kv: &str) -> String {
    format!("past_key_values.{l}.{kv}")
}
pub fn present_name(l: usize, kv: &str) -> String {
    format!("present.{l}.{kv}")
}

/// Weight names by slot, declared (in layout order) for one block or for the outer parameters.
struct Weights(HashMap<Slot, String>);

impl Weights {
    fn declare(b: &mut GraphBuilder, descs: &[ParamDesc], name: impl Fn(&ParamDesc) -> String, dt: i32) -> Self {
        Weights(descs.iter().map(|d| (d.slot, b.weight(&name(d), &d.shape, dt))).collect())
    }
    fn get(&self, slot: Slot) -> &str {
        self.0.get(&slot).unwrap_or_else(|| panic!("{slot:?} is not in this model's layout"))
    }
    fn opt(&self, slot: Slot) -> Option<&str> {
        self.0.get(&slot).map(String::as_str)
    }
}

/// Build the graph; the weights it declares (HF names, in [`crate::model::param_specs`] order,
/// straight from the model's [`Layout`]) are returned for the writer to stream.
pub fn build_graph(cfg: &Config, opts: &GraphOptions) -> (GraphProto, Vec<WeightDecl>) {
    let dt = opts.dtype.data_type();
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let layout = Layout::new(cfg);
    let mut b = GraphBuilder::new(opts.opset);
    b.set_scope("model");

    let ids = b.input("input_ids", data_type::INT64, &[BATCH, SEQ]);
    let mask = b.input("attention_mask", data_type::INT64, &[BATCH, TOTAL]);
    let pos = b.input("position_ids", data_type::INT64, &[BATCH, SEQ]);
    let kv_dims = |len| [BATCH, Dim::Fixed(cfg.num_key_value_heads), len, Dim::Fixed(cfg.head_dim)];
    let mut past = vec![];
    if opts.kv_cache {
        for l in 0..cfg.num_hidden_layers as usize {
            let k = b.input(&past_name(l, "key"), dt, &kv_dims(PAST));
            let v = b.input(&past_name(l, "value"), dt, &kv_dims(PAST));
            past.push((k, v));
        }
    }

    let ctx = shared_tensors(&mut b, cfg, dt, &ids, &mask, &pos);

    let before = Weights::declare(&mut b, &layout.before, |d| d.name.clone(), dt);
    let embed = before.get(Slot::Embed).to_string();
    let x_bsd = b.op("Gather", &[&embed, &ids], vec![attr_int("axis", 0)]);
    let mut x_nd = b.reshape_to(&x_bsd, &[-1, d]);

    for l in 0..cfg.num_hidden_layers as usize {
        b.set_scope(&format!("model.layers.{l}"));
        let w = Weights::declare(&mut b, &layout.block, |d| Layout::block_name(l, d), dt);
        let h_nd = rms_norm(&mut b, &x_nd, w.get(Slot::InputNorm), cfg.rms_norm_eps, dt);
        let attn_nd = attention(&mut b, cfg, &ctx, l, &w, &h_nd, past.get(l), dt);
        x_nd = b.op("Add", &[&x_nd, &attn_nd], vec![]);
        let h_nd = rms_norm(&mut b, &x_nd, w.get(Slot::PostNorm), cfg.rms_norm_eps, dt);
        let mlp_nd = mlp(&mut b, cfg, &w, &h_nd);
        x_nd = b.op("Add", &[&x_nd, &mlp_nd], vec![]);
    }

    b.set_scope("model");
    let after = Weights::declare(&mut b, &layout.after, |d| d.name.clone(), dt);
    let h_nd = rms_norm(&mut b, &x_nd, after.get(Slot::FinalNorm), cfg.rms_norm_eps, dt);
    let head = after.opt(Slot::Head).unwrap_or(&embed).to_string();
    let logits_nv = b.linear(&h_nd, &head);
    b.op_into("Reshape", &[&logits_nv, &ctx.shape_bsv], "logits", vec![]);
    b.output("logits", dt, &[BATCH, SEQ, Dim::Fixed(v)]);
    if opts.kv_cache {
        for l in 0..cfg.num_hidden_layers as usize {
            b.output(&present_name(l, "key"), dt, &kv_dims(TOTAL));
            b.output(&present_name(l, "value"), dt, &kv_dims(TOTAL));
        }
    }
    b.finish("unlearn-llama")
}

/// Tensors computed once and used by every layer.
struct Shared {
    /// `[b, s, h, e]`, `[b, s, g, e]` and `[b, s, v]` as int64 shape tensors.
    shape_bshe: String,
    shape_bsge: String,
    shape_bsv: String,
    /// Additive fp32 mask `[b, 1, s, t]`: 0 where a query may attend a key, f32::MIN elsewhere.
    bias_b1st: String,
    /// The same with the sliding window applied, for the config's windowed layers.
    window_bias_b1st: Option<String>,
    /// RoPE tables `[b, 1, s, r]` in the model dtype.
    cos_b1sr: String,
    sin_b1sr: String,
}

fn shared_tensors(b: &mut GraphBuilder, cfg: &Config, dt: i32, ids: &str, mask: &str, pos: &str) -> Shared {
    let (h, g, e) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let bs = b.op("Shape", &[ids], vec![]);
    let concat_dims = |b: &mut GraphBuilder, tail: &[i64]| {
        let t = b.const_i64(&[tail.len() as i64], tail);
        b.op("Concat", &[&bs, &t], vec![attr_int("axis", 0)])
    };
    let shape_bshe = concat_dims(b, &[h, e]);
    let shape_bsge = concat_dims(b, &[g, e]);
    let shape_bsv = concat_dims(b, &[cfg.vocab_size]);
    let bias_b1st = attention_bias(b, ids, mask, None);
    let window_bias_b1st = cfg.sliding_window.map(|w| attention_bias(b, ids, mask, Some(w)));
    let (cos_b1sr, sin_b1sr) = rotary_tables(b, cfg, pos, dt);
    Shared { shape_bshe, shape_bsge, shape_bsv, bias_b1st, window_bias_b1st, cos_b1sr, sin_b1sr }
}

/// The rule of [`crate::model::llama::causal_padding_mask`]: query i (absolute position
/// past + i) sees key j iff j ≤ past + i and key j is not padding; a query always sees itself,
/// so no softmax row is empty (padding rows give garbage, never NaN). With a `window`, keys
/// `window` or more slots behind the query are hidden too.
fn attention_bias(b: &mut GraphBuilder, ids: &str, mask: &str, window: Option<i64>) -> String {
    let s_1 = b.shape_slice(ids, 1, 2);
    let t_1 = b.shape_slice(mask, 1, 2);
    let past_1 = b.op("Sub", &[&t_1, &s_1], vec![]);
    let past = b.squeeze(&past_1, &[0]);
    let t = b.squeeze(&t_1, &[0]);
    let zero = b.const_i64(&[], &[0]);
    let one = b.const_i64(&[], &[1]);
    let q_pos_s = b.op("Range", &[&past, &t, &one], vec![]);
    let k_pos_t = b.op("Range", &[&zero, &t, &one], vec![]);
    let q_pos_s1 = b.unsqueeze(&q_pos_s, &[1]);
    let k_pos_1t = b.unsqueeze(&k_pos_t, &[0]);
    let mut causal_st = b.op("LessOrEqual", &[&k_pos_1t, &q_pos_s1], vec![]);
    if let Some(w) = window {
        let w = b.const_i64(&[], &[w]);
        let oldest_s1 = b.op("Sub", &[&q_pos_s1, &w], vec![]);
        let recent_st = b.op("Greater", &[&k_pos_1t, &oldest_s1], vec![]);
        causal_st = b.op("And", &[&causal_st, &recent_st], vec![]);
    }
    let diag_st = b.op("Equal", &[&k_pos_1t, &q_pos_s1], vec![]);
    let keys_bt = b.cast(mask, data_type::BOOL);
    let keys_b11t = b.unsqueeze(&keys_bt, &[1, 2]);
    let visible_b1st = b.op("And", &[&causal_st, &keys_b11t], vec![]);
    let allowed_b1st = b.op("Or", &[&visible_b1st, &diag_st], vec![]);
    let zero_f = b.scalar(data_type::FLOAT, 0.0);
    // The most negative finite value rather than -inf: exp underflows to exactly 0 all the same,
    // and runtimes with fast-math exp never see an infinity.
    let min_f = b.scalar(data_type::FLOAT, f32::MIN);
    b.op("Where", &[&allowed_b1st, &zero_f, &min_f], vec![])
}

/// cos/sin of `position · inv_freq`, computed in fp32 from the positions as transformers does
/// (no table, so no maximum length), cast to the model dtype, `[b, 1, s, r]`. With longrope the
/// long frequencies replace the short ones when the largest position reaches past the original
/// context, and both tables are scaled by its attention factor.
fn rotary_tables(b: &mut GraphBuilder, cfg: &Config, pos: &str, dt: i32) -> (String, String) {
    let const_freqs = |b: &mut GraphBuilder, t: &tch::Tensor| {
        let v: Vec<f32> = Vec::<f32>::try_from(t).expect("inv_freq is a 1-D fp32 tensor");
        b.const_float(data_type::FLOAT, &[v.len() as i64], &v)
    };
    let mut inv = const_freqs(b, &rope_inv_freq(cfg, Device::Cpu));
    if let (Some(long), Some(r)) = (rope_inv_freq_long(cfg, Device::Cpu), &cfg.rope_longrope) {
        let long = const_freqs(b, &long);
        // max(position) + 1 > original  <=>  max(position) > original - 1 (no axes: all of them).
        let max_pos = b.op("ReduceMax", &[pos], vec![attr_int("keepdims", 0)]);
        let last_short = b.const_i64(&[], &[r.original_max_position_embeddings - 1]);
        let is_long = b.op("Greater", &[&max_pos, &last_short], vec![]);
        inv = b.op("Where", &[&is_long, &long, &inv], vec![]);
    }
    let pos_bs = b.cast(pos, data_type::FLOAT);
    let pos_bs1 = b.unsqueeze(&pos_bs, &[2]);
    let freqs = b.op("Mul", &[&pos_bs1, &inv], vec![]);
    let emb_bsr = b.op("Concat", &[&freqs, &freqs], vec![attr_int("axis", -1)]);
    let mut out = vec![];
    for f in ["Cos", "Sin"] {
        let mut t = b.op(f, &[&emb_bsr], vec![]);
        if let Some(r) = &cfg.rope_longrope {
            let factor = b.scalar(data_type::FLOAT, r.attention_factor as f32);
            t = b.op("Mul", &[&t, &factor], vec![]);
        }
        if dt != data_type::FLOAT {
            t = b.cast(&t, dt);
        }
        out.push(b.unsqueeze(&t, &[1]));
    }
    let sin = out.pop().expect("two tables");
    (out.pop().expect("two tables"), sin)
}

/// RMSNorm as transformers computes it: normalise in fp32, cast back, then scale by the weight.
/// Written as the Pow/ReduceMean/Add/Sqrt/Div/Mul chain that onnxruntime fuses into one kernel.
fn rms_norm(b: &mut GraphBuilder, x: &str, w: &str, eps: f64, dt: i32) -> String {
    let x32 = if dt == data_type::FLOAT { x.to_string() } else { b.cast(x, data_type::FLOAT) };
    let two = b.scalar(data_type::FLOAT, 2.0);
    let sq = b.op("Pow", &[&x32, &two], vec![]);
    let mean = b.reduce_mean_last(&sq);
    let eps = b.scalar(data_type::FLOAT, eps as f32);
    let var = b.op("Add", &[&mean, &eps], vec![]);
    let rms = b.op("Sqrt", &[&var], vec![]);
    let mut normed = b.op("Div", &[&x32, &rms], vec![]);
    if dt != data_type::FLOAT {
        normed = b.cast(&normed, dt);
    }
    b.op("Mul", &[&normed, w], vec![])
}

/// `x·cos + rotate_half(x)·sin` with rotate_half(x) = cat(-x[.., r/2:], x[.., :r/2]) on the
/// leading r rotated dims of each head; the other e − r dims pass unchanged.
fn apply_rope(b: &mut GraphBuilder, x: &str, ctx: &Shared, e: i64, r: i64) -> String {
    let (rot, pass) = if r == e {
        (x.to_string(), None)
    } else {
        let sizes = b.const_i64(&[2], &[r, e - r]);
        let mut parts = b.node("Split", &[x, &sizes], 2, vec![attr_int("axis", -1)]);
        let pass = parts.pop();
        (parts.pop().expect("two parts"), pass)
    };
    let split = b.const_i64(&[2], &[r / 2, r / 2]);
    let halves = b.node("Split", &[&rot, &split], 2, vec![attr_int("axis", -1)]);
    let neg = b.op("Neg", &[&halves[1]], vec![]);
    let rotated_half = b.op("Concat", &[&neg, &halves[0]], vec![attr_int("axis", -1)]);
    let a = b.op("Mul", &[&rot, &ctx.cos_b1sr], vec![]);
    let c = b.op("Mul", &[&rotated_half, &ctx.sin_b1sr], vec![]);
    let rotated = b.op("Add", &[&a, &c], vec![]);
    match pass {
        None => rotated,
        Some(p) => b.op("Concat", &[&rotated, &p], vec![attr_int("axis", -1)]),
    }
}

/// `x · Wᵀ (+ bias)` for a block weight and, if the layout has it, its bias.
fn linear(b: &mut GraphBuilder, x_nd: &str, w: &Weights, weight: Slot, bias: Slot) -> String {
    match w.opt(bias) {
        None => b.linear(x_nd, w.get(weight)),
        Some(bias) => b.op("Gemm", &[x_nd, w.get(weight), bias], vec![attr_int("transB", 1)]),
    }
}

/// One Gemm and a Split into parts of `sizes` columns (Phi-3's fused projections).
fn fused(b: &mut GraphBuilder, x_nd: &str, w: &str, sizes: &[i64]) -> Vec<String> {
    let y = b.linear(x_nd, w);
    let split = b.const_i64(&[sizes.len() as i64], sizes);
    b.node("Split", &[&y, &split], sizes.len(), vec![attr_int("axis", -1)])
}

#[allow(clippy::too_many_arguments)]
fn attention(
    b: &mut GraphBuilder,
    cfg: &Config,
    ctx: &Shared,
    l: usize,
    w: &Weights,
    x_nd: &str,
    past: Option<&(String, String)>,
    dt: i32,
) -> String {
    let (h, g, e) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let (q_nq, k_nk, v_nk) = if cfg.fused_projections {
        let mut parts = fused(b, x_nd, w.get(Slot::Qkv), &[h * e, g * e, g * e]).into_iter();
        let mut next = || parts.next().expect("three parts");
        (next(), next(), next())
    } else {
        (linear(b, x_nd, w, Slot::Q, Slot::QBias), linear(b, x_nd, w, Slot::K, Slot::KBias), linear(b, x_nd, w, Slot::V, Slot::VBias))
    };
    // [n, heads·e] → [b, heads, s, e], with Qwen3's per-head RMSNorm before the transpose.
    let heads = |b: &mut GraphBuilder, y: &str, shape: &str, norm: Option<Slot>| {
        let mut y = b.reshape(y, shape);
        if let Some(n) = norm {
            y = rms_norm(b, &y, w.get(n), cfg.rms_norm_eps, dt);
        }
        b.transpose(&y, &[0, 2, 1, 3])
    };
    let (q_norm, k_norm) = if cfg.qk_norm { (Some(Slot::QNorm), Some(Slot::KNorm)) } else { (None, None) };
    let q_bhse = heads(b, &q_nq, &ctx.shape_bshe, q_norm);
    let k_bgse = heads(b, &k_nk, &ctx.shape_bsge, k_norm);
    let v_bgse = heads(b, &v_nk, &ctx.shape_bsge, None);
    let q_bhse = apply_rope(b, &q_bhse, ctx, e, cfg.rotary_dim());
    let k_bgse = apply_rope(b, &k_bgse, ctx, e, cfg.rotary_dim());

    let (k_bgte, v_bgte) = match past {
        None => (k_bgse, v_bgse),
        Some((pk, pv)) => {
            let (kn, vn) = (present_name(l, "key"), present_name(l, "value"));
            b.op_into("Concat", &[pk, &k_bgse], &kn, vec![attr_int("axis", 2)]);
            b.op_into("Concat", &[pv, &v_bgse], &vn, vec![attr_int("axis", 2)]);
            (kn, vn)
        }
    };

    // Query head j·r + i uses key/value head j (transformers' repeat_kv): view q as [b, g, m, e].
    let q_bgme = b.reshape_to(&q_bhse, &[0, g, -1, e]);
    let k_bget = b.transpose(&k_bgte, &[0, 1, 3, 2]);
    let scores_bgmt = b.op("MatMul", &[&q_bgme, &k_bget], vec![]);
    let mut scores_bhst = b.reshape_to(&scores_bgmt, &[0, h, -1, 0]);
    if dt != data_type::FLOAT {
        scores_bhst = b.cast(&scores_bhst, data_type::FLOAT);
    }
    let scale = b.scalar(data_type::FLOAT, (e as f64).powf(-0.5) as f32);
    let scaled = b.op("Mul", &[&scores_bhst, &scale], vec![]);
    let bias = match (cfg.layer_window(l), &ctx.window_bias_b1st) {
        (Some(_), Some(windowed)) => windowed,
        _ => &ctx.bias_b1st,
    };
    let masked = b.op("Add", &[&scaled, bias], vec![]);
    let mut probs_bhst = b.op("Softmax", &[&masked], vec![attr_int("axis", -1)]);
    if dt != data_type::FLOAT {
        probs_bhst = b.cast(&probs_bhst, dt);
    }
    let probs_bgmt = b.reshape_to(&probs_bhst, &[0, g, -1, 0]);
    let o_bgme = b.op("MatMul", &[&probs_bgmt, &v_bgte], vec![]);
    let o_bhse = b.reshape_to(&o_bgme, &[0, h, -1, e]);
    let o_bshe = b.transpose(&o_bhse, &[0, 2, 1, 3]);
    let o_nd = b.reshape_to(&o_bshe, &[-1, h * e]);
    linear(b, &o_nd, w, Slot::O, Slot::OBias)
}

/// `down(silu(gate(x)) · up(x))`, silu(z) = z·sigmoid(z); gate and up from one fused Gemm on Phi-3.
fn mlp(b: &mut GraphBuilder, cfg: &Config, w: &Weights, x_nd: &str) -> String {
    let (gate, up) = if cfg.fused_projections {
        let i = cfg.intermediate_size;
        let mut parts = fused(b, x_nd, w.get(Slot::GateUp), &[i, i]);
        let up = parts.pop().expect("two parts");
        (parts.pop().expect("two parts"), up)
    } else {
        (linear(b, x_nd, w, Slot::Gate, Slot::GateBias), linear(b, x_nd, w, Slot::Up, Slot::UpBias))
    };
    let sig = b.op("Sigmoid", &[&gate], vec![]);
    let act = b.op("Mul", &[&gate, &sig], vec![]);
    let prod = b.op("Mul", &[&act, &up], vec![]);
    linear(b, &prod, w, Slot::Down, Slot::DownBias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::param_specs;

    #[test]
    fn declared_weights_are_the_hf_parameters_in_order() {
        let presets = [Config::llama3_8b(), Config::qwen2_5_7b(), Config::phi3_5_mini(), Config::zephyr_7b_beta()];
        for (tied, base) in [false, true].into_iter().flat_map(|t| presets.clone().into_iter().map(move |p| (t, p))) {
            let cfg = Config { num_hidden_layers: 2, tie_word_embeddings: tied, ..base };
            for kv_cache in [false, true] {
                let (graph, weights) = build_graph(&cfg, &GraphOptions { dtype: ExportDtype::Fp16, kv_cache, opset: 21 });
                let specs = param_specs(&cfg);
                let got: Vec<(&str, &[i64])> = weights.iter().map(|w| (w.name.as_str(), w.dims.as_slice())).collect();
                let want: Vec<(&str, &[i64])> = specs.iter().map(|s| (s.name.as_str(), s.shape.as_slice())).collect();
                assert_eq!(got, want);
                assert_eq!(graph.output.len(), 1 + if kv_cache { 4 } else { 0 });
            }
        }
    }
}

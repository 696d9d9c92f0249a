//! The Llama decoder as an ONNX graph of plain ops, computing what `model::llama` (and
//! transformers' `modeling_llama.py`) computes: RMSNorm in fp32, rotate-half RoPE from
//! `position_ids` (inv_freq from [`rope_inv_freq`], llama3 rescaling included), grouped-query
//! attention with a causal + padding mask, SwiGLU MLP, optional tied head.
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
//! In fp16 the norms and the softmax (mask added) run in fp32 between `Cast`s.

use tch::Device;

use super::graph::{attr_int, GraphBuilder, WeightDecl};
use super::proto::{data_type, Dim, GraphProto};
use crate::model::llama::rope_inv_freq;
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

/// Build the graph; the weights it declares (HF names, in [`crate::model::param_specs`] order)
/// are returned for the writer to stream.
pub fn build_graph(cfg: &Config, opts: &GraphOptions) -> (GraphProto, Vec<WeightDecl>) {
    let dt = opts.dtype.data_type();
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
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

    let embed = b.weight("model.embed_tokens.weight", &[v, d], dt);
    let x_bsd = b.op("Gather", &[&embed, &ids], vec![attr_int("axis", 0)]);
    let mut x_nd = b.reshape_to(&x_bsd, &[-1, d]);

    for l in 0..cfg.num_hidden_layers as usize {
        let p = format!("model.layers.{l}");
        b.set_scope(&p);
        let w = b.weight(&format!("{p}.input_layernorm.weight"), &[d], dt);
        let h_nd = rms_norm(&mut b, &x_nd, &w, cfg.rms_norm_eps, dt);
        let attn_nd = attention(&mut b, cfg, &ctx, l, &h_nd, past.get(l), dt);
        x_nd = b.op("Add", &[&x_nd, &attn_nd], vec![]);
        let w = b.weight(&format!("{p}.post_attention_layernorm.weight"), &[d], dt);
        let h_nd = rms_norm(&mut b, &x_nd, &w, cfg.rms_norm_eps, dt);
        let mlp_nd = mlp(&mut b, cfg, &p, &h_nd, dt);
        x_nd = b.op("Add", &[&x_nd, &mlp_nd], vec![]);
    }

    b.set_scope("model");
    let w = b.weight("model.norm.weight", &[d], dt);
    let h_nd = rms_norm(&mut b, &x_nd, &w, cfg.rms_norm_eps, dt);
    let head = if cfg.tie_word_embeddings { embed } else { b.weight("lm_head.weight", &[v, d], dt) };
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
    /// RoPE tables `[b, 1, s, e]` in the model dtype.
    cos_b1se: String,
    sin_b1se: String,
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
    let bias_b1st = attention_bias(b, ids, mask);
    let (cos_b1se, sin_b1se) = rotary_tables(b, cfg, pos, dt);
    Shared { shape_bshe, shape_bsge, shape_bsv, bias_b1st, cos_b1se, sin_b1se }
}

/// The rule of [`crate::model::llama::causal_padding_mask`]: query i (absolute position
/// past + i) sees key j iff j ≤ past + i and key j is not padding; a query always sees itself,
/// so no softmax row is empty (padding rows give garbage, never NaN).
fn attention_bias(b: &mut GraphBuilder, ids: &str, mask: &str) -> String {
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
    let causal_st = b.op("LessOrEqual", &[&k_pos_1t, &q_pos_s1], vec![]);
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
/// (no table, so no maximum length), cast to the model dtype, `[b, 1, s, e]`.
fn rotary_tables(b: &mut GraphBuilder, cfg: &Config, pos: &str, dt: i32) -> (String, String) {
    let inv_freq: Vec<f32> = Vec::<f32>::try_from(&rope_inv_freq(cfg, Device::Cpu)).expect("inv_freq is a 1-D fp32 tensor");
    let inv = b.const_float(data_type::FLOAT, &[inv_freq.len() as i64], &inv_freq);
    let pos_bs = b.cast(pos, data_type::FLOAT);
    let pos_bs1 = b.unsqueeze(&pos_bs, &[2]);
    let freqs = b.op("Mul", &[&pos_bs1, &inv], vec![]);
    let emb_bse = b.op("Concat", &[&freqs, &freqs], vec![attr_int("axis", -1)]);
    let mut out = vec![];
    for f in ["Cos", "Sin"] {
        let mut t = b.op(f, &[&emb_bse], vec![]);
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

/// `x·cos + rotate_half(x)·sin` with rotate_half(x) = cat(-x[.., e/2:], x[.., :e/2]).
fn apply_rope(b: &mut GraphBuilder, x: &str, ctx: &Shared, e: i64) -> String {
    let split = b.const_i64(&[2], &[e / 2, e / 2]);
    let halves = b.node("Split", &[x, &split], 2, vec![attr_int("axis", -1)]);
    let neg = b.op("Neg", &[&halves[1]], vec![]);
    let rot = b.op("Concat", &[&neg, &halves[0]], vec![attr_int("axis", -1)]);
    let a = b.op("Mul", &[x, &ctx.cos_b1se], vec![]);
    let c = b.op("Mul", &[&rot, &ctx.sin_b1se], vec![]);
    b.op("Add", &[&a, &c], vec![])
}

fn attention(
    b: &mut GraphBuilder,
    cfg: &Config,
    ctx: &Shared,
    l: usize,
    x_nd: &str,
    past: Option<&(String, String)>,
    dt: i32,
) -> String {
    let (d, h, g, e) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let p = format!("model.layers.{l}.self_attn");
    let wq = b.weight(&format!("{p}.q_proj.weight"), &[h * e, d], dt);
    let wk = b.weight(&format!("{p}.k_proj.weight"), &[g * e, d], dt);
    let wv = b.weight(&format!("{p}.v_proj.weight"), &[g * e, d], dt);
    let wo = b.weight(&format!("{p}.o_proj.weight"), &[d, h * e], dt);

    let mut heads = |w: &str, shape: &str| {
        let y = b.linear(x_nd, w);
        let y = b.reshape(&y, shape);
        b.transpose(&y, &[0, 2, 1, 3])
    };
    let q_bhse = heads(&wq, &ctx.shape_bshe);
    let k_bgse = heads(&wk, &ctx.shape_bsge);
    let v_bgse = heads(&wv, &ctx.shape_bsge);
    let q_bhse = apply_rope(b, &q_bhse, ctx, e);
    let k_bgse = apply_rope(b, &k_bgse, ctx, e);

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
    let masked = b.op("Add", &[&scaled, &ctx.bias_b1st], vec![]);
    let mut probs_bhst = b.op("Softmax", &[&masked], vec![attr_int("axis", -1)]);
    if dt != data_type::FLOAT {
        probs_bhst = b.cast(&probs_bhst, dt);
    }
    let probs_bgmt = b.reshape_to(&probs_bhst, &[0, g, -1, 0]);
    let o_bgme = b.op("MatMul", &[&probs_bgmt, &v_bgte], vec![]);
    let o_bhse = b.reshape_to(&o_bgme, &[0, h, -1, e]);
    let o_bshe = b.transpose(&o_bhse, &[0, 2, 1, 3]);
    let o_nd = b.reshape_to(&o_bshe, &[-1, h * e]);
    b.linear(&o_nd, &wo)
}

/// `down(silu(gate(x)) · up(x))`, silu(z) = z·sigmoid(z).
fn mlp(b: &mut GraphBuilder, cfg: &Config, p: &str, x_nd: &str, dt: i32) -> String {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let wg = b.weight(&format!("{p}.mlp.gate_proj.weight"), &[i, d], dt);
    let wu = b.weight(&format!("{p}.mlp.up_proj.weight"), &[i, d], dt);
    let wd = b.weight(&format!("{p}.mlp.down_proj.weight"), &[d, i], dt);
    let gate = b.linear(x_nd, &wg);
    let up = b.linear(x_nd, &wu);
    let sig = b.op("Sigmoid", &[&gate], vec![]);
    let act = b.op("Mul", &[&gate, &sig], vec![]);
    let prod = b.op("Mul", &[&act, &up], vec![]);
    b.linear(&prod, &wd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::param_specs;

    #[test]
    fn declared_weights_are_the_hf_parameters_in_order() {
        for tied in [false, true] {
            let cfg = Config { num_hidden_layers: 2, tie_word_embeddings: tied, ..Config::llama3_8b() };
            for kv_cache in [false, true] {
                let (graph, weights) =
                    build_graph(&cfg, &GraphOptions { dtype: ExportDtype::Fp16, kv_cache, opset: 21 });
                let specs = param_specs(&cfg);
                let got: Vec<(&str, &[i64])> = weights.iter().map(|w| (w.name.as_str(), w.dims.as_slice())).collect();
                let want: Vec<(&str, &[i64])> = specs.iter().map(|s| (s.name.as_str(), s.shape.as_slice())).collect();
                assert_eq!(got, want);
                assert_eq!(graph.output.len(), 1 + if kv_cache { 4 } else { 0 });
            }
        }
    }
}

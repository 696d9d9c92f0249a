//! Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, ...) in tch, written to compute exactly what
//! transformers' `modeling_llama.py` computes: RMSNorm normalised in fp32 then cast back before the
//! weight multiply, rotate-half RoPE (pairs (i, i+d/2)) with optional `llama3` frequency rescaling,
//! grouped-query attention, SwiGLU MLP, optional tied embeddings.
//!
//! Shape legend: b = batch, s = query length, t = key length (past + s), d = hidden size,
//! h = query heads, g = key/value heads, e = head dim, v = vocab.
//!
//! The model knows nothing of ranks, shards or methods. Its weights are plain tensors that the
//! trainer may replace by views into flat buffers ([`Llama::visit_params_mut`]); the forward is
//! exposed per layer ([`Llama::embed`], [`Llama::layer_forward`], [`Llama::head`]) so that the
//! trainer can recompute layers in backward, which tch has no checkpointing for.

use tch::{Kind, Tensor};

use super::config::Config;

/// What a parameter is for; the frozen set of the mean-teacher recipe is "everything but Matrix".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    Embedding,
    Head,
    Norm,
    Matrix,
}

/// Name (the HF tensor name), shape and role of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub role: ParamRole,
    /// Transformer block index, `None` for embeddings, final norm and head.
    pub layer: Option<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// All parameters of a model with this config, in HF order (embeddings, blocks, norm, head).
/// With tied embeddings there is no `lm_head.weight`.
pub fn param_specs(cfg: &Config) -> Vec<ParamSpec> {
    let (d, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q_out = cfg.num_attention_heads * cfg.head_dim;
    let kv_out = cfg.num_key_value_heads * cfg.head_dim;
    let spec = |name: String, shape: Vec<i64>, role, layer| ParamSpec { name, shape, role, layer };
    let mut out = vec![spec("model.embed_tokens.weight".into(), vec![v, d], ParamRole::Embedding, None)];
    for l in 0..cfg.num_hidden_layers as usize {
        let p = format!("model.layers.{l}");
        out.push(spec(format!("{p}.input_layernorm.weight"), vec![d], ParamRole::Norm, Some(l)));
        for (n, shape) in [
            ("self_attn.q_proj", vec![q_out, d]),
            ("self_attn.k_proj", vec![kv_out, d]),
            ("self_attn.v_proj", vec![kv_out, d]),
            ("self_attn.o_proj", vec![d, q_out]),
        ] {
            out.push(spec(format!("{p}.{n}.weight"), shape, ParamRole::Matrix, Some(l)));
        }
        out.push(spec(format!("{p}.post_attention_layernorm.weight"), vec![d], ParamRole::Norm, Some(l)));
        for (n, shape) in [("mlp.gate_proj", vec![i, d]), ("mlp.up_proj", vec![i, d]), ("mlp.down_proj", vec![d, i])] {
            out.push(spec(format!("{p}.{n}.weight"), shape, ParamRole::Matrix, Some(l)));
        }
    }
    out.push(spec("model.norm.weight".into(), vec![d], ParamRole::Norm, None));
    if !cfg.tie_word_embeddings {
        out.push(spec("lm_head.weight".into(), vec![v, d], ParamRole::Head, None));
    }
    out
}

struct Attention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
}

struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

struct Block {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// Per-batch attention inputs shared by every layer: rotary tables and the key mask.
pub struct AttnCtx {
    cos_bse: Tensor,
    sin_bse: Tensor,
    /// Boolean `[b, 1, s, t]`, true where a query may attend a key; `None` = plain causal.
    mask_b1st: Option<Tensor>,
}

/// Keys and values of the tokens seen so far, per layer: `[b, g, t, e]`.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// Number of cached positions (0 before the first call).
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, |(k, _)| k.size()[2])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keep only the batch rows in `idx` (used when finished sequences leave a generation batch).
    pub fn select_rows(&mut self, idx: &Tensor) {
        for (k, v) in self.layers.iter_mut() {
            *k = k.index_select(0, idx);
            *v = v.index_select(0, idx);
        }
    }
}

pub struct Llama {
    cfg: Config,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
}

impl Llama {
    /// Build the model from named tensors. `get(name, shape)` must return the tensor for each
    /// [`ParamSpec`] (the weights module checks names and shapes against the file).
    pub fn new(
        cfg: &Config,
        mut get: impl FnMut(&ParamSpec) -> crate::Result<Tensor>,
    ) -> crate::Result<Self> {
        let specs = param_specs(cfg);
        let mut tensors = Vec::with_capacity(specs.len());
        for s in &specs {
            tensors.push(get(s)?);
        }
        let mut it = tensors.into_iter();
        let mut next = || it.next().expect("param_specs and Llama::new agree on the parameter list");
        let embed_tokens = next();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers as usize);
        for _ in 0..cfg.num_hidden_layers {
            let input_layernorm = next();
            let self_attn = Attention { q_proj: next(), k_proj: next(), v_proj: next(), o_proj: next() };
            let post_attention_layernorm = next();
            let mlp = Mlp { gate_proj: next(), up_proj: next(), down_proj: next() };
            layers.push(Block { input_layernorm, self_attn, post_attention_layernorm, mlp });
        }
        let norm = next();
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(next()) };
        let inv_freq = rope_inv_freq(cfg, embed_tokens.device());
        Ok(Llama { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, inv_freq })
    }

    /// A second model sharing every weight tensor with this one (no copy). The trainer rebinds
    /// its trainable weights to the teacher's buffers; frozen weights stay shared.
    pub fn shallow_copy(&self) -> Llama {
        let sc = |t: &Tensor| t.shallow_clone();
        Llama {
            cfg: self.cfg.clone(),
            embed_tokens: sc(&self.embed_tokens),
            layers: self
                .layers
                .iter()
                .map(|b| Block {
                    input_layernorm: sc(&b.input_layernorm),
                    self_attn: Attention {
                        q_proj: sc(&b.self_attn.q_proj),
                        k_proj: sc(&b.self_attn.k_proj),
                        v_proj: sc(&b.self_attn.v_proj),
                        o_proj: sc(&b.self_attn.o_proj),
                    },
                    post_attention_layernorm: sc(&b.post_attention_layernorm),
                    mlp: Mlp { gate_proj: sc(&b.mlp.gate_proj), up_proj: sc(&b.mlp.up_proj), down_proj: sc(&b.mlp.down_proj) },
                })
                .collect(),
            norm: sc(&self.norm),
            lm_head: self.lm_head.as_ref().map(sc),
            inv_freq: sc(&self.inv_freq),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> tch::Device {
        self.embed_tokens.device()
    }

    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// Visit every parameter mutably, in [`param_specs`] order. Used to rebind weights to flat
    /// buffers or to copy in new values.
    pub fn visit_params_mut(&mut self, mut f: impl FnMut(&str, &mut Tensor)) {
        // Order of param_specs: embeddings, blocks, final norm, head.
        f("model.embed_tokens.weight", &mut self.embed_tokens);
        for l in 0..self.layers.len() {
            self.visit_layer_params_mut(Some(l), &mut f);
        }
        f("model.norm.weight", &mut self.norm);
        if let Some(h) = self.lm_head.as_mut() {
            f("lm_head.weight", h);
        }
    }

    /// Visit the parameters of one layer (`None`: embeddings, final norm and head), in
    /// [`param_specs`] order. Used to bind a layer's weights just before it runs (ZeRO-3).
    pub fn visit_layer_params_mut(&mut self, layer: Option<usize>, mut f: impl FnMut(&str, &mut Tensor)) {
        match layer {
            Some(l) => {
                let p = format!("model.layers.{l}");
                let b = &mut self.layers[l];
                f(&format!("{p}.input_layernorm.weight"), &mut b.input_layernorm);
                f(&format!("{p}.self_attn.q_proj.weight"), &mut b.self_attn.q_proj);
                f(&format!("{p}.self_attn.k_proj.weight"), &mut b.self_attn.k_proj);
                f(&format!("{p}.self_attn.v_proj.weight"), &mut b.self_attn.v_proj);
                f(&format!("{p}.self_attn.o_proj.weight"), &mut b.self_attn.o_proj);
                f(&format!("{p}.post_attention_layernorm.weight"), &mut b.post_attention_layernorm);
                f(&format!("{p}.mlp.gate_proj.weight"), &mut b.mlp.gate_proj);
                f(&format!("{p}.mlp.up_proj.weight"), &mut b.mlp.up_proj);
                f(&format!("{p}.mlp.down_proj.weight"), &mut b.mlp.down_proj);
            }
            None => {
                f("model.embed_tokens.weight", &mut self.embed_tokens);
                f("model.norm.weight", &mut self.norm);
                if let Some(h) = self.lm_head.as_mut() {
                    f("lm_head.weight", h);
                }
            }
        }
    }

    /// Shallow handles to every parameter, in [`param_specs`] order.
    pub fn named_params(&mut self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        self.visit_params_mut(|n, t| out.push((n.to_string(), t.shallow_clone())));
        out
    }

    /// Full forward: `input_ids [b, s]` → logits `[b, s, v]` in the model's dtype.
    /// `attention_mask [b, s]` (1 = token, 0 = padding) may be left- or right-padded;
    /// `position_ids [b, s]` default to `0..s` as in transformers.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, position_ids: Option<&Tensor>) -> Tensor {
        let ctx = self.attn_ctx(input_ids.size()[1], 0, attention_mask, position_ids, input_ids.size()[0]);
        let mut x = self.embed(input_ids);
        for l in 0..self.layers.len() {
            x = self.layer_forward(l, &x, &ctx);
        }
        self.head(&x)
    }

    /// Incremental forward with a KV cache. `attention_mask` covers past and new tokens
    /// (`[b, past + s]`); `position_ids [b, s]` are required because left padding shifts them.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        let (b, s) = (input_ids.size()[0], input_ids.size()[1]);
        let ctx = self.attn_ctx(s, cache.len(), Some(attention_mask), Some(position_ids), b);
        let mut x = self.embed(input_ids);
        let fresh = cache.layers.is_empty();
        for l in 0..self.layers.len() {
            let past = if fresh { None } else { Some(&cache.layers[l]) };
            let (y, k, v) = self.layer_forward_kv(l, &x, &ctx, past);
            x = y;
            if fresh {
                cache.layers.push((k, v));
            } else {
                cache.layers[l] = (k, v);
            }
        }
        self.head(&x)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embedding lookup, `[b, s]` → `[b, s, d]`.
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    /// Final norm and LM head, `[b, s, d]` → `[b, s, v]`.
    pub fn head(&self, x_bsd: &Tensor) -> Tensor {
        let h = rms_norm(x_bsd, &self.norm, self.cfg.rms_norm_eps);
        h.linear(self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None::<Tensor>)
    }

    /// Rotary tables and attention mask for `s` new positions after `past` cached ones.
    pub fn attn_ctx(
        &self,
        s: i64,
        past: i64,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        batch: i64,
    ) -> AttnCtx {
        let dev = self.device();
        let pos_bs = match position_ids {
            Some(p) => p.shallow_clone(),
            None => Tensor::arange_start(past, past + s, (Kind::Int64, dev)).unsqueeze(0).expand([batch, s], false),
        };
        // freqs[b, s, j] = pos * inv_freq[j], in fp32 as transformers does (autocast off).
        let freqs = pos_bs.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let kind = self.kind();
        // An explicit mask only when needed: padding present, or cached keys before the queries.
        // Otherwise SDPA runs its fused causal path.
        let has_padding = attention_mask.is_some_and(|m| m.min().int64_value(&[]) == 0);
        let mask_b1st = if has_padding || past > 0 {
            let full = match attention_mask {
                Some(m) => m.shallow_clone(),
                None => Tensor::ones([batch, past + s], (Kind::Int64, dev)),
            };
            Some(causal_padding_mask(&full, s))
        } else {
            None
        };
        AttnCtx { cos_bse: emb.cos().to_kind(kind), sin_bse: emb.sin().to_kind(kind), mask_b1st }
    }

    /// One transformer block, `[b, s, d]` → `[b, s, d]` (no cache).
    pub fn layer_forward(&self, l: usize, x_bsd: &Tensor, ctx: &AttnCtx) -> Tensor {
        self.layer_forward_kv(l, x_bsd, ctx, None).0
    }

    /// One transformer block; also returns the full keys/values (past + new) for caching.
    fn layer_forward_kv(
        &self,
        l: usize,
        x_bsd: &Tensor,
        ctx: &AttnCtx,
        past: Option<&(Tensor, Tensor)>,
    ) -> (Tensor, Tensor, Tensor) {
        let blk = &self.layers[l];
        let h = rms_norm(x_bsd, &blk.input_layernorm, self.cfg.rms_norm_eps);
        let (attn, k, v) = self.attention(&blk.self_attn, &h, ctx, past);
        let x = x_bsd + attn;
        let h = rms_norm(&x, &blk.post_attention_layernorm, self.cfg.rms_norm_eps);
        let mlp = &blk.mlp;
        let gated = h.linear(&mlp.gate_proj, None::<Tensor>).silu() * h.linear(&mlp.up_proj, None::<Tensor>);
        (&x + gated.linear(&mlp.down_proj, None::<Tensor>), k, v)
    }

    fn attention(
        &self,
        w: &Attention,
        x_bsd: &Tensor,
        ctx: &AttnCtx,
        past: Option<&(Tensor, Tensor)>,
    ) -> (Tensor, Tensor, Tensor) {
        let (b, s) = (x_bsd.size()[0], x_bsd.size()[1]);
        let (h, g, e) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let q_bhse = x_bsd.linear(&w.q_proj, None::<Tensor>).view([b, s, h, e]).transpose(1, 2);
        let k_bgse = x_bsd.linear(&w.k_proj, None::<Tensor>).view([b, s, g, e]).transpose(1, 2);
        let v_bgse = x_bsd.linear(&w.v_proj, None::<Tensor>).view([b, s, g, e]).transpose(1, 2);
        let cos = ctx.cos_bse.unsqueeze(1);
        let sin = ctx.sin_bse.unsqueeze(1);
        let q_bhse = &q_bhse * &cos + rotate_half(&q_bhse) * &sin;
        let k_bgse = &k_bgse * &cos + rotate_half(&k_bgse) * &sin;
        let (k_bgte, v_bgte) = match past {
            None => (k_bgse, v_bgse),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k_bgse], 2), Tensor::cat(&[pv, &v_bgse], 2)),
        };
        let scale = (e as f64).powf(-0.5);
        let o_bhse = Tensor::scaled_dot_product_attention(
            &q_bhse,
            &k_bgte,
            &v_bgte,
            ctx.mask_b1st.as_ref(),
            0.0,
            ctx.mask_b1st.is_none(),
            Some(scale),
            g != h,
        );
        let o_bsd = o_bhse.transpose(1, 2).reshape([b, s, h * e]);
        (o_bsd.linear(&w.o_proj, None::<Tensor>), k_bgte, v_bgte)
    }
}

/// RMSNorm as transformers computes it: normalise in fp32, cast back, then scale.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let x32 = x.to_kind(Kind::Float);
    let var = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let normed = x32 * (var + eps).rsqrt();
    weight * normed.to_kind(x.kind())
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// `inv_freq[j] = 1 / theta^(2j/e)` in fp32, with the `llama3` long-context rescaling if configured.
pub fn rope_inv_freq(cfg: &Config, device: tch::Device) -> Tensor {
    let e = cfg.head_dim;
    let exponent = Tensor::arange_start_step(0, e, 2, (Kind::Int64, device)).to_kind(Kind::Float) / (e as f64);
    let inv_freq = Tensor::from(cfg.rope_theta as f32).to_device(device).pow(&exponent).reciprocal();
    let Some(r) = cfg.rope_llama3 else { return inv_freq };
    let low_wavelen = r.original_max_position_embeddings / r.low_freq_factor;
    let high_wavelen = r.original_max_position_embeddings / r.high_freq_factor;
    let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
    // Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    let scaled = (&inv_freq / r.factor).where_self(&wavelen.gt(low_wavelen), &inv_freq);
    let smooth = ((wavelen.reciprocal() * r.original_max_position_embeddings) - r.low_freq_factor)
        / (r.high_freq_factor - r.low_freq_factor);
    let smoothed = (smooth.ones_like() - &smooth) * &scaled / r.factor + &smooth * &scaled;
    let is_medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
    smoothed.where_self(&is_medium, &scaled)
}

/// Boolean `[b, 1, s, t]` mask for the last `s` of `t` positions: causal, padding keys hidden.
/// A query always sees itself, so rows of padding queries are never empty (no NaN from softmax);
/// their outputs are garbage by construction and are masked out of every loss.
pub fn causal_padding_mask(attention_mask_bt: &Tensor, s: i64) -> Tensor {
    let (b, t) = (attention_mask_bt.size()[0], attention_mask_bt.size()[1]);
    let dev = attention_mask_bt.device();
    let q_pos = Tensor::arange_start(t - s, t, (Kind::Int64, dev)).view([s, 1]);
    let k_pos = Tensor::arange(t, (Kind::Int64, dev)).view([1, t]);
    let causal_st = k_pos.le_tensor(&q_pos);
    let diag_st = k_pos.eq_tensor(&q_pos);
    let keys_b11t = attention_mask_bt.ne(0).view([b, 1, 1, t]);
    (causal_st.view([1, 1, s, t]).logical_and(&keys_b11t)).logical_or(&diag_st.view([1, 1, s, t]))
}

/// Positions for a left- or right-padded batch: running count of real tokens, 1 at padding
/// (what transformers' `generate` uses).
pub fn positions_from_mask(attention_mask_bt: &Tensor) -> Tensor {
    let pos = attention_mask_bt.cumsum(1, Kind::Int64) - 1;
    pos.masked_fill(&attention_mask_bt.eq(0), 1)
}

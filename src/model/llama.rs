//! Decoder of the Llama family and its relatives (Llama 2/3, SmolLM2, TinyLlama, Mistral,
//! Qwen2/2.5, Qwen3, Phi-3/3.5) in tch, written to compute exactly what transformers'
//! `modeling_{llama,mistral,qwen2,qwen3,phi3}.py` compute: RMSNorm normalised in fp32 then cast
//! back before the weight multiply, rotate-half RoPE (pairs (i, i+d/2)) with optional `llama3`
//! or `longrope` frequencies and partial rotation, grouped-query attention with an optional
//! sliding window, SwiGLU MLP, optional tied embeddings. The families differ only in the parts
//! the config's flags switch on (see `config.rs`): q/k/v/o and MLP biases, per-head q/k RMSNorm,
//! fused `qkv_proj`/`gate_up_proj`.
//!
//! Shape legend: b = batch, s = query length, t = key length (past + s), d = hidden size,
//! h = query heads, g = key/value heads, e = head dim, r = rotated dims, v = vocab.
//!
//! The model knows nothing of ranks, shards or methods. Its weights are plain tensors that the
//! trainer may replace by views into flat buffers ([`Llama::visit_params_mut`]); the forward is
//! exposed per layer ([`Llama::embed`], [`Llama::layer_forward`], [`Llama::head`]) so that the
//! trainer can recompute layers in backward, which tch has no checkpointing for. Which weights
//! exist is [`Layout`]'s business; this file only asks for them by [`Slot`].

use tch::{Kind, Tensor};

use super::config::Config;
pub use super::layout::{param_specs, ParamRole, ParamSpec};
use super::layout::{Layout, Slot, SLOTS};

/// Per-batch attention inputs shared by every layer: rotary tables and the key masks.
pub struct AttnCtx {
    cos_bsr: Tensor,
    sin_bsr: Tensor,
    /// Boolean `[b, 1, s, t]`, true where a query may attend a key; `None` = plain causal.
    mask_b1st: Option<Tensor>,
    /// The same for layers with a sliding window, when the window hides some key of this batch.
    window_mask_b1st: Option<Tensor>,
}

/// Keys and values of the tokens seen so far, per layer: `[b, g, t, e]`; and the token ids and
/// positions they came from, `[b, t]`, so that a model with longrope can recompute them all when
/// a forward switches to the long factors (transformers' Phi-3 generation drops its cache there).
#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    seen: Option<(Tensor, Tensor)>,
    /// The keys were rotated with longrope's long factors.
    long_rope: bool,
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
        for (k, v) in self.layers.iter_mut().chain(self.seen.as_mut()) {
            *k = k.index_select(0, idx);
            *v = v.index_select(0, idx);
        }
    }
}

pub struct Llama {
    cfg: Config,
    layout: Layout,
    /// Index of each slot in a block's tensors or in `outer`.
    pos: [Option<usize>; SLOTS],
    /// Embeddings, final norm and head (`layout.before ++ layout.after`).
    outer: Vec<Tensor>,
    /// Each block's tensors, in `layout.block` order.
    layers: Vec<Vec<Tensor>>,
    inv_freq: Tensor,
    /// Longrope's set for forwards that reach past the original context.
    long_inv_freq: Option<Tensor>,
}

impl Llama {
    /// Build the model from named tensors. `get(spec)` must return the tensor for each
    /// [`ParamSpec`], and is called in [`param_specs`] order (the weights module checks names
    /// and shapes against the file).
    pub fn new(cfg: &Config, mut get: impl FnMut(&ParamSpec) -> crate::Result<Tensor>) -> crate::Result<Self> {
        let layout = Layout::new(cfg);
        let mut tensors = Vec::with_capacity(layout.before.len() + layout.layers * layout.block.len() + layout.after.len());
        for s in &layout.specs() {
            tensors.push(get(s)?);
        }
        let mut it = tensors.into_iter();
        let mut take = |n: usize| -> Vec<Tensor> { it.by_ref().take(n).collect() };
        let mut outer = take(layout.before.len());
        let layers: Vec<Vec<Tensor>> = (0..layout.layers).map(|_| take(layout.block.len())).collect();
        outer.extend(take(layout.after.len()));
        let device = outer[0].device();
        Ok(Llama {
            cfg: cfg.clone(),
            pos: layout.positions(),
            layout,
            outer,
            layers,
            inv_freq: rope_inv_freq(cfg, device),
            long_inv_freq: rope_inv_freq_long(cfg, device),
        })
    }

    /// A second model sharing every weight tensor with this one (no copy). The trainer rebinds
    /// its trainable weights to the teacher's buffers; frozen weights stay shared.
    pub fn shallow_copy(&self) -> Llama {
        let sc = |ts: &[Tensor]| ts.iter().map(Tensor::shallow_clone).collect::<Vec<_>>();
        Llama {
            cfg: self.cfg.clone(),
            layout: self.layout.clone(),
            pos: self.pos,
            outer: sc(&self.outer),
            layers: self.layers.iter().map(|b| sc(b)).collect(),
            inv_freq: self.inv_freq.shallow_clone(),
            long_inv_freq: self.long_inv_freq.as_ref().map(Tensor::shallow_clone),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> tch::Device {
        self.outer[0].device()
    }

    pub fn kind(&self) -> Kind {
        self.outer[0].kind()
    }

    /// Block weight `slot` of layer `l`; the layout guarantees it exists for this config.
    fn w(&self, l: usize, slot: Slot) -> &Tensor {
        let i = self.pos[slot as usize].unwrap_or_else(|| panic!("{slot:?} is not in this model's layout"));
        &self.layers[l][i]
    }

    /// Block weight `slot` of layer `l`, if the config has it (biases, q/k norms).
    fn opt(&self, l: usize, slot: Slot) -> Option<&Tensor> {
        self.pos[slot as usize].map(|i| &self.layers[l][i])
    }

    fn outer(&self, slot: Slot) -> Option<&Tensor> {
        self.pos[slot as usize].map(|i| &self.outer[i])
    }

    /// Visit every parameter mutably, in [`param_specs`] order. Used to rebind weights to flat
    /// buffers or to copy in new values.
    pub fn visit_params_mut(&mut self, mut f: impl FnMut(&str, &mut Tensor)) {
        let n_before = self.layout.before.len();
        for (d, t) in self.layout.before.iter().zip(&mut self.outer[..n_before]) {
            f(&d.name, t);
        }
        for l in 0..self.layers.len() {
            self.visit_layer_params_mut(Some(l), &mut f);
        }
        for (d, t) in self.layout.after.iter().zip(&mut self.outer[n_before..]) {
            f(&d.name, t);
        }
    }

    /// Visit the parameters of one layer (`None`: embeddings, final norm and head), in
    /// [`param_specs`] order. Used to bind a layer's weights just before it runs (ZeRO-3).
    pub fn visit_layer_params_mut(&mut self, layer: Option<usize>, mut f: impl FnMut(&str, &mut Tensor)) {
        match layer {
            Some(l) => {
                for (d, t) in self.layout.block.iter().zip(&mut self.layers[l]) {
                    f(&Layout::block_name(l, d), t);
                }
            }
            None => {
                for (d, t) in self.layout.before.iter().chain(&self.layout.after).zip(&mut self.outer) {
                    f(&d.name, t);
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
    pub fn forward_cached(&self, input_ids: &Tensor, attention_mask: &Tensor, position_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        self.head(&self.hidden_cached(input_ids, attention_mask, position_ids, cache))
    }

    /// [`Llama::forward_cached`] but only the last position's logits, `[b, v]`: what greedy
    /// decoding needs, without a `[b, s, v]` prefill tensor (gigabytes for long prompts and large
    /// vocabularies).
    pub fn forward_cached_last(&self, input_ids: &Tensor, attention_mask: &Tensor, position_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        let x_bsd = self.hidden_cached(input_ids, attention_mask, position_ids, cache);
        let s = x_bsd.size()[1];
        self.head(&x_bsd.narrow(1, s - 1, 1)).squeeze_dim(1)
    }

    /// Final hidden states (before the last norm) of an incremental forward.
    fn hidden_cached(&self, input_ids: &Tensor, attention_mask: &Tensor, position_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        let (b, s) = (input_ids.size()[0], input_ids.size()[1]);
        let long_rope = self.long_rope(position_ids);
        if !cache.is_empty() && long_rope != cache.long_rope {
            // Keys rotated with the other longrope factors cannot be mixed with these: start over
            // from every token seen, as transformers' Phi-3 `prepare_inputs_for_generation` does.
            let (ids, pos) = cache.seen.take().expect("a filled cache knows its tokens");
            *cache = KvCache::new();
            let all_ids = Tensor::cat(&[&ids, input_ids], 1);
            let all_pos = Tensor::cat(&[&pos, position_ids], 1);
            let x = self.hidden_cached(&all_ids, attention_mask, &all_pos, cache);
            return x.narrow(1, all_ids.size()[1] - s, s);
        }
        cache.long_rope = long_rope;
        cache.seen = Some(match cache.seen.take() {
            None => (input_ids.shallow_clone(), position_ids.shallow_clone()),
            Some((ids, pos)) => (Tensor::cat(&[&ids, input_ids], 1), Tensor::cat(&[&pos, position_ids], 1)),
        });
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
        x
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embedding lookup, `[b, s]` → `[b, s, d]`.
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(self.outer(Slot::Embed).expect("every model has embeddings"), input_ids, -1, false, false)
    }

    /// Final norm and LM head, `[b, s, d]` → `[b, s, v]`.
    pub fn head(&self, x_bsd: &Tensor) -> Tensor {
        let norm = self.outer(Slot::FinalNorm).expect("every model has a final norm");
        let h = rms_norm(x_bsd, norm, self.cfg.rms_norm_eps);
        let head = self.outer(Slot::Head).or(self.outer(Slot::Embed)).expect("every model has embeddings");
        h.linear(head, None::<Tensor>)
    }

    /// Rotary tables and attention masks for `s` new positions after `past` cached ones.
    pub fn attn_ctx(&self, s: i64, past: i64, attention_mask: Option<&Tensor>, position_ids: Option<&Tensor>, batch: i64) -> AttnCtx {
        let dev = self.device();
        let pos_bs = match position_ids {
            Some(p) => p.shallow_clone(),
            None => Tensor::arange_start(past, past + s, (Kind::Int64, dev)).unsqueeze(0).expand([batch, s], false),
        };
        let inv_freq = match &self.long_inv_freq {
            Some(long) if self.long_rope(&pos_bs) => long,
            _ => &self.inv_freq,
        };
        // freqs[b, s, j] = pos * inv_freq[j], in fp32 as transformers does (autocast off).
        let freqs = pos_bs.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (mut cos, mut sin) = (emb.cos(), emb.sin());
        if let Some(r) = &self.cfg.rope_longrope {
            cos *= r.attention_factor;
            sin *= r.attention_factor;
        }
        let kind = self.kind();
        // An explicit mask only when needed: padding present, cached keys before the queries, or
        // a sliding window that hides some key. Otherwise SDPA runs its fused causal path.
        let t = past + s;
        let window = self.cfg.sliding_window.filter(|w| t > *w);
        let has_padding = attention_mask.is_some_and(|m| m.min().int64_value(&[]) == 0);
        let full = || match attention_mask {
            Some(m) => m.shallow_clone(),
            None => Tensor::ones([batch, t], (Kind::Int64, dev)),
        };
        let mask_b1st = (has_padding || past > 0).then(|| causal_padding_mask(&full(), s));
        let window_mask_b1st = window.map(|w| causal_window_mask(&full(), s, Some(w)));
        AttnCtx { cos_bsr: cos.to_kind(kind), sin_bsr: sin.to_kind(kind), mask_b1st, window_mask_b1st }
    }

    /// Longrope switches every position of a forward to the long factors once any position
    /// reaches past the original context (transformers' `dynamic_rope_update`).
    fn long_rope(&self, pos_bs: &Tensor) -> bool {
        self.cfg.rope_longrope.as_ref().is_some_and(|r| pos_bs.max().int64_value(&[]) + 1 > r.original_max_position_embeddings)
    }

    /// One transformer block, `[b, s, d]` → `[b, s, d]` (no cache).
    pub fn layer_forward(&self, l: usize, x_bsd: &Tensor, ctx: &AttnCtx) -> Tensor {
        self.layer_forward_kv(l, x_bsd, ctx, None).0
    }

    /// One transformer block; also returns the full keys/values (past + new) for caching.
    fn layer_forward_kv(&self, l: usize, x_bsd: &Tensor, ctx: &AttnCtx, past: Option<&(Tensor, Tensor)>) -> (Tensor, Tensor, Tensor) {
        let eps = self.cfg.rms_norm_eps;
        let h = rms_norm(x_bsd, self.w(l, Slot::InputNorm), eps);
        let (attn, k, v) = self.attention(l, &h, ctx, past);
        let x = x_bsd + attn;
        let h = rms_norm(&x, self.w(l, Slot::PostNorm), eps);
        let (gate, up) = if self.cfg.fused_projections {
            let i = self.cfg.intermediate_size;
            let gate_up = h.linear(self.w(l, Slot::GateUp), None::<Tensor>);
            (gate_up.narrow(-1, 0, i), gate_up.narrow(-1, i, i))
        } else {
            (self.linear(l, &h, Slot::Gate, Slot::GateBias), self.linear(l, &h, Slot::Up, Slot::UpBias))
        };
        let gated = gate.silu() * up;
        (&x + self.linear(l, &gated, Slot::Down, Slot::DownBias), k, v)
    }

    /// `x · Wᵀ (+ b)` with layer `l`'s weight and, if the config has it, bias.
    fn linear(&self, l: usize, x: &Tensor, weight: Slot, bias: Slot) -> Tensor {
        x.linear(self.w(l, weight), self.opt(l, bias))
    }

    /// Queries `[b, s, h·e]`, keys and values `[b, s, g·e]`, from one fused or three projections.
    fn project_qkv(&self, l: usize, x_bsd: &Tensor) -> (Tensor, Tensor, Tensor) {
        if !self.cfg.fused_projections {
            return (
                self.linear(l, x_bsd, Slot::Q, Slot::QBias),
                self.linear(l, x_bsd, Slot::K, Slot::KBias),
                self.linear(l, x_bsd, Slot::V, Slot::VBias),
            );
        }
        let (q, kv) = (self.cfg.num_attention_heads * self.cfg.head_dim, self.cfg.num_key_value_heads * self.cfg.head_dim);
        let qkv = x_bsd.linear(self.w(l, Slot::Qkv), None::<Tensor>);
        (qkv.narrow(-1, 0, q), qkv.narrow(-1, q, kv), qkv.narrow(-1, q + kv, kv))
    }

    fn attention(&self, l: usize, x_bsd: &Tensor, ctx: &AttnCtx, past: Option<&(Tensor, Tensor)>) -> (Tensor, Tensor, Tensor) {
        let (b, s) = (x_bsd.size()[0], x_bsd.size()[1]);
        let (h, g, e) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let (q, k, v) = self.project_qkv(l, x_bsd);
        let (mut q_bshe, mut k_bsge) = (q.view([b, s, h, e]), k.view([b, s, g, e]));
        if self.cfg.qk_norm {
            q_bshe = rms_norm(&q_bshe, self.w(l, Slot::QNorm), self.cfg.rms_norm_eps);
            k_bsge = rms_norm(&k_bsge, self.w(l, Slot::KNorm), self.cfg.rms_norm_eps);
        }
        let q_bhse = q_bshe.transpose(1, 2);
        let k_bgse = k_bsge.transpose(1, 2);
        let v_bgse = v.view([b, s, g, e]).transpose(1, 2);
        let cos = ctx.cos_bsr.unsqueeze(1);
        let sin = ctx.sin_bsr.unsqueeze(1);
        let q_bhse = apply_rope(&q_bhse, &cos, &sin);
        let k_bgse = apply_rope(&k_bgse, &cos, &sin);
        let (k_bgte, v_bgte) = match past {
            None => (k_bgse, v_bgse),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k_bgse], 2), Tensor::cat(&[pv, &v_bgse], 2)),
        };
        let mask = match (self.cfg.layer_window(l), &ctx.window_mask_b1st) {
            (Some(_), Some(m)) => Some(m),
            _ => ctx.mask_b1st.as_ref(),
        };
        let scale = (e as f64).powf(-0.5);
        let o_bhse = Tensor::scaled_dot_product_attention(&q_bhse, &k_bgte, &v_bgte, mask, 0.0, mask.is_none(), Some(scale), g != h);
        let o_bsd = o_bhse.transpose(1, 2).reshape([b, s, h * e]);
        (self.linear(l, &o_bsd, Slot::O, Slot::OBias), k_bgte, v_bgte)
    }
}

/// `x·cos + rotate_half(x)·sin` on the leading r dims of each head (all of them unless the config
/// rotates only part, as Phi-3's `partial_rotary_factor` does); the rest pass unchanged.
fn apply_rope(x: &Tensor, cos_b1sr: &Tensor, sin_b1sr: &Tensor) -> Tensor {
    let (e, r) = (x.size()[3], cos_b1sr.size()[3]);
    if r == e {
        return x * cos_b1sr + rotate_half(x) * sin_b1sr;
    }
    let rot = x.narrow(-1, 0, r);
    let rotated = &rot * cos_b1sr + rotate_half(&rot) * sin_b1sr;
    Tensor::cat(&[&rotated, &x.narrow(-1, r, e - r)], -1)
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

/// `inv_freq[j] = 1 / theta^(2j/r)` in fp32 over the r rotated dims, with the `llama3`
/// long-context rescaling or longrope's short factors if configured.
pub fn rope_inv_freq(cfg: &Config, device: tch::Device) -> Tensor {
    let short = cfg.rope_longrope.as_ref().map(|r| r.short_factor.as_slice());
    let inv_freq = base_inv_freq(cfg, short, device);
    let Some(r) = cfg.rope_llama3 else { return inv_freq };
    let low_wavelen = r.original_max_position_embeddings / r.low_freq_factor;
    let high_wavelen = r.original_max_position_embeddings / r.high_freq_factor;
    let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
    // Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    let scaled = (&inv_freq / r.factor).where_self(&wavelen.gt(low_wavelen), &inv_freq);
    let smooth =
        ((wavelen.reciprocal() * r.original_max_position_embeddings) - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    let smoothed = (smooth.ones_like() - &smooth) * &scaled / r.factor + &smooth * &scaled;
    let is_medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
    smoothed.where_self(&is_medium, &scaled)
}

/// Longrope's frequencies for forwards past the original context (`None` without longrope).
pub fn rope_inv_freq_long(cfg: &Config, device: tch::Device) -> Option<Tensor> {
    cfg.rope_longrope.as_ref().map(|r| base_inv_freq(cfg, Some(&r.long_factor), device))
}

/// `1 / (factor_j · theta^(2j/r))`, as transformers' default and longrope initialisers compute it.
fn base_inv_freq(cfg: &Config, factors: Option<&[f64]>, device: tch::Device) -> Tensor {
    let r = cfg.rotary_dim();
    let exponent = Tensor::arange_start_step(0, r, 2, (Kind::Int64, device)).to_kind(Kind::Float) / (r as f64);
    let powers = Tensor::from(cfg.rope_theta as f32).to_device(device).pow(&exponent);
    match factors {
        None => powers.reciprocal(),
        Some(f) => {
            let f32s: Vec<f32> = f.iter().map(|&x| x as f32).collect();
            (Tensor::from_slice(&f32s).to_device(device) * powers).reciprocal()
        }
    }
}

/// Boolean `[b, 1, s, t]` mask for the last `s` of `t` positions: causal, padding keys hidden.
/// A query always sees itself, so rows of padding queries are never empty (no NaN from softmax);
/// their outputs are garbage by construction and are masked out of every loss.
pub fn causal_padding_mask(attention_mask_bt: &Tensor, s: i64) -> Tensor {
    causal_window_mask(attention_mask_bt, s, None)
}

/// [`causal_padding_mask`], and with a `window` also hiding keys `window` or more positions
/// (cache slots) behind the query, as transformers' `sliding_window_overlay` does.
pub fn causal_window_mask(attention_mask_bt: &Tensor, s: i64, window: Option<i64>) -> Tensor {
    let (b, t) = (attention_mask_bt.size()[0], attention_mask_bt.size()[1]);
    let dev = attention_mask_bt.device();
    let q_pos = Tensor::arange_start(t - s, t, (Kind::Int64, dev)).view([s, 1]);
    let k_pos = Tensor::arange(t, (Kind::Int64, dev)).view([1, t]);
    let mut visible_st = k_pos.le_tensor(&q_pos);
    if let Some(w) = window {
        visible_st = visible_st.logical_and(&k_pos.gt_tensor(&(&q_pos - w)));
    }
    let diag_st = k_pos.eq_tensor(&q_pos);
    let keys_b11t = attention_mask_bt.ne(0).view([b, 1, 1, t]);
    (visible_st.view([1, 1, s, t]).logical_and(&keys_b11t)).logical_or(&diag_st.view([1, 1, s, t]))
}

/// Positions for a left- or right-padded batch: running count of real tokens, 1 at padding
/// (what transformers' `generate` uses).
pub fn positions_from_mask(attention_mask_bt: &Tensor) -> Tensor {
    let pos = attention_mask_bt.cumsum(1, Kind::Int64) - 1;
    pos.masked_fill(&attention_mask_bt.eq(0), 1)
}

//! Bytes that one forward/backward keeps or creates, per token and per logit, read off the code
//! of `model::llama` (the block), `methods::losses` (the losses) and `train::backward` (what each
//! executor holds). Every count names the tensor it stands for, so that a change in those files
//! can be mirrored here.
//!
//! Conventions: `c` is the compute dtype's size (2 for bf16, 4 for fp32); RMSNorm always works in
//! fp32 (`rms_norm` casts up), and the losses always work in fp32 (`log_softmax(.., Float)`).
//! Attention is the fused SDPA kernel (flash on CPU and CUDA, memory-efficient with a padding
//! mask): no `[b, h, s, s]` score matrix is ever stored, and its output is laid out `[b, s, h, e]`
//! so that the reshape feeding `o_proj` is a view (checked with torch 2.11 on CPU).

use crate::methods::LossKind;
use crate::model::Config;

/// The widths a block's tensors are made of.
#[derive(Debug, Clone, Copy)]
pub struct Widths {
    pub hidden: f64,
    pub intermediate: f64,
    /// Query width `heads × head_dim`.
    pub q: f64,
    /// Key (= value) width `kv_heads × head_dim`.
    pub kv: f64,
    pub heads: f64,
    pub vocab: f64,
    /// Compute dtype size in bytes.
    pub c: f64,
    /// Norm weights are trainable (`model.trainable = "all"`): autograd then also keeps the
    /// normalised activations that multiply them.
    pub norms_trainable: bool,
    /// Per-head q/k RMSNorm (Qwen3).
    pub qk_norm: bool,
    /// Fused `qkv_proj` / `gate_up_proj` (Phi-3): q, k, v and gate, up are views of one output.
    pub fused: bool,
}

impl Widths {
    pub fn new(cfg: &Config, compute_bytes: f64, norms_trainable: bool) -> Self {
        Widths {
            hidden: cfg.hidden_size as f64,
            intermediate: cfg.intermediate_size as f64,
            q: (cfg.num_attention_heads * cfg.head_dim) as f64,
            kv: (cfg.num_key_value_heads * cfg.head_dim) as f64,
            heads: cfg.num_attention_heads as f64,
            vocab: cfg.vocab_size as f64,
            c: compute_bytes,
            norms_trainable,
            qk_norm: cfg.qk_norm,
            fused: cfg.fused_projections,
        }
    }

    /// Bytes per token autograd keeps for one block (graph on). `input_stored`: the block input
    /// is already held elsewhere in fp32 (layer-wise executor in fp32, where RMSNorm's fp32 view
    /// of its input is the stored input itself).
    pub fn block_saved(&self, input_stored: bool) -> f64 {
        let (d, i, c) = (self.hidden, self.intermediate, self.c);
        // RMSNorm saves its fp32 input (pow and mul backward) and 1/rms (4 B per token, ignored).
        // In bf16 that fp32 input is a fresh cast; in fp32 it is the block input itself.
        let norm1_in = if input_stored && c == 4.0 { 0.0 } else { 4.0 * d };
        let norm2_in = 4.0 * d;
        // weight · normed is saved (normed side) only when the weight needs a gradient.
        let normed = if self.norms_trainable { 2.0 * c * d } else { 0.0 };
        // Normalised hidden states feeding q/k/v and gate/up (saved once each by `linear`).
        let h1_h2 = 2.0 * c * d;
        // Rotated q and k, v (a view of v_proj's output), SDPA output (= o_proj's input) and
        // SDPA's fp32 log-sum-exp per head.
        let attn = c * (self.q + 2.0 * self.kv) + c * self.q + 4.0 * self.heads;
        // SwiGLU: gate (silu's input), silu(gate) and up (the product's inputs), gate·up (down_proj's input).
        // Fused, gate and up are views of one gate_up output: the same bytes.
        let mlp = 4.0 * c * i;
        // q/k norms save their fp32 inputs (and the normalised q, k when their weights train).
        let qk = if self.qk_norm { (4.0 + if self.norms_trainable { c } else { 0.0 }) * (self.q + self.kv) } else { 0.0 };
        // SDPA saves v, a view of the fused qkv output, which keeps all of it alive.
        let fused_v = if self.fused { c * (self.q + self.kv) } else { 0.0 };
        norm1_in + norm2_in + normed + h1_h2 + attn + mlp + qk + fused_v
    }

    /// Bytes per token that backward creates inside one block at its widest point, above what
    /// the block had saved: in the MLP, the gradient reaching `gate·up` and the two product-rule
    /// gradients are alive while `gate·up` itself is already released (2·c·i net), plus a
    /// hidden-width gradient. Measured on the CPU in fp32 with the layer-wise executor
    /// (/proc/self/clear_refs peak reset around one block's VJP): 16.6 kB/token at d = 1024,
    /// i = 2752 and 10.8 kB/token at d = 512, i = 1376; this count (26.1 and 13.1 kB) stays above.
    ///
    /// Fused projections (not measured; counted from autograd): each slice's gradient is a
    /// zero-padded tensor of the whole fused width, two of which are alive while they are summed
    /// (4·c·i at gate_up, 2·c·(q + 2·kv) at qkv; the larger counts).
    pub fn block_backward_temps(&self) -> f64 {
        let (d, i, c) = (self.hidden, self.intermediate, self.c);
        if self.fused {
            return (4.0 * c * i).max(2.0 * c * (self.q + 2.0 * self.kv)) + c * d;
        }
        2.0 * c * i + c * d
    }

    /// Bytes per token alive inside one block run without a graph (teacher forwards, the
    /// layer-wise executor's first pass, probes, reference sums): at the MLP, gate, silu(gate), up
    /// and their product are alive together with the residual stream, its fp32 norm copy and the
    /// block input (measured: 252 MiB for 4096 tokens at d = 1024, i = 2752 in fp32, as counted).
    pub fn block_nograd_peak(&self) -> f64 {
        let (d, i, c) = (self.hidden, self.intermediate, self.c);
        4.0 * c * i + 3.0 * c * d + 8.0 * d
    }

    /// Bytes per token the head keeps with the graph on: the final norm's fp32 input and the
    /// normalised hidden state (lm_head's input).
    pub fn head_saved(&self) -> f64 {
        let (d, c) = (self.hidden, self.c);
        let normed = if self.norms_trainable { c * d } else { 0.0 };
        4.0 * d + c * d + normed
    }
}

/// What each loss costs in memory (the enum is the methods' declaration of which loss they use).
impl LossKind {
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Nll => "NLL",
            LossKind::Npo => "NPO",
            LossKind::Nlul => "NLUL",
            LossKind::Kl => "KL to teacher",
            LossKind::Qkl => "QKL to teacher",
        }
    }

    /// Bytes per logit element `[b, s, V]` alive at the loss's widest point, the student logits
    /// (compute dtype) included, the teacher's logits excluded (held by the trainer separately).
    /// `log_softmax(.., Float)` casts its input to a fresh fp32 tensor first (bf16, or a
    /// non-contiguous narrow), so every log-softmax costs 8 B per element while it runs.
    pub fn peak_per_logit(self, c: f64) -> f64 {
        match self {
            // Saved log-probs (4) + the cast and output of the backward's first kernels: the
            // incoming gradient, log_softmax's saved output and its backward output (12 in all).
            // NLUL's weights come from the same log-probs (no second softmax).
            LossKind::Nll | LossKind::Npo | LossKind::Nlul => c + 12.0,
            // log q (saved 4), log p (4), p = exp(log p) (saved 4), log p − log q (4), the product (4).
            LossKind::Kl => c + 20.0,
            // fp32 casts of both logit sets (bf16 only), Δ, p̄, (Δ − ⟨p̄,Δ⟩), F̄Δ.
            LossKind::Qkl => c + 16.0 + if c == 2.0 { 8.0 } else { 0.0 },
        }
    }

    /// What the count stands for, for the plan's table.
    pub fn peak_words(self) -> &'static str {
        match self {
            LossKind::Nll | LossKind::Npo | LossKind::Nlul => "logits + saved fp32 log-probs + backward's fp32 gradient temporaries",
            LossKind::Kl => "logits + fp32 log q (saved), log p, p (saved), log p − log q, p·(log p − log q)",
            LossKind::Qkl => "logits + fp32 casts, Δ, p̄, Δ − ⟨p̄,Δ⟩, F̄Δ",
        }
    }
}

/// Bytes per logit element of a no-grad forward followed by `target_logprobs` (probes, reference
/// sums): the logits, the fp32 cast inside `log_softmax` and its output.
pub fn nograd_logprobs_per_logit(c: f64) -> f64 {
    c + 8.0
}

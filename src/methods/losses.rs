//! The losses of algorithms.md, as functions of logits and masks. All are computed in fp32 and
//! normalised by a *global* denominator (the whole micro-batch across ranks) handed in by the
//! caller, so that per-rank losses sum to the single-process loss.
//!
//! Conventions (algorithms.md §1.3, §1.4): targets are `input_ids[:, 1:]` predicted from
//! `logits[:, :-1]` under the target mask; penalties compare teacher and student at every position
//! of the batch under the attention mask, with no shift.

use tch::{Kind, Tensor};

/// Target-token log-probs `[b, t-1]` in fp32, zero off-target.
pub fn target_logprobs(logits_btv: &Tensor, input_ids: &Tensor, target_mask: &Tensor) -> Tensor {
    let t = logits_btv.size()[1];
    let lp = logits_btv.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
    lp.gather(-1, &input_ids.narrow(1, 1, t - 1).unsqueeze(-1), false).squeeze_dim(-1) * target_mask
}

/// Token-mean negative log-likelihood: `-Σ m·log p / n_targets`.
pub fn nll(lp_bt: &Tensor, n_targets: f64) -> Tensor {
    -lp_bt.sum(Kind::Float) / n_targets
}

/// Negative log-unlikelihood (Klochkov): per token `-log(1 + tol - p)`, implemented as the
/// surrogate `Σ m·w·log p / N` with `w = p / (1 + tol - p)` detached and `p` from the detached
/// logits; it has the same gradient (`w·∇log p`) and avoids a `log(0)` as p → 1.
pub fn nlul(logits_btv: &Tensor, input_ids: &Tensor, target_mask: &Tensor, tol: f64, n_targets: f64) -> Tensor {
    nlul_from_logprobs(&target_logprobs(logits_btv, input_ids, target_mask), target_mask, tol, n_targets)
}

/// [`nlul`] from the target log-probs, for callers that already have them (no second softmax).
pub fn nlul_from_logprobs(lp: &Tensor, target_mask: &Tensor, tol: f64, n_targets: f64) -> Tensor {
    let lp_d = lp.detach();
    // The weight exists only on targets: off-target lp is 0, i.e. p = 1, where tol = 0 would give
    // 1/0 and then ∞·0 = NaN. 1 − p is −expm1(lp), exact near p = 1 where 1 − exp(lp) cancels; it
    // and 1 + tol − p is floored at 2⁻²⁴, the resolution of an fp32 log-prob near 0 (never binding
    // for tol ≥ 2⁻²⁴), so that a target whose log-prob rounds to 0 keeps a finite weight at tol = 0
    // (its logit gradient w·(1_y − softmax) then stays below 1 in size, like the true loss's).
    let denom = (-lp_d.expm1() + tol).clamp_min(f64::from(f32::EPSILON) / 2.0);
    let w = (lp_d.exp() / denom).where_self(&target_mask.gt(0.0), &lp_d.zeros_like());
    (w * lp * target_mask).sum(Kind::Float) / n_targets
}

/// The NPO log-ratio per sequence: how the log-likelihood moved from the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpoVariant {
    /// Standard NPO (Zhang et al.): `r_i = Σ_t m (log p_θ − log p_ref)`, loss
    /// `mean_i −(2/β) log σ(−β r_i)` over the sequences of the batch.
    Standard,
    /// mt-unlearn's form: `r_i` divided by the *padded* length T, weights `2σ(β r_i)` detached,
    /// loss `Σ_i w_i Σ_t m log p_θ / N` (same gradient direction per sequence, token-normalised).
    MtUnlearn,
}

/// NPO on a batch. `ref_sums_b` are `Σ_t m log p_ref` per row (precomputed once from the frozen
/// reference model); `n_sequences`, `n_targets` and `padded_len` describe the global micro-batch.
pub fn npo(
    lp_bt: &Tensor,
    ref_sums_b: &Tensor,
    beta: f64,
    variant: NpoVariant,
    n_sequences: f64,
    n_targets: f64,
    padded_len: f64,
) -> Tensor {
    let sums_b = lp_bt.sum_dim_intlist(1, false, Kind::Float);
    match variant {
        NpoVariant::Standard => {
            let r = &sums_b - ref_sums_b;
            (r * -beta).log_sigmoid().sum(Kind::Float) * (-2.0 / beta) / n_sequences
        }
        NpoVariant::MtUnlearn => {
            let r = (sums_b.detach() - ref_sums_b) / padded_len;
            let w = (r * beta).sigmoid() * 2.0;
            (w.detach() * sums_b).sum(Kind::Float) / n_targets
        }
    }
}

/// The value NPO reports for logging (the standard NPO objective, whatever the variant).
pub fn npo_value(lp_bt: &Tensor, ref_sums_b: &Tensor, beta: f64, n_sequences: f64) -> f64 {
    let r = lp_bt.sum_dim_intlist(1, false, Kind::Float) - ref_sums_b;
    ((r * -beta).log_sigmoid().sum(Kind::Float) * (-2.0 / beta) / n_sequences).double_value(&[])
}

/// `KL(p_teacher ‖ p_student)` summed over the vocabulary at every position, masked by the
/// attention mask, divided by the global number of (padded) positions B×T.
pub fn kl_to_teacher(student_btv: &Tensor, teacher_btv: &Tensor, attention_mask_bt: &Tensor, positions: f64) -> Tensor {
    let log_q = student_btv.log_softmax(-1, Kind::Float);
    let log_p = teacher_btv.log_softmax(-1, Kind::Float).detach();
    let kl_bt = (log_p.exp() * (&log_p - log_q)).sum_dim_intlist(-1, false, Kind::Float);
    (kl_bt * attention_mask_bt.to_kind(Kind::Float)).sum(Kind::Float) / positions
}

/// Quadratic KL: `Δᵀ F̄ Δ` with `Δ = z_student − z_teacher` and `F̄ = diag(p̄) − p̄p̄ᵀ` the softmax
/// Fisher at the teacher, with `F̄Δ` detached; its gradient w.r.t. the logits is `F̄Δ`, the gradient
/// of the second-order expansion of `KL(p̄ ‖ p_θ)`. The reported value is twice that expansion.
pub fn qkl_to_teacher(student_btv: &Tensor, teacher_btv: &Tensor, attention_mask_bt: &Tensor, positions: f64) -> Tensor {
    let z_s = student_btv.to_kind(Kind::Float);
    let z_t = teacher_btv.to_kind(Kind::Float).detach();
    let delta = &z_s - &z_t;
    let p_bar = z_t.softmax(-1, Kind::Float);
    let mean_delta = (&p_bar * delta.detach()).sum_dim_intlist(-1, true, Kind::Float);
    let fisher_delta = (&p_bar * (delta.detach() - mean_delta)).detach();
    let q_bt = (delta * fisher_delta).sum_dim_intlist(-1, false, Kind::Float);
    (q_bt * attention_mask_bt.to_kind(Kind::Float)).sum(Kind::Float) / positions
}

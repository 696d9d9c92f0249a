//! Negative preference optimisation (Zhang et al. 2024) against the frozen original model, with
//! an optional retain NLL term (NPO+GDR when `retain_weight > 0`).
//!
//! The reference enters only through `Σ_t log p_ref` per forget example, which the trainer
//! precomputes once before training; no reference model is held in memory during training.

use tch::Tensor;

use super::losses::{self, NpoVariant};
use super::{batch_logprobs, nll_loss, Aux, Direction, Grads, LossOut, Method, Objective};
use crate::config::MethodCfg;
use crate::data::loader::LocalBatch;
use crate::Result;

pub struct Npo {
    beta: f64,
    variant: NpoVariant,
    retain_weight: f64,
}

impl Npo {
    pub fn new(cfg: &MethodCfg) -> Self {
        Npo { beta: cfg.npo_beta, variant: npo_variant(&cfg.npo_variant), retain_weight: cfg.retain_weight }
    }
}

pub(crate) fn npo_variant(name: &str) -> NpoVariant {
    if name == "mt-unlearn" {
        NpoVariant::MtUnlearn
    } else {
        NpoVariant::Standard
    }
}

/// The NPO forget loss of a batch from its target log-probs `lp` (shared with mean teacher's
/// `forget_loss = "npo"`).
pub(crate) fn npo_forget_loss(lp: &Tensor, batch: &LocalBatch, aux: &Aux, beta: f64, variant: NpoVariant) -> Result<LossOut> {
    let ref_sums = aux.ref_sums.as_ref().ok_or_else(|| crate::other!("NPO needs reference log-likelihoods"))?;
    let g = &batch.global;
    let loss = losses::npo(lp, ref_sums, beta, variant, g.sequences as f64, g.targets.max(1) as f64, g.padded_len as f64);
    Ok(LossOut { value: losses::npo_value(&lp.detach(), ref_sums, beta, g.sequences as f64), loss })
}

impl Method for Npo {
    fn objectives(&self) -> &'static [Objective] {
        if self.retain_weight > 0.0 {
            &[Objective::Forget, Objective::Retain]
        } else {
            &[Objective::Forget]
        }
    }
    fn needs_reference(&self) -> bool {
        true
    }
    fn loss(&mut self, obj: Objective, logits: &Tensor, batch: &LocalBatch, aux: &Aux) -> Result<LossOut> {
        match obj {
            Objective::Forget => npo_forget_loss(&batch_logprobs(logits, batch), batch, aux, self.beta, self.variant),
            Objective::Retain => nll_loss(logits, batch),
        }
    }
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        let f = g.forget.expect("forget gradient");
        let d = match g.retain {
            Some(r) => f + r * self.retain_weight,
            None => f.shallow_clone(),
        };
        Ok(Direction { d, clip: 1.0 })
    }
}

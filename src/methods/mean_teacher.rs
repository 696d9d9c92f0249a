//! Mean teacher with the NLUL loss (Klochkov 2025), per algorithms.md §1.2:
//!
//! 1. gradient of `α·L_forget` on the forget batch (NLUL by default; GA or NPO for ablations);
//! 2. gradient of `β·D(teacher ‖ student)` on retain/pretraining text, D = KL or QKL, the teacher
//!    being the fp32 EMA of the student;
//! 3. clip the sum to norm C: `c = min(1, C/‖g‖)`, `g ← c·g`;
//! 4. add the proximal pull `λ·c·(θ − θ̄)` after clipping;
//! 5. optimizer step (SGD with momentum in the paper; AdamW for the baselines);
//! 6. EMA of the teacher with the updated θ at rate `δ·c`: `θ̄ ← (1 − δc)·θ̄ + δc·θ`.
//!
//! The same `c` scales the gradient, the pull and the EMA rate. With δ = λ = 0 the teacher stays
//! the original model and this is the papers' "baseline + KL to θ₀" loop.
//! The teacher shard is fp32 whatever the compute dtype: δ·c ≤ 0.005 is below bf16 resolution.

use tch::{Kind, Tensor};

use super::losses::{self, NpoVariant};
use super::npo::{npo_forget_loss, npo_variant};
use super::{batch_logprobs, Aux, Direction, Grads, LossOut, Method, Objective};
use crate::config::MethodCfg;
use crate::data::loader::LocalBatch;
use crate::Result;

enum ForgetLoss {
    Nlul { tol: f64 },
    Ga,
    Npo { beta: f64, variant: NpoVariant },
}

#[derive(PartialEq)]
enum Penalty {
    Kl,
    Qkl,
}

pub struct MeanTeacher {
    alpha: f64,
    beta: f64,
    delta: f64,
    damp: f64,
    clip: f64,
    forget_loss: ForgetLoss,
    penalty: Penalty,
    teacher: Tensor,
}

impl MeanTeacher {
    pub fn new(cfg: &MethodCfg, params: &Tensor) -> Result<Self> {
        let forget_loss = match cfg.forget_loss.as_str() {
            "nlul" => ForgetLoss::Nlul { tol: cfg.tol },
            "ga" => ForgetLoss::Ga,
            _ => ForgetLoss::Npo { beta: cfg.npo_beta, variant: npo_variant(&cfg.npo_variant) },
        };
        Ok(MeanTeacher {
            alpha: cfg.alpha,
            beta: cfg.beta,
            delta: cfg.delta,
            damp: cfg.damp,
            clip: cfg.clip,
            forget_loss,
            penalty: if cfg.penalty == "qkl" { Penalty::Qkl } else { Penalty::Kl },
            teacher: params.to_kind(Kind::Float).copy(),
        })
    }
}

impl Method for MeanTeacher {
    fn objectives(&self) -> &'static [Objective] {
        &[Objective::Forget, Objective::Retain]
    }
    fn needs_teacher(&self, obj: Objective) -> bool {
        obj == Objective::Retain
    }
    fn needs_reference(&self) -> bool {
        matches!(self.forget_loss, ForgetLoss::Npo { .. })
    }

    fn loss(&mut self, obj: Objective, logits: &Tensor, batch: &LocalBatch, aux: &Aux) -> Result<LossOut> {
        let b = &batch.batch;
        match obj {
            Objective::Forget => {
                let n = batch.global.targets.max(1) as f64;
                // One log-softmax serves the loss and the logged value: the plain token-mean NLL,
                // whatever the loss (as the authors log it).
                let lp = batch_logprobs(logits, batch);
                let nll = losses::nll(&lp.detach(), n).double_value(&[]);
                let loss = match &self.forget_loss {
                    ForgetLoss::Nlul { tol } => losses::nlul_from_logprobs(&lp, &b.target_mask, *tol, n),
                    ForgetLoss::Ga => -losses::nll(&lp, n),
                    ForgetLoss::Npo { beta, variant } => npo_forget_loss(&lp, batch, aux, *beta, *variant)?.loss,
                };
                Ok(LossOut { loss: loss * self.alpha, value: nll })
            }
            Objective::Retain => {
                let teacher = aux.teacher_logits.as_ref().ok_or_else(|| crate::other!("mean teacher needs teacher logits"))?;
                let positions = batch.global.positions as f64;
                let d = match self.penalty {
                    Penalty::Kl => losses::kl_to_teacher(logits, teacher, &b.attention_mask, positions),
                    Penalty::Qkl => losses::qkl_to_teacher(logits, teacher, &b.attention_mask, positions),
                };
                Ok(LossOut { value: d.double_value(&[]), loss: d * self.beta })
            }
        }
    }

    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        let (f, r) = (g.forget.expect("forget gradient"), g.retain.expect("retain gradient"));
        let s = g.stats;
        let norm = (s.sq_forget + s.sq_retain + 2.0 * s.dot).max(0.0).sqrt();
        let c = if norm > 0.0 { (self.clip / norm).min(1.0) } else { 1.0 };
        let mut d = (f + r) * c;
        if self.damp != 0.0 {
            d += (g.params - &self.teacher) * (self.damp * c);
        }
        Ok(Direction { d, clip: c })
    }

    fn after_step(&mut self, params: &Tensor, dir: &Direction) -> Result<()> {
        if self.delta != 0.0 {
            let rate = self.delta * dir.clip;
            let _ = self.teacher.f_mul_scalar_(1.0 - rate)?;
            let _ = self.teacher.f_add_(&(params * rate))?;
        }
        Ok(())
    }

    fn teacher_shard(&self) -> Option<&Tensor> {
        Some(&self.teacher)
    }
    fn teacher_shard_mut(&mut self) -> Option<&mut Tensor> {
        Some(&mut self.teacher)
    }
}

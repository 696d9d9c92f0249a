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

use serde::Serialize;
use tch::{Kind, Tensor};

use super::losses::{self, NpoVariant};
use super::npo::{npo_forget_loss, NpoSettings, ReferenceSums};
use super::{
    batch_logprobs, Aux, Direction, Gradients, Grads, LossKind, LossOut, Method, MethodCfg, MethodConfig, Objective, Passes, Registration,
    Spec, UpdateShape,
};
use crate::config::{choice, Bound, Section, Trainable};
use crate::data::loader::LocalBatch;
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: "mean-teacher", parse: MeanTeacherCfg::parse };

/// The loss on the forget batch (`method.forget_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgetLoss {
    /// Negative log-unlikelihood (the paper's).
    Nlul,
    /// Gradient ascent (ablation).
    Ga,
    /// NPO against the reference (ablation).
    Npo,
}
choice!(ForgetLoss { "nlul" => ForgetLoss::Nlul, "ga" => ForgetLoss::Ga, "npo" => ForgetLoss::Npo });

/// The divergence to the teacher on retain/pretraining text (`method.penalty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Penalty {
    Kl,
    Qkl,
}
choice!(Penalty { "kl" => Penalty::Kl, "qkl" => Penalty::Qkl });

impl Penalty {
    /// The loss's memory class, for the spec.
    pub fn loss_kind(self) -> LossKind {
        match self {
            Penalty::Kl => LossKind::Kl,
            Penalty::Qkl => LossKind::Qkl,
        }
    }

    /// `D(teacher ‖ student)` at every position under `mask`, over the global B×T `positions`.
    pub fn divergence(self, student: &Tensor, teacher: &Tensor, mask: &Tensor, positions: f64) -> Tensor {
        match self {
            Penalty::Kl => losses::kl_to_teacher(student, teacher, mask, positions),
            Penalty::Qkl => losses::qkl_to_teacher(student, teacher, mask, positions),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MeanTeacherCfg {
    pub forget_loss: ForgetLoss,
    pub penalty: Penalty,
    pub alpha: f64,
    pub beta: f64,
    pub delta: f64,
    pub damp: f64,
    pub clip: f64,
    pub tol: f64,
    /// For `forget_loss = "npo"`.
    #[serde(flatten)]
    pub npo: NpoSettings,
}

impl MeanTeacherCfg {
    fn parse(s: &Section) -> Result<MethodCfg> {
        Ok(MethodCfg::new(MeanTeacherCfg {
            forget_loss: s.choice("forget_loss", ForgetLoss::Nlul)?,
            penalty: s.choice("penalty", Penalty::Kl)?,
            alpha: s.float("alpha", 0.05, Bound::NonNegative)?,
            beta: s.float("beta", 1.0, Bound::NonNegative)?,
            delta: s.float("delta", 0.005, Bound::UnitInterval)?,
            damp: s.float("damp", 5.0, Bound::NonNegative)?,
            clip: s.float("clip", 1.0, Bound::Positive)?,
            tol: s.float("tol", 0.02, Bound::NonNegative)?,
            npo: NpoSettings::parse(s, NpoVariant::MtUnlearn)?,
        }))
    }
}

impl MethodConfig for MeanTeacherCfg {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }
    fn spec(&self) -> Spec {
        let forget = match self.forget_loss {
            ForgetLoss::Nlul => LossKind::Nlul,
            ForgetLoss::Ga => LossKind::Nll,
            ForgetLoss::Npo => LossKind::Npo,
        };
        let retain = self.penalty.loss_kind();
        // d = g·c, then + (θ − θ̄)·λc: two temporaries next to d; EMA: θ·δc.
        let update = UpdateShape {
            direction_aliases: false,
            direction_temps: if self.damp != 0.0 { 2.0 } else { 0.0 },
            after_step_temps: if self.delta != 0.0 { 1.0 } else { 0.0 },
        };
        Spec {
            teacher_on: Some(Objective::Retain),
            reference: (self.forget_loss == ForgetLoss::Npo).then(|| self.npo.reference_pass()),
            clips_itself: true,
            ..Spec::new(
                vec![(Objective::Forget, forget), (Objective::Retain, retain)],
                Gradients::WeightedSum { forget: 1.0, retain: 1.0 },
                update,
                Trainable::Matrices,
            )
        }
    }
    fn data_words(&self, obj: Objective) -> &'static str {
        match obj {
            Objective::Forget => "forget data",
            Objective::Retain => "retain or pretraining text for the KL penalty",
        }
    }
    fn model_dirs(&self) -> Vec<(&'static str, &std::path::Path)> {
        self.npo.model_dirs()
    }
    fn build(&self, params: &Tensor, _lr: f64) -> Result<Box<dyn Method>> {
        Ok(Box::new(MeanTeacher { cfg: self.clone(), reference: None, teacher: params.to_kind(Kind::Float).copy() }))
    }
}

pub struct MeanTeacher {
    cfg: MeanTeacherCfg,
    /// NPO's reference sums (`forget_loss = "npo"` only).
    reference: Option<ReferenceSums>,
    teacher: Tensor,
}

impl Method for MeanTeacher {
    fn prepare(&mut self, passes: &mut dyn Passes) -> Result<()> {
        if self.cfg.forget_loss == ForgetLoss::Npo {
            self.reference = Some(ReferenceSums::compute(passes, &self.cfg.npo)?);
        }
        Ok(())
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
                let loss = match self.cfg.forget_loss {
                    ForgetLoss::Nlul => losses::nlul_from_logprobs(&lp, &b.target_mask, self.cfg.tol, n),
                    ForgetLoss::Ga => -losses::nll(&lp, n),
                    ForgetLoss::Npo => npo_forget_loss(&lp, batch, self.reference.as_ref(), &self.cfg.npo)?.loss,
                };
                Ok(LossOut { loss: loss * self.cfg.alpha, value: nll })
            }
            Objective::Retain => {
                let teacher = aux.teacher_logits.as_ref().ok_or_else(|| crate::other!("mean teacher needs teacher logits"))?;
                let positions = batch.global.positions as f64;
                let d = self.cfg.penalty.divergence(logits, teacher, &b.attention_mask, positions);
                Ok(LossOut { value: d.double_value(&[]), loss: d * self.cfg.beta })
            }
        }
    }

    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        // The one accumulated gradient is g_F + g_R (α and β are in the losses).
        let (sum, sq) = g.sum();
        let norm = sq.max(0.0).sqrt();
        let c = if norm > 0.0 { (self.cfg.clip / norm).min(1.0) } else { 1.0 };
        let mut d = sum * c;
        if self.cfg.damp != 0.0 {
            d += (g.params - &self.teacher) * (self.cfg.damp * c);
        }
        Ok(Direction { d, clip: c })
    }

    fn after_step(&mut self, params: &Tensor, dir: &Direction) -> Result<()> {
        if self.cfg.delta != 0.0 {
            let rate = self.cfg.delta * dir.clip;
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

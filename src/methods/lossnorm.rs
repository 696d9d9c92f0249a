//! LossNorm, the NGDiff paper's other dynamic-scalarisation baseline (Bu et al. 2025, arXiv
//! 2410.22086, Fig. 4: GDiff vs LossNorm vs NGDiff on TOFU): each task's weight is the inverse of
//! its current loss instead of the inverse of its gradient's norm,
//!
//! `d = g_R/(L_R + ε) − g_F/(L_F + ε)`, i.e. the gradient of `log L_R − log L_F`,
//!
//! with `L_F`, `L_R` the step's token-mean NLLs (the values the trainer logs: summed over ranks,
//! averaged over accumulation steps, so every rank divides by the same numbers) and `g_F`, `g_R`
//! their reduced gradients.
//!
//! Provenance [RECALL/INFERRED]: the paper body was not retrievable (algorithms.md §0; the seed
//! text names LossNorm only in Fig. 4's caption). The definition above is the usual loss
//! normalisation of multi-task optimisation read into the paper's scalarisation
//! `c_R·L_R − c_F·L_F` (algorithms.md §2.1) with `c = 1/L` held constant within the step, as
//! NGDiff holds `c = 1/‖g‖`; ε (1e-8, NGDiff's) only guards a zero loss. No AutoLR: the paper
//! pairs AutoLR with NGDiff, and its LossNorm curves are at fixed learning rates.

use serde::Serialize;
use tch::Tensor;

use super::{Direction, Gradients, Grads, LossKind, Method, MethodCfg, MethodConfig, Objective, Registration, Spec, UpdateShape};
use crate::config::{Bound, Section, Trainable};
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: "lossnorm", parse: LossNormCfg::parse };

#[derive(Debug, Clone, Serialize)]
pub struct LossNormCfg {
    pub eps: f64,
}

impl LossNormCfg {
    fn parse(s: &Section) -> Result<MethodCfg> {
        Ok(MethodCfg::new(LossNormCfg { eps: s.float("eps", 1e-8, Bound::Positive)? }))
    }
}

impl MethodConfig for LossNormCfg {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }
    fn spec(&self) -> Spec {
        let losses = vec![(Objective::Forget, LossKind::Nll), (Objective::Retain, LossKind::Nll)];
        // The weights change every step, so the direction reads each reduced gradient; r/L_R and
        // f/L_F, then their difference. Every weight trains, as in the NGDiff paper.
        Spec::new(losses, Gradients::Separate, UpdateShape::built(2.0), Trainable::All)
    }
    fn build(&self, _params: &Tensor, _lr: f64) -> Result<Box<dyn Method>> {
        Ok(Box::new(LossNorm { eps: self.eps }))
    }
}

pub struct LossNorm {
    eps: f64,
}

impl Method for LossNorm {
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        let (f, r) = (g.forget.expect("forget gradient"), g.retain.expect("retain gradient"));
        Ok(Direction { d: r / (g.loss_retain + self.eps) - f / (g.loss_forget + self.eps), clip: 1.0 })
    }
}

//! Gradient ascent on the forget set: minimise −NLL_F.

use tch::Tensor;

use super::{batch_nll, Aux, Direction, Grads, LossOut, Method, Objective};
use crate::data::loader::LocalBatch;
use crate::Result;

pub struct GradientAscent;

impl Method for GradientAscent {
    fn objectives(&self) -> &'static [Objective] {
        &[Objective::Forget]
    }
    fn loss(&mut self, _obj: Objective, logits: &Tensor, batch: &LocalBatch, _aux: &Aux) -> Result<LossOut> {
        let nll = batch_nll(logits, batch);
        Ok(LossOut { value: nll.double_value(&[]), loss: -nll })
    }
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        Ok(Direction { d: g.forget.expect("forget gradient").shallow_clone(), clip: 1.0 })
    }
}

//! Plain language-model fine-tuning on the retain data (builds target and retain models).

use tch::Tensor;

use super::{nll_loss, Aux, Direction, Grads, LossOut, Method, Objective};
use crate::data::loader::LocalBatch;
use crate::Result;

pub struct Finetune;

impl Method for Finetune {
    fn name(&self) -> &'static str {
        "finetune"
    }
    fn objectives(&self) -> &'static [Objective] {
        &[Objective::Retain]
    }
    fn loss(&mut self, _obj: Objective, logits: &Tensor, batch: &LocalBatch, _aux: &Aux) -> Result<LossOut> {
        nll_loss(logits, batch)
    }
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        Ok(Direction { d: g.retain.expect("retain gradient").shallow_clone(), clip: 1.0 })
    }
}

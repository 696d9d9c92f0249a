//! IT, mt-unlearn's "incompetent teacher" baseline (algorithms.md §1.3 "IT", §1.4, §1.6 row
//! news/baselines/adamw-it-kl) [CODE/LOG]:
//!
//! 1. on the forget batch, `α·KL(p_small ‖ p_θ)`: the KL from a small model that never saw the
//!    forget text (`method.teacher_model`; TinyLlama-1.1B-Chat for the Llama-2 MUSE target, which
//!    shares its vocabulary) to the student, at every position under the attention mask, divided
//!    by the global B×T positions: the same function as the penalty (`losses.kl`);
//! 2. on retain/pretraining text, `β·D(θ₀ ‖ θ)` with D = KL (or QKL) to the frozen original model;
//! 3. the sum is the direction; mt-unlearn clips it to norm 1 (its loop's `clip`, which with no
//!    EMA and no damping is exactly `optim.clip_norm`), AdamW steps it.
//!
//! That is mean teacher's loop with δ = λ = 0 and the small model's KL as the forget loss. θ₀
//! is kept as the trainer keeps mean teacher's teacher (an fp32 shard, a compute replica), and
//! never moves. The small model is loaded whole on every rank in the compute dtype (mt-unlearn
//! loads it in fp16) and runs without grad on each forget batch; its `config.json` vocab_size and
//! `tokenizer.json` vocabulary must equal the student's, which the trainer checks, naming both
//! files, before loading any weights. mt-unlearn's baselines freeze what its mean teacher
//! freezes (embeddings, head, norms: networks.py), so the default trainable set is `matrices`.

use std::path::PathBuf;

use serde::Serialize;
use tch::{Kind, Tensor};

use super::mean_teacher::Penalty;
use super::{
    losses, Aux, Direction, FrozenModel, Gradients, Grads, LossKind, LossOut, Method, MethodCfg, MethodConfig, Objective, Registration,
    Spec, UpdateShape,
};
use crate::config::{Bound, Section, Trainable};
use crate::data::loader::LocalBatch;
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: "it", parse: ItCfg::parse };

#[derive(Debug, Clone, Serialize)]
pub struct ItCfg {
    /// The small reference model ("incompetent teacher") for the forget set.
    pub teacher_model: PathBuf,
    pub alpha: f64,
    pub beta: f64,
    /// The divergence to θ₀ on retain/pretraining text.
    pub penalty: Penalty,
}

impl ItCfg {
    fn parse(s: &Section) -> Result<MethodCfg> {
        let teacher_model = s.model_dir("teacher_model")?.ok_or_else(|| {
            s.err("teacher_model", "is required: the small model whose distribution the forget set is pulled to (an HF model directory)")
        })?;
        Ok(MethodCfg::new(ItCfg {
            teacher_model,
            alpha: s.float("alpha", 0.05, Bound::NonNegative)?,
            beta: s.float("beta", 1.0, Bound::NonNegative)?,
            penalty: s.choice("penalty", Penalty::Kl)?,
        }))
    }
}

impl MethodConfig for ItCfg {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }
    fn spec(&self) -> Spec {
        let losses = vec![(Objective::Forget, LossKind::Kl), (Objective::Retain, self.penalty.loss_kind())];
        // d = f + r: one new shard, no temporaries.
        Spec {
            teacher_on: Some(Objective::Retain),
            frozen_model: Some(FrozenModel { on: Objective::Forget, key: "teacher_model", dir: self.teacher_model.clone() }),
            ..Spec::new(losses, Gradients::WeightedSum { forget: 1.0, retain: 1.0 }, UpdateShape::built(0.0), Trainable::Matrices)
        }
    }
    fn data_words(&self, obj: Objective) -> &'static str {
        match obj {
            Objective::Forget => "forget data",
            Objective::Retain => "retain or pretraining text for the KL to the original model",
        }
    }
    fn model_dirs(&self) -> Vec<(&'static str, &std::path::Path)> {
        vec![("teacher_model", self.teacher_model.as_path())]
    }
    fn build(&self, params: &Tensor, _lr: f64) -> Result<Box<dyn Method>> {
        Ok(Box::new(It { cfg: self.clone(), original: params.to_kind(Kind::Float).copy() }))
    }
}

pub struct It {
    cfg: ItCfg,
    /// θ₀'s fp32 shard: the teacher of the retain penalty, never updated.
    original: Tensor,
}

impl Method for It {
    fn loss(&mut self, obj: Objective, logits: &Tensor, batch: &LocalBatch, aux: &Aux) -> Result<LossOut> {
        let mask = &batch.batch.attention_mask;
        let positions = batch.global.positions as f64;
        let (d, weight) = match obj {
            Objective::Forget => {
                let small = aux.frozen_logits.as_ref().ok_or_else(|| crate::other!("IT needs the small teacher's logits"))?;
                (losses::kl_to_teacher(logits, small, mask, positions), self.cfg.alpha)
            }
            Objective::Retain => {
                let original = aux.teacher_logits.as_ref().ok_or_else(|| crate::other!("IT needs the original model's logits"))?;
                (self.cfg.penalty.divergence(logits, original, mask, positions), self.cfg.beta)
            }
        };
        // Logged: the divergence itself (mt-unlearn logs the IT loss as the KL to the small model).
        Ok(LossOut { value: d.double_value(&[]), loss: d * weight })
    }

    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        Ok(Direction { d: g.forget.expect("forget gradient") + g.retain.expect("retain gradient"), clip: 1.0 })
    }

    fn teacher_shard(&self) -> Option<&Tensor> {
        Some(&self.original)
    }
    fn teacher_shard_mut(&mut self) -> Option<&mut Tensor> {
        Some(&mut self.original)
    }
}

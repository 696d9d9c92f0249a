//! Unlearning methods. A method is a recipe: it names the losses whose gradients it needs (one
//! buffer per objective, forget and/or retain), computes them from the student's logits on a
//! batch, and combines the *reduced* gradient shards into one update direction. It never sees
//! ranks, buckets or parameter names; the trainer differentiates, reduces and steps.
//!
//! Sign convention: each buffer holds the gradient of the loss the method returns for that
//! objective (e.g. NGDiff's forget buffer is ∇NLL_F, GA's is ∇(−NLL_F)); `direction` returns `d`
//! such that the optimizer moves the parameters by `−lr·d` (before momentum/Adam).

pub mod autolr;
pub mod finetune;
pub mod ga;
pub mod graddiff;
pub mod losses;
pub mod mean_teacher;
pub mod ngdiff;
pub mod npo;

use tch::Tensor;

use crate::config::MethodCfg;
use crate::data::loader::LocalBatch;
use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Objective {
    Forget,
    Retain,
}

/// What the trainer computes before calling [`Method::loss`], on the same batch.
#[derive(Default)]
pub struct Aux {
    /// Teacher logits `[b, t, v]` (mean teacher's penalty), without grad.
    pub teacher_logits: Option<Tensor>,
    /// `Σ_t m log p_ref` per row (NPO), from the frozen reference model.
    pub ref_sums: Option<Tensor>,
}

/// A loss to differentiate and the value to log.
pub struct LossOut {
    pub loss: Tensor,
    /// This rank's share of the logged value (the trainer sums it over ranks).
    pub value: f64,
}

/// Reduced gradient statistics, identical on every rank.
#[derive(Debug, Clone, Copy, Default)]
pub struct GradStats {
    pub sq_forget: f64,
    pub sq_retain: f64,
    /// ⟨g_F, g_R⟩, so that ‖g_F + g_R‖ needs no extra reduction.
    pub dot: f64,
}

/// The gradient shards a step combines (present for the objectives the method uses).
pub struct Grads<'a> {
    pub forget: Option<&'a Tensor>,
    pub retain: Option<&'a Tensor>,
    pub stats: GradStats,
    /// This rank's shard of the current fp32 parameters.
    pub params: &'a Tensor,
}

/// The update direction and what to log about it.
pub struct Direction {
    pub d: Tensor,
    /// Clip factor applied (1 = none), logged and used by mean teacher's EMA rate.
    pub clip: f64,
}

pub trait Method {
    /// Objectives that get a batch and a gradient buffer every micro-step.
    fn objectives(&self) -> &'static [Objective];
    /// Whether the trainer must run the teacher on this objective's batch.
    fn needs_teacher(&self, _obj: Objective) -> bool {
        false
    }
    /// Whether the trainer must provide NPO reference sums for the forget batches.
    fn needs_reference(&self) -> bool {
        false
    }
    /// The loss for `obj` from the student's logits on `batch`; by default the token-mean NLL
    /// (finetune, GDiff and NGDiff differentiate exactly that and differ only in `direction`).
    fn loss(&mut self, _obj: Objective, logits_btv: &Tensor, batch: &LocalBatch, _aux: &Aux) -> Result<LossOut> {
        nll_loss(logits_btv, batch)
    }
    /// Combine the reduced gradients into the update direction (this rank's shard).
    fn direction(&mut self, g: &Grads) -> Result<Direction>;
    /// After the optimizer step, with the updated parameter shard.
    fn after_step(&mut self, _params: &Tensor, _dir: &Direction) -> Result<()> {
        Ok(())
    }
    /// The fp32 EMA teacher shard, for methods that keep one.
    fn teacher_shard(&self) -> Option<&Tensor> {
        None
    }
    fn teacher_shard_mut(&mut self) -> Option<&mut Tensor> {
        None
    }
    /// The AutoLR controller, for methods that use one.
    fn autolr(&mut self) -> Option<&mut autolr::AutoLr> {
        None
    }
}

/// Build the method of `cfg`. `params` is this rank's initial fp32 parameter shard (the teacher
/// starts equal to it).
pub fn build(cfg: &MethodCfg, params: &Tensor, lr: f64) -> Result<Box<dyn Method>> {
    Ok(match cfg.name.as_str() {
        "finetune" => Box::new(finetune::Finetune),
        "ga" => Box::new(ga::GradientAscent),
        "graddiff" => Box::new(graddiff::GradDiff::new(cfg)),
        "npo" => Box::new(npo::Npo::new(cfg)),
        "ngdiff" => Box::new(ngdiff::NgDiff::new(cfg, lr)),
        "mean-teacher" => Box::new(mean_teacher::MeanTeacher::new(cfg, params)?),
        other => return Err(crate::other!("unknown method `{other}`")),
    })
}

/// The token-mean NLL as a loss to differentiate (finetune, GDiff, NGDiff, NPO's retain term).
pub(crate) fn nll_loss(logits_btv: &Tensor, batch: &LocalBatch) -> Result<LossOut> {
    let loss = batch_nll(logits_btv, batch);
    Ok(LossOut { value: loss.double_value(&[]), loss })
}

/// Token-mean NLL of the targets of a batch against the global target count: the loss of
/// finetune/GA/GDiff/NGDiff, and the value every method logs for the forget set.
pub(crate) fn batch_nll(logits_btv: &Tensor, batch: &LocalBatch) -> Tensor {
    losses::nll(&batch_logprobs(logits_btv, batch), batch.global.targets.max(1) as f64)
}

/// Target-token log-probs of a batch (see [`losses::target_logprobs`]).
pub(crate) fn batch_logprobs(logits_btv: &Tensor, batch: &LocalBatch) -> Tensor {
    losses::target_logprobs(logits_btv, &batch.batch.input_ids, &batch.batch.target_mask)
}

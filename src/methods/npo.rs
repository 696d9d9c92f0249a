//! Negative preference optimisation (Zhang et al. 2024) against the frozen original model, with
//! a retain NLL term: `NPO_F + retain_weight·NLL_R` (NPO+GDR). `retain_weight` defaults to 1,
//! open-unlearning's recipe (configs/trainer/NPO.yaml: γ·NPO + α·NLL_R, γ = α = 1); 0 is plain
//! NPO, which then needs no retain data.
//!
//! The reference enters only through `Σ_t log p_ref` per forget example, which the method
//! computes once before training ([`ReferenceSums`], through the trainer's [`Passes`]); no
//! reference model is held in memory during training.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::losses::{self, NpoVariant};
use super::{
    batch_logprobs, nll_loss, Aux, Direction, Gradients, Grads, LossKind, LossOut, Method, MethodCfg, MethodConfig, Objective, PassModel,
    Passes, ReferencePass, Registration, Spec, UpdateShape,
};
use crate::config::{choice, Bound, Section, Trainable};
use crate::data::loader::LocalBatch;
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: "npo", parse: NpoCfg::parse };

choice!(NpoVariant { "standard" => NpoVariant::Standard, "mt-unlearn" => NpoVariant::MtUnlearn });

/// NPO's settings, shared with mean teacher's `forget_loss = "npo"`.
#[derive(Debug, Clone, Serialize)]
pub struct NpoSettings {
    pub npo_beta: f64,
    pub npo_variant: NpoVariant,
    /// The frozen reference (default: the model being trained, as loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_model: Option<PathBuf>,
}

impl NpoSettings {
    pub(crate) fn parse(s: &Section, default_variant: NpoVariant) -> Result<Self> {
        Ok(NpoSettings {
            npo_beta: s.float("npo_beta", 0.1, Bound::Positive)?,
            npo_variant: s.choice("npo_variant", default_variant)?,
            reference_model: s.model_dir("reference_model")?,
        })
    }

    pub(crate) fn reference_pass(&self) -> ReferencePass {
        ReferencePass { separate_model: self.reference_model.is_some() }
    }

    pub(crate) fn model_dirs(&self) -> Vec<(&'static str, &Path)> {
        self.reference_model.iter().map(|p| ("reference_model", p.as_path())).collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NpoCfg {
    #[serde(flatten)]
    pub npo: NpoSettings,
    /// open-unlearning's α (default 1).
    pub retain_weight: f64,
}

impl NpoCfg {
    fn parse(s: &Section) -> Result<MethodCfg> {
        let npo = NpoSettings::parse(s, NpoVariant::Standard)?;
        Ok(MethodCfg::new(NpoCfg { npo, retain_weight: s.float("retain_weight", 1.0, Bound::NonNegative)? }))
    }
}

impl MethodConfig for NpoCfg {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }
    fn spec(&self) -> Spec {
        let with_retain = self.retain_weight > 0.0;
        let mut losses = vec![(Objective::Forget, LossKind::Npo)];
        if with_retain {
            losses.push((Objective::Retain, LossKind::Nll));
        }
        // f + r·w (one scaled copy), or f itself without a retain term.
        let update = if with_retain { UpdateShape::built(1.0) } else { UpdateShape::ALIAS };
        let gradients = Gradients::WeightedSum { forget: 1.0, retain: self.retain_weight };
        Spec { reference: Some(self.npo.reference_pass()), ..Spec::new(losses, gradients, update, Trainable::All) }
    }
    fn model_dirs(&self) -> Vec<(&'static str, &Path)> {
        self.npo.model_dirs()
    }
    fn build(&self, _params: &Tensor, _lr: f64) -> Result<Box<dyn Method>> {
        Ok(Box::new(Npo { settings: self.npo.clone(), retain_weight: self.retain_weight, reference: None }))
    }
}

/// `Σ_t m log p_ref` of every forget example under the reference model.
pub(crate) struct ReferenceSums(Vec<f64>);

impl ReferenceSums {
    /// One pass over the forget set under the reference (the student as loaded, or
    /// `reference_model`), split over ranks by the trainer.
    pub(crate) fn compute(passes: &mut dyn Passes, settings: &NpoSettings) -> Result<Self> {
        let model = match &settings.reference_model {
            Some(p) => PassModel::Load(p),
            None => PassModel::Student,
        };
        let sums = passes.per_example(Objective::Forget, model, "reference", &mut |logits, batch| {
            let lp = losses::target_logprobs(logits, &batch.input_ids, &batch.target_mask);
            Ok(Vec::<f64>::try_from(lp.sum_dim_intlist(1, false, Kind::Double).to_device(Device::Cpu))?)
        })?;
        Ok(ReferenceSums(sums))
    }

    /// The sums of a batch's rows, as an fp32 vector on `device`.
    fn of(&self, batch: &LocalBatch, device: Device) -> Tensor {
        let rows: Vec<f64> = batch.example_ids.iter().map(|&i| self.0[i]).collect();
        Tensor::from_slice(&rows).to_kind(Kind::Float).to_device(device)
    }
}

/// The NPO forget loss of a batch from its target log-probs `lp` (shared with mean teacher's
/// `forget_loss = "npo"`).
pub(crate) fn npo_forget_loss(lp: &Tensor, batch: &LocalBatch, reference: Option<&ReferenceSums>, s: &NpoSettings) -> Result<LossOut> {
    let reference = reference.ok_or_else(|| crate::other!("NPO's reference log-likelihoods were not computed before training"))?;
    let ref_sums = reference.of(batch, lp.device());
    let g = &batch.global;
    let (beta, n) = (s.npo_beta, g.sequences as f64);
    let loss = losses::npo(lp, &ref_sums, beta, s.npo_variant, n, g.targets.max(1) as f64, g.padded_len as f64);
    Ok(LossOut { value: losses::npo_value(&lp.detach(), &ref_sums, beta, n), loss })
}

pub struct Npo {
    settings: NpoSettings,
    retain_weight: f64,
    reference: Option<ReferenceSums>,
}

impl Method for Npo {
    fn prepare(&mut self, passes: &mut dyn Passes) -> Result<()> {
        self.reference = Some(ReferenceSums::compute(passes, &self.settings)?);
        Ok(())
    }
    fn loss(&mut self, obj: Objective, logits: &Tensor, batch: &LocalBatch, _aux: &Aux) -> Result<LossOut> {
        match obj {
            Objective::Forget => npo_forget_loss(&batch_logprobs(logits, batch), batch, self.reference.as_ref(), &self.settings),
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

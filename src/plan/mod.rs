//! `unlearn plan`: the memory one rank of `unlearn run` needs, component by component, and
//! whether it fits a budget.
//!
//! The model is THIS trainer's allocations, read off its code, not the ZeRO paper's: see
//! `train::Trainer::new` (what is resident), `train::backward` (the two executors),
//! `train::sink` (gradient accumulators and bucket buffers), `train::Trainer::train_step` (the
//! update's temporaries), `methods::*` (losses, directions, the EMA teacher) and `optim::*`.
//! Memory is counted in phases, because a rank's peak is the worst *moment*, not the sum of every
//! buffer it ever allocates:
//! * resident: what lives from the end of `Trainer::new` to the end of the run;
//! * init: loading and flattening the model, before most resident state exists;
//! * reference: NPO's one-off reference log-likelihood pass;
//! * forward/backward: one objective's pass, the worst of forget and retain;
//! * update: reduction, gradient statistics, direction, optimizer, EMA, re-gathering.
//!
//! Sizes assume every micro-batch is padded to `--seq` (the worst case of `train.max_len`).

pub mod activations;
mod phases;
pub mod render;
pub mod rss;

use serde::Serialize;

use crate::config::{MethodCfg, RunConfig};
use crate::model::Config;
use crate::Result;
use activations::LossKind;
use phases::{PhaseCtx, Sizes};

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Non-tensor GPU memory per rank: CUDA context, cuBLAS/cuDNN workspaces and NCCL's channel
/// buffers. An assumption (typically 0.5–1 GiB for the context and 0.2–1 GiB for NCCL on 8 GPUs);
/// no GPU was available to measure it.
pub const CUDA_NON_TENSOR_GIB: f64 = 1.5;
/// The CUDA caching allocator's rounding and fragmentation, as a share of tensor bytes (assumed).
pub const CUDA_ALLOCATOR_SLACK: f64 = 0.05;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cuda,
    Cpu,
}

/// What a method asks of the trainer, mirrored from `methods::*`.
#[derive(Debug, Clone, Serialize)]
pub struct MethodShape {
    pub forget: Option<LossKind>,
    pub retain: Option<LossKind>,
    /// EMA teacher shard, and a teacher forward on every retain batch (mean teacher).
    pub teacher: bool,
    /// NPO reference log-likelihoods, computed once before training.
    pub reference: bool,
    /// ... from a separately loaded reference model (`method.reference_model`).
    pub reference_model: bool,
    /// NGDiff's AutoLR probe (three extra forwards around a trial step).
    pub autolr: bool,
    /// Whether the direction is a shallow clone of a gradient shard (no new buffer).
    pub direction_aliases: bool,
    /// Shard-sized temporaries alive while `direction` builds `d` (besides `d`).
    pub direction_temps: f64,
    /// Shard-sized temporaries of `after_step` (the EMA update).
    pub after_step_temps: f64,
}

impl MethodShape {
    pub fn of(m: &MethodCfg) -> Result<Self> {
        let base = MethodShape {
            forget: None,
            retain: None,
            teacher: false,
            reference: false,
            reference_model: false,
            autolr: false,
            direction_aliases: false,
            direction_temps: 0.0,
            after_step_temps: 0.0,
        };
        Ok(match m.name.as_str() {
            // d = the retain (finetune) or forget (GA) gradient itself.
            "finetune" => MethodShape { retain: Some(LossKind::Nll), direction_aliases: true, ..base },
            "ga" => MethodShape { forget: Some(LossKind::Nll), direction_aliases: true, ..base },
            // r·w_R − f·w_F: two scaled copies, then their difference.
            "graddiff" => MethodShape { forget: Some(LossKind::Nll), retain: Some(LossKind::Nll), direction_temps: 2.0, ..base },
            // f + r·w (one scaled copy), or f itself without a retain term.
            "npo" => {
                let with_retain = m.retain_weight > 0.0;
                MethodShape {
                    forget: Some(LossKind::Npo),
                    retain: with_retain.then_some(LossKind::Nll),
                    reference: true,
                    reference_model: m.reference_model.is_some(),
                    direction_aliases: !with_retain,
                    direction_temps: if with_retain { 1.0 } else { 0.0 },
                    ..base
                }
            }
            // r/‖r‖ and f/‖f‖, then their difference.
            "ngdiff" => MethodShape {
                forget: Some(LossKind::Nll),
                retain: Some(LossKind::Nll),
                autolr: m.autolr,
                direction_temps: 2.0,
                ..base
            },
            // (f + r)·c, then + (θ − θ̄)·λc: two temporaries next to d; EMA: θ·δc.
            "mean-teacher" => {
                let forget = match m.forget_loss.as_str() {
                    "nlul" => LossKind::Nlul,
                    "npo" => LossKind::Npo,
                    _ => LossKind::Nll,
                };
                MethodShape {
                    forget: Some(forget),
                    retain: Some(if m.penalty == "qkl" { LossKind::Qkl } else { LossKind::Kl }),
                    teacher: true,
                    reference: forget == LossKind::Npo,
                    reference_model: forget == LossKind::Npo && m.reference_model.is_some(),
                    direction_temps: if m.damp != 0.0 { 2.0 } else { 1.0 },
                    after_step_temps: if m.delta != 0.0 { 1.0 } else { 0.0 },
                    ..base
                }
            }
            other => return Err(crate::other!("unknown method `{other}` (expected one of: {})", crate::config::METHODS.join(", "))),
        })
    }

    fn objectives(&self) -> Vec<(&'static str, LossKind)> {
        let mut out = vec![];
        if let Some(k) = self.forget {
            out.push(("forget", k));
        }
        if let Some(k) = self.retain {
            out.push(("retain", k));
        }
        out
    }

    /// Mean teacher runs its teacher on the retain batch only.
    fn teacher_on(&self, objective: &str) -> bool {
        self.teacher && objective == "retain"
    }
}

/// Everything the estimate depends on.
#[derive(Debug, Clone, Serialize)]
pub struct PlanInput {
    /// Preset name or model directory, for the report.
    pub model_name: String,
    pub model: Config,
    pub world_size: usize,
    pub device: Device,
    /// `bf16` or `fp32`.
    pub dtype: String,
    pub method: String,
    pub method_shape: MethodShape,
    pub zero: u8,
    /// Global micro-batch (sequences per micro-step over all ranks), as `train.batch_size`.
    pub batch: usize,
    /// Padded sequence length, as `train.max_len`.
    pub seq: usize,
    pub recompute: bool,
    /// `dist.teacher = "replica"` (else `gather`).
    pub teacher_replica: bool,
    /// `model.trainable = "all"` (else attention and MLP matrices only).
    pub trainable_all: bool,
    /// `adamw` or `sgd`.
    pub optim: String,
    pub sgd_momentum: bool,
    pub weight_decay: bool,
    pub clip_norm: bool,
    pub bucket_mb: f64,
    /// `dist.verify_every > 0`.
    pub verify: bool,
    pub budget_gib: f64,
    /// Per-rank memory that is not tensors: measured on the CPU, assumed on CUDA.
    pub baseline_bytes: f64,
    pub baseline_words: String,
}

impl PlanInput {
    /// The plan inputs of a validated run config at `world_size` ranks on `device`.
    pub fn from_run_config(
        cfg: &RunConfig,
        model: Config,
        model_name: String,
        world_size: usize,
        device: Device,
        budget_gib: f64,
        baseline: (f64, String),
    ) -> Result<Self> {
        if world_size == 0 {
            return Err(crate::other!("--world-size must be at least 1"));
        }
        if !cfg.train.batch_size.is_multiple_of(world_size) {
            return Err(crate::Error::config(
                "plan",
                "train.batch_size",
                format!("{} is not divisible by the number of ranks ({world_size})", cfg.train.batch_size),
            ));
        }
        Ok(PlanInput {
            model_name,
            model,
            world_size,
            device,
            dtype: cfg.model.dtype.clone(),
            method: cfg.method.name.clone(),
            method_shape: MethodShape::of(&cfg.method)?,
            zero: cfg.dist.zero,
            batch: cfg.train.batch_size,
            seq: cfg.train.max_len,
            recompute: cfg.train.recompute,
            teacher_replica: cfg.dist.teacher == "replica",
            trainable_all: cfg.model.trainable == "all",
            optim: cfg.optim.name.clone(),
            sgd_momentum: cfg.optim.momentum != 0.0,
            weight_decay: cfg.optim.weight_decay != 0.0,
            clip_norm: cfg.optim.clip_norm > 0.0,
            bucket_mb: cfg.dist.bucket_mb,
            verify: cfg.dist.verify_every > 0,
            budget_gib,
            baseline_bytes: baseline.0,
            baseline_words: baseline.1,
        })
    }

    /// The layer-wise executor runs with recompute and always under ZeRO-3.
    pub fn layer_wise(&self) -> bool {
        self.recompute || self.zero == 3
    }
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub component: String,
    pub formula: String,
    pub bytes: f64,
}

/// A phase of the run and what is alive at its worst moment.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    /// Which moment is the worst, and what the other candidates came to.
    pub note: String,
    /// The rows add to the resident state (true) or stand alone (init).
    pub on_top_of_resident: bool,
    pub rows: Vec<Row>,
    pub total_bytes: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub input: PlanInput,
    pub params: i64,
    pub trainable_params: i64,
    pub frozen_params: i64,
    /// Elements of one rank's fp32 shard (the whole padded flat buffer under ZeRO-0).
    pub shard_elems: i64,
    pub flat_elems: i64,
    pub buckets: usize,
    pub resident: Phase,
    pub phases: Vec<Phase>,
    pub peak_phase: String,
    pub peak_bytes: f64,
    pub budget_bytes: f64,
    pub fits: bool,
}

/// "6.48 G", "809.5 M", "131.1 k".
pub fn count(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2} G", x / 1e9),
        x if x >= 1e6 => format!("{:.1} M", x / 1e6),
        x if x >= 1e3 => format!("{:.1} k", x / 1e3),
        x => format!("{x:.0}"),
    }
}

/// The per-rank memory plan.
pub fn estimate(p: &PlanInput) -> Plan {
    let z = Sizes::new(p);
    let resident = z.resident();
    let ctx = PhaseCtx {
        resident: resident.total_bytes,
        baseline: p.baseline_bytes,
        slack: if p.device == Device::Cuda { CUDA_ALLOCATOR_SLACK } else { 0.0 },
    };
    let mut phases = vec![z.init(&ctx)];
    phases.extend(z.reference(&ctx));
    phases.extend(z.forward_backward(&ctx));
    phases.push(z.update(&ctx));
    let (peak_phase, peak_bytes) =
        phases.iter().map(|ph| (ph.name.clone(), ph.total_bytes)).max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or_default();
    let budget_bytes = p.budget_gib * GIB;
    Plan {
        input: p.clone(),
        params: (z.trainable_n + z.frozen_n) as i64,
        trainable_params: z.trainable_n as i64,
        frozen_params: z.frozen_n as i64,
        shard_elems: z.layout.shard_len(),
        flat_elems: z.layout.total,
        buckets: z.layout.buckets.len(),
        resident,
        phases,
        fits: peak_bytes <= budget_bytes,
        peak_phase,
        peak_bytes,
        budget_bytes,
    }
}

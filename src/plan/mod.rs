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
pub mod time;

use serde::Serialize;

use crate::config::{Dtype, OptimName, ReduceMode, RunConfig, TeacherMode, Trainable};
use crate::methods::Spec;
use crate::model::Config;
use crate::train::layout;
use crate::Result;
use phases::{PhaseCtx, Sizes};

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Non-tensor GPU memory per rank: CUDA context, cuBLAS/cuDNN workspaces and NCCL's channel
/// buffers. An assumption (typically 0.5–1 GiB for the context and 0.2–1 GiB for NCCL on 8 GPUs);
/// no GPU was available to measure it.
pub const CUDA_NON_TENSOR_GIB: f64 = 1.5;
/// The CUDA caching allocator's rounding and fragmentation, as a share of tensor bytes (assumed).
pub const CUDA_ALLOCATOR_SLACK: f64 = 0.05;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cuda,
    Cpu,
}

/// Everything the estimate depends on.
#[derive(Debug, Clone, Serialize)]
pub struct PlanInput {
    /// Preset name or model directory, for the report.
    pub model_name: String,
    pub model: Config,
    pub world_size: usize,
    pub device: Device,
    pub dtype: Dtype,
    pub method: &'static str,
    /// What the method declares about itself (objectives and their losses, teacher, reference
    /// pass, AutoLR, the update's temporaries).
    pub method_spec: Spec,
    /// The config of the method's frozen side model (IT's `method.teacher_model`), read from its
    /// directory: the plan needs its size.
    pub frozen_model: Option<Config>,
    pub zero: u8,
    /// Global micro-batch (sequences per micro-step over all ranks), as `train.batch_size`.
    pub batch: usize,
    /// Padded sequence length, as `train.max_len`.
    pub seq: usize,
    pub recompute: bool,
    pub teacher: TeacherMode,
    pub trainable: Trainable,
    pub optim: OptimName,
    pub sgd_momentum: bool,
    pub weight_decay: bool,
    pub clip_norm: bool,
    pub bucket_mb: f64,
    /// `dist.reduce` as configured (`auto` is resolved by [`estimate`]).
    pub reduce: ReduceMode,
    /// `dist.reduce_dtype`.
    pub reduce_dtype: Dtype,
    /// `dist.overlap`.
    pub overlap: bool,
    /// `train.grad_accum`.
    pub grad_accum: usize,
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
        layout::check_batch_split(cfg.train.batch_size, world_size, "plan")?;
        let spec = cfg.method.spec();
        let frozen_model = match &spec.frozen_model {
            Some(fm) if !fm.dir.join("config.json").exists() => {
                return Err(crate::other!(
                    "`method.{}`: {} is not a model directory here; the plan reads its config.json for its size",
                    fm.key,
                    fm.dir.display()
                ))
            }
            Some(fm) => Some(Config::from_model_dir(&fm.dir)?),
            None => None,
        };
        Ok(PlanInput {
            model_name,
            model,
            world_size,
            device,
            dtype: cfg.model.dtype,
            method: cfg.method.name(),
            method_spec: spec,
            frozen_model,
            zero: cfg.dist.zero,
            batch: cfg.train.batch_size,
            seq: cfg.train.max_len,
            recompute: cfg.train.recompute,
            teacher: cfg.dist.teacher,
            trainable: cfg.model.trainable,
            optim: cfg.optim.name,
            sgd_momentum: cfg.optim.momentum != 0.0,
            weight_decay: cfg.optim.weight_decay != 0.0,
            clip_norm: cfg.optim.clip_norm > 0.0,
            bucket_mb: cfg.dist.bucket_mb,
            reduce: cfg.dist.reduce,
            reduce_dtype: cfg.dist.reduce_dtype,
            overlap: cfg.dist.overlap,
            grad_accum: cfg.train.grad_accum,
            verify: cfg.dist.verify_every > 0,
            budget_gib,
            baseline_bytes: baseline.0,
            baseline_words: baseline.1,
        })
    }

    /// The layer-wise executor runs with recompute and always under ZeRO-3.
    pub fn layer_wise(&self) -> bool {
        layout::layer_wise(self.recompute, self.zero)
    }

    /// Gradient accumulators: one per objective when the method reads them separately, else one.
    pub fn accumulators(&self) -> usize {
        match self.method_spec.gradients {
            crate::methods::Gradients::Separate => self.method_spec.losses.len(),
            crate::methods::Gradients::WeightedSum { .. } => 1,
        }
    }

    /// Whether reductions move bf16 (only when something travels).
    pub fn bf16_wire(&self) -> bool {
        self.reduce_dtype == Dtype::Bf16 && self.world_size > 1
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
    /// When gradients are reduced: `dist.reduce` with `auto` resolved (always `step` below ZeRO-2).
    pub reduce: ReduceMode,
    /// Why, in words.
    pub reduce_note: String,
    pub resident: Phase,
    pub phases: Vec<Phase>,
    pub peak_phase: String,
    pub peak_bytes: f64,
    pub budget_bytes: f64,
    pub fits: bool,
    /// The step-time model (`unlearn plan` fills it in; the trainer's own plan leaves it out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_time: Option<time::StepTime>,
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

/// The per-rank memory plan, with `dist.reduce = "auto"` resolved: once per step when the plan
/// with a full fp32 gradient buffer fits the budget, else every micro-batch.
pub fn estimate(p: &PlanInput) -> Plan {
    let sharded = p.zero >= 2 && p.world_size > 1;
    match (p.reduce, sharded) {
        (_, false) => {
            let why = if p.world_size == 1 {
                "one rank: nothing to reduce".to_string()
            } else {
                format!("ZeRO-{} keeps a full gradient buffer", p.zero)
            };
            estimate_at(p, ReduceMode::Step, format!("once per step ({why})"))
        }
        (ReduceMode::Auto, true) => {
            let step = estimate_at(p, ReduceMode::Step, String::new());
            let peak = |pl: &Plan| pl.peak_bytes / GIB;
            if step.fits {
                let note =
                    format!("once per step (auto: {:.2} GiB with a full fp32 gradient buffer fits {:.2} GiB)", peak(&step), p.budget_gib);
                Plan { reduce_note: note, ..step }
            } else {
                let micro = estimate_at(p, ReduceMode::MicroBatch, String::new());
                let note = format!(
                    "every micro-batch (auto: a full fp32 gradient buffer would need {:.2} GiB of {:.2} GiB; sharded: {:.2} GiB)",
                    peak(&step),
                    p.budget_gib,
                    peak(&micro)
                );
                Plan { reduce_note: note, ..micro }
            }
        }
        (ReduceMode::MicroBatch, true) => estimate_at(p, ReduceMode::MicroBatch, "every micro-batch (dist.reduce)".into()),
        (ReduceMode::Step, true) => estimate_at(p, ReduceMode::Step, "once per step (dist.reduce)".into()),
    }
}

fn estimate_at(p: &PlanInput, reduce: ReduceMode, reduce_note: String) -> Plan {
    let z = Sizes::new(p, reduce == ReduceMode::Step);
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
        reduce,
        reduce_note,
        resident,
        phases,
        fits: peak_bytes <= budget_bytes,
        step_time: None,
        peak_phase,
        peak_bytes,
        budget_bytes,
    }
}

/// The memory budget (GiB) and non-tensor baseline of one rank of a run on `device`: the GPU's
/// memory (80 GiB when it cannot be read), or this machine's memory over the ranks on it.
pub fn run_budget(device: Device, tch_device: tch::Device) -> (f64, (f64, String)) {
    match device {
        Device::Cuda => {
            let gib = crate::dist::device_memory_bytes(tch_device).map_or(80.0, |b| b as f64 / GIB);
            (gib, (CUDA_NON_TENSOR_GIB * GIB, format!("CUDA context, cuBLAS and NCCL buffers (assumed {CUDA_NON_TENSOR_GIB} GiB)")))
        }
        Device::Cpu => {
            let per_rank = rss::host_memory_bytes().map_or(16.0, |b| b as f64 / GIB / crate::dist::local_world_size().max(1) as f64);
            (per_rank, rss::cpu_baseline())
        }
    }
}

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
pub mod render;
pub mod rss;

use serde::Serialize;

use crate::config::{MethodCfg, RunConfig};
use crate::dist::zero::FlatLayout;
use crate::model::{param_specs, Config, ParamRole, ParamSpec};
use crate::Result;
use activations::{nograd_logprobs_per_logit, LossKind, Widths};

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
        if cfg.train.batch_size % world_size != 0 {
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

    fn compute_bytes(&self) -> f64 {
        if self.dtype == "bf16" {
            2.0
        } else {
            4.0
        }
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

fn row(component: impl Into<String>, formula: impl Into<String>, bytes: f64) -> Row {
    Row { component: component.into(), formula: formula.into(), bytes }
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

/// A candidate moment of a phase: its name and the rows alive then.
struct Moment {
    name: String,
    rows: Vec<Row>,
}

impl Moment {
    fn new(name: impl Into<String>, rows: Vec<Row>) -> Self {
        Moment { name: name.into(), rows: rows.into_iter().filter(|r| r.bytes > 0.0).collect() }
    }
    fn bytes(&self) -> f64 {
        self.rows.iter().map(|r| r.bytes).sum()
    }
}

/// The phase at its worst moment: `common` rows plus the rows of the largest moment.
fn phase(name: &str, on_top: bool, common: Vec<Row>, moments: Vec<Moment>, ctx: &PhaseCtx) -> Phase {
    let resident = ctx.resident;
    let base = if on_top { resident } else { 0.0 };
    let common: Vec<Row> = common.into_iter().filter(|r| r.bytes > 0.0).collect();
    let common_bytes: f64 = common.iter().map(|r| r.bytes).sum();
    let worst = moments.iter().enumerate().max_by(|a, b| a.1.bytes().total_cmp(&b.1.bytes())).map(|(i, _)| i);
    let mut note = String::new();
    let mut rows = common;
    if let Some(w) = worst {
        if moments.len() > 1 {
            let others: Vec<String> = moments
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != w)
                .map(|(_, m)| format!("{} {:.2}", m.name, ctx.with_slack(base + common_bytes + m.bytes()) / GIB))
                .collect();
            note = format!("worst moment: {}; other moments (GiB): {}", moments[w].name, others.join(", "));
        } else {
            note = format!("worst moment: {}", moments[w].name);
        }
        rows.extend(moments[w].rows.iter().cloned());
    }
    let total = base + rows.iter().map(|r| r.bytes).sum::<f64>();
    if ctx.slack > 0.0 {
        let pct = format!("assumed {:.0}% of the phase's tensor bytes", ctx.slack * 100.0);
        rows.push(row("caching-allocator slack", pct, ctx.with_slack(total) - total));
    }
    Phase { name: name.into(), note, on_top_of_resident: on_top, rows, total_bytes: ctx.with_slack(total) }
}

/// What every phase is measured against.
struct PhaseCtx {
    resident: f64,
    /// Non-tensor bytes (no allocator slack on them).
    baseline: f64,
    /// Allocator slack as a share of tensor bytes (CUDA only).
    slack: f64,
}

impl PhaseCtx {
    fn with_slack(&self, total: f64) -> f64 {
        total + (total - self.baseline).max(0.0) * self.slack
    }
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

fn numel(s: &&ParamSpec) -> i64 {
    s.numel()
}

/// The per-rank memory plan.
pub fn estimate(p: &PlanInput) -> Plan {
    let m = &p.method_shape;
    let specs = param_specs(&p.model);
    let is_trainable = |s: &ParamSpec| p.trainable_all || s.role == ParamRole::Matrix;
    let trainable: Vec<&ParamSpec> = specs.iter().filter(|s| is_trainable(s)).collect();
    let frozen: Vec<&ParamSpec> = specs.iter().filter(|s| !is_trainable(s)).collect();
    let trainable_n = trainable.iter().map(numel).sum::<i64>() as f64;
    let frozen_n = frozen.iter().map(numel).sum::<i64>() as f64;
    let shards = if p.zero == 0 { 1 } else { p.world_size };
    // Same bucket size and layout as Trainer::new.
    let bucket_elems = ((p.bucket_mb * 1024.0 * 1024.0) / 4.0).max(1.0) as i64;
    let layout = FlatLayout::new(&trainable, shards, bucket_elems);
    let flat = layout.total as f64;
    let shard = layout.shard_len() as f64;
    let span = |l: Option<usize>| -> f64 { layout.layer_buckets(l).iter().map(|&b| layout.buckets[b].padded as f64).sum() };
    let n_layers = p.model.num_hidden_layers as usize;
    let block_span = (0..n_layers).map(|l| span(Some(l))).fold(0.0, f64::max);
    let outer_span = span(None);
    let block_params =
        (0..n_layers).map(|l| trainable.iter().filter(|s| s.layer == Some(l)).map(numel).sum::<i64>() as f64).fold(0.0, f64::max);
    let max_param = trainable.iter().map(numel).max().unwrap_or(0) as f64;
    let max_bucket = layout.buckets.iter().map(|b| b.padded).max().unwrap_or(0) as f64;

    let c = p.compute_bytes();
    let cw = if c == 2.0 { "2 B (bf16)" } else { "4 B (fp32)" };
    let w = Widths::new(&p.model, c, p.trainable_all);
    let world = p.world_size as f64;
    let b = (p.batch / p.world_size) as f64;
    let s = p.seq as f64;
    let tokens = b * s;
    let logits = tokens * w.vocab;
    let nl = n_layers as f64;
    let layer_wise = p.layer_wise();
    let cpu_mpi = p.device == Device::Cpu && p.world_size > 1;
    let n_obj = m.objectives().len() as f64;
    let bsv = format!("b·s·V = {}×{}×{}", b, s, w.vocab);
    let shard_words = if shards == 1 { "the whole flat buffer (not sharded)".to_string() } else { format!("shard {} (flat/{shards})", count(shard)) };

    // ---------------- resident ----------------
    let mut res = vec![row("process baseline", p.baseline_words.clone(), p.baseline_bytes)];
    res.push(row(
        "frozen weights",
        if frozen_n > 0.0 { format!("embeddings, head, norms: {} × {cw}, replicated", count(frozen_n)) } else { "none (model.trainable = all)".into() },
        frozen_n * c,
    ));
    res.push(if p.zero < 3 {
        row("student compute replica", format!("student_full: flat {} × {cw}, replicated", count(flat)), flat * c)
    } else {
        row("student compute replica", "absent at ZeRO-3 (one layer gathered at a time, see forward/backward)", 0.0)
    });
    res.push(row("fp32 master weights", format!("{shard_words} × 4 B"), shard * 4.0));
    if p.optim == "adamw" {
        res.push(row("AdamW state", "exp_avg + exp_avg_sq: 2 × shard × 4 B", 2.0 * shard * 4.0));
    } else {
        res.push(row(
            "SGD momentum",
            if p.sgd_momentum { "1 × shard × 4 B (from the first step)" } else { "none (optim.momentum = 0)" },
            if p.sgd_momentum { shard * 4.0 } else { 0.0 },
        ));
        res.push(row("SGD `shard_like`", "a zero shard kept only to shape restored state: shard × 4 B", shard * 4.0));
    }
    if m.teacher {
        res.push(row("EMA teacher shard", "fp32 θ̄: shard × 4 B", shard * 4.0));
        res.push(if p.teacher_replica {
            row("teacher compute replica", format!("teacher_full (dist.teacher = replica): flat {} × {cw}", count(flat)), flat * c)
        } else {
            row("teacher compute replica", "none (dist.teacher = gather: one layer gathered per teacher forward)", 0.0)
        });
    }
    let acc_one = if p.zero < 2 { flat * 4.0 } else { shard * 4.0 };
    res.push(row(
        "gradient accumulators",
        format!(
            "{} objective(s) × {} × 4 B",
            n_obj,
            if p.zero < 2 { format!("full flat {}", count(flat)) } else { format!("shard {}", count(shard)) }
        ),
        n_obj * acc_one,
    ));
    if m.reference {
        res.push(row("NPO reference sums", "8 B per forget example (host Vec<f64>), negligible", 0.0));
    }
    let resident_bytes: f64 = res.iter().map(|r| r.bytes).sum();
    let resident = Phase {
        name: "resident (whole run)".into(),
        note: String::new(),
        on_top_of_resident: false,
        rows: res,
        total_bytes: resident_bytes,
    };

    let mut phases = vec![];
    let ctx = PhaseCtx {
        resident: resident_bytes,
        baseline: p.baseline_bytes,
        slack: if p.device == Device::Cuda { CUDA_ALLOCATOR_SLACK } else { 0.0 },
    };

    // ---------------- init ----------------
    let base_row = || row("process baseline", p.baseline_words.clone(), p.baseline_bytes);
    let frozen_row = || row("frozen weights", format!("{} × {cw}", count(frozen_n)), frozen_n * c);
    let flat_row = || row("flat compute buffer", format!("flatten_and_bind: flat {} × {cw}", count(flat)), flat * c);
    let load = Moment::new(
        "load + flatten",
        vec![base_row(), frozen_row(), row("trainable weights as loaded", format!("{} × {cw}, freed one by one", count(trainable_n)), trainable_n * c), flat_row()],
    );
    let master = Moment::new(
        "master shard extraction",
        vec![
            base_row(),
            frozen_row(),
            flat_row(),
            row(
                "fp32 cast of the flat buffer",
                "Trainer::new casts the whole flat buffer before taking the shard: flat × 4 B (bf16 only)",
                if c == 2.0 { flat * 4.0 } else { 0.0 },
            ),
            row("fp32 master weights", format!("{shard_words} × 4 B"), shard * 4.0),
        ],
    );
    phases.push(phase("init (load, flatten, shard)", false, vec![], vec![load, master], &ctx));

    // ---------------- NPO reference pass ----------------
    if m.reference {
        // reference_sums takes train.batch_size examples per chunk on every rank (not the per-rank
        // micro-batch), with no graph.
        let ref_tokens = p.batch as f64 * s;
        let mut common = vec![];
        if m.reference_model {
            common.push(row(
                "reference model",
                format!("method.reference_model loaded whole: {} × {cw}", count(trainable_n + frozen_n)),
                (trainable_n + frozen_n) * c,
            ));
        } else if p.zero == 3 {
            common.push(row("one gathered layer", format!("block span {} × {cw}", count(block_span)), block_span * c));
        }
        let block = Moment::new(
            "a block",
            vec![row("no-grad block working set", format!("{} tokens (train.batch_size × s) × {:.0} B", count(ref_tokens), w.block_nograd_peak()), ref_tokens * w.block_nograd_peak())],
        );
        let head = Moment::new(
            "logits",
            vec![row(
                "logits + fp32 log-probs",
                format!("train.batch_size·s·V = {} × {:.0} B", count(ref_tokens * w.vocab), nograd_logprobs_per_logit(c)),
                ref_tokens * w.vocab * nograd_logprobs_per_logit(c),
            )],
        );
        phases.push(phase("NPO reference pass (once, at start)", true, common, vec![block, head], &ctx));
    }

    // ---------------- forward/backward ----------------
    let rs_scratch = if p.zero >= 2 && p.world_size > 1 {
        max_bucket / world * 4.0 + if cpu_mpi { max_bucket * 4.0 } else { 0.0 }
    } else {
        0.0
    };
    let rs_row = || {
        row(
            "reduce-scatter buffers",
            if cpu_mpi { "received piece (bucket/N × 4 B) + Open MPI scratch (≈ one bucket × 4 B)" } else { "received piece: bucket/N × 4 B" },
            rs_scratch,
        )
    };
    let cast_row = |n: f64| {
        row("fp32 cast of one gradient", "largest trainable tensor × 4 B (bf16 only; added to the accumulator)", if c == 2.0 { n * 4.0 } else { 0.0 })
    };
    let mut fb_phases = vec![];
    for (obj, loss) in m.objectives() {
        let mut common = vec![];
        let mut moments = vec![];
        if m.teacher_on(obj) {
            common.push(row("teacher logits", format!("{bsv} × {cw}, held through the student pass"), logits * c));
            // Without a teacher replica the teacher's weights are gathered layer by layer.
            let gathered = if p.teacher_replica { 0.0 } else { block_span * c };
            moments.push(Moment::new(
                "teacher forward",
                vec![
                    row("teacher block working set (no grad)", format!("b·s = {} tokens × {:.0} B", count(tokens), w.block_nograd_peak()), tokens * w.block_nograd_peak()),
                    row("one gathered teacher layer", format!("block span {} × {cw}", count(block_span)), gathered),
                ],
            ));
        }
        let loss_row = || {
            row(format!("logits and {} loss", loss.name()), format!("{bsv} × {:.0} B: {}", loss.peak_per_logit(c), loss.peak_words()), logits * loss.peak_per_logit(c))
        };
        if !layer_wise {
            moments.push(Moment::new(
                "loss (all activations saved)",
                vec![
                    row(
                        "saved activations, every layer",
                        format!("plain executor: {nl} layers × b·s {} × {:.0} B", count(tokens), w.block_saved(false)),
                        nl * tokens * w.block_saved(false),
                    ),
                    row("head activations", format!("final norm input + normed hidden: b·s × {:.0} B", w.head_saved()), tokens * w.head_saved()),
                    loss_row(),
                ],
            ));
            moments.push(Moment::new(
                "top block backward",
                vec![
                    row(
                        "saved activations, every layer",
                        format!("plain executor: {nl} layers × b·s {} × {:.0} B", count(tokens), w.block_saved(false)),
                        nl * tokens * w.block_saved(false),
                    ),
                    row("student logits", format!("{bsv} × {cw}, held until the pass returns"), logits * c),
                    row("block backward temporaries", format!("b·s × {:.0} B", w.block_backward_temps()), tokens * w.block_backward_temps()),
                    row("one block's weight gradients", format!("{} × {cw}", count(block_params)), block_params * c),
                ],
            ));
            let mut after = vec![
                row("weight gradients, all at once", format!("run_backward returns every trainable gradient: {} × {cw}", count(trainable_n)), trainable_n * c),
                row("student logits", format!("{bsv} × {cw}, held until the pass returns"), logits * c),
            ];
            if p.zero >= 2 {
                after.push(row(
                    "bucket buffers of every bucket",
                    format!("layer_done runs only after all gradients are added: flat {} × 4 B", count(flat)),
                    flat * 4.0,
                ));
                after.push(rs_row());
            } else {
                after.push(cast_row(max_param));
            }
            moments.push(Moment::new("after backward", after));
        } else {
            common.push(row(
                "stored layer inputs",
                format!("layer-wise executor: ({nl} + 1) × b·s {} × d {} × {cw}", count(tokens), w.hidden),
                (nl + 1.0) * tokens * w.hidden * c,
            ));
            if p.zero == 3 && p.trainable_all {
                common.push(row("gathered outer weights", format!("embeddings/head/norms span {} × {cw}, whole pass", count(outer_span)), outer_span * c));
            }
            if p.zero >= 2 && p.trainable_all {
                common.push(row("outer bucket buffers", format!("embeddings/head/norms span {} × 4 B, until the pass ends", count(outer_span)), outer_span * 4.0));
            }
            moments.push(Moment::new(
                "loss",
                vec![row("head activations", format!("b·s × {:.0} B", w.head_saved()), tokens * w.head_saved()), loss_row()],
            ));
            let mut layer = vec![
                row(
                    "one block recomputed with graph",
                    format!("b·s {} × {:.0} B", count(tokens), w.block_saved(c == 4.0)),
                    tokens * w.block_saved(c == 4.0),
                ),
                row("block backward temporaries", format!("b·s × {:.0} B (MLP product-rule gradients, a hidden-width gradient)", w.block_backward_temps()), tokens * w.block_backward_temps()),
                row("block output and g_out", format!("y and the gradient reaching it: 2 × b·s × d × {cw}"), 2.0 * tokens * w.hidden * c),
                row("one block's weight gradients", format!("{} × {cw}", count(block_params)), block_params * c),
            ];
            if p.zero == 3 {
                layer.push(row("one gathered layer", format!("block span {} × {cw}", count(block_span)), block_span * c));
            }
            if p.zero >= 2 {
                layer.push(row("one block's bucket buffers", format!("block span {} × 4 B", count(block_span)), block_span * 4.0));
                layer.push(rs_row());
            } else {
                layer.push(cast_row(max_param));
            }
            moments.push(Moment::new("block backward", layer));
        }
        fb_phases.push(phase(&format!("forward/backward ({obj}: {})", loss.name()), true, common, moments, &ctx));
    }
    if let Some(worst) = fb_phases.into_iter().max_by(|a, b| a.total_bytes.total_cmp(&b.total_bytes)) {
        phases.push(worst);
    }

    // ---------------- update ----------------
    let mut common = vec![];
    if p.zero == 1 && shards > 1 {
        common.push(row("extracted gradient shards", format!("{n_obj} × shard × 4 B (cut from the full accumulators)"), n_obj * shard * 4.0));
    }
    let d = if m.direction_aliases { 0.0 } else { shard * 4.0 };
    let d_row = || row("direction d", if m.direction_aliases { "aliases a gradient shard" } else { "shard × 4 B" }, d);
    let dot_row = |what: &str| row(what.to_string(), "train_step's `dot`: two fp64 casts and their product, 3 × shard × 8 B", 3.0 * shard * 8.0);
    let mut moments = vec![Moment::new("gradient statistics", vec![dot_row("fp64 temporaries of ‖g‖², ⟨g_F,g_R⟩")])];
    if p.zero < 2 && p.world_size > 1 {
        let ar = max_bucket * 4.0 + if cpu_mpi { max_bucket * 4.0 } else { 0.0 };
        moments.push(Moment::new(
            "all-reduce",
            vec![row("all-reduce buffers", if cpu_mpi { "send copy of a bucket + Open MPI scratch: 2 × bucket × 4 B" } else { "in place (NCCL)" }, if cpu_mpi { ar } else { 0.0 })],
        ));
    }
    moments.push(Moment::new(
        "direction",
        vec![d_row(), row("direction temporaries", format!("{} × shard × 4 B", m.direction_temps), m.direction_temps * shard * 4.0)],
    ));
    if p.clip_norm {
        moments.push(Moment::new("clip", vec![d_row(), dot_row("fp64 temporaries of ‖d‖² (optim.clip_norm)")]));
    }
    let opt_temps = if p.optim == "adamw" { 3.0 } else if p.weight_decay { 2.0 } else { 1.0 };
    moments.push(Moment::new(
        "optimizer step",
        vec![d_row(), row(format!("{} step temporaries", if p.optim == "adamw" { "AdamW" } else { "SGD" }), format!("{opt_temps} × shard × 4 B"), opt_temps * shard * 4.0)],
    ));
    if m.after_step_temps > 0.0 {
        moments.push(Moment::new("EMA update", vec![d_row(), row("EMA temporary", "θ·δc: shard × 4 B", m.after_step_temps * shard * 4.0)]));
    }
    if m.autolr {
        let wt_delta = row("probe shards w_t and Δ", "2 × shard × 4 B", 2.0 * shard * 4.0);
        moments.push(Moment::new(
            "AutoLR trial point",
            vec![d_row(), wt_delta.clone(), row("w_t + rΔ temporaries", "2 × shard × 4 B", 2.0 * shard * 4.0)],
        ));
        let fwd = (tokens * w.block_nograd_peak()).max(logits * nograd_logprobs_per_logit(c));
        moments.push(Moment::new(
            "AutoLR probe forward",
            vec![
                d_row(),
                wt_delta,
                row("probe forward", "no grad: block working set, or logits + fp32 log-probs", fwd),
                row("one gathered layer", "ZeRO-3: block span × compute bytes", if p.zero == 3 { block_span * c } else { 0.0 }),
            ],
        ));
    }
    if p.verify {
        let replica = if p.zero < 3 || (m.teacher && p.teacher_replica) { flat } else { 0.0 };
        moments.push(Moment::new(
            "replica verification",
            vec![row("fp64 copy of a replica and its square", "verify_replicas: 2 × flat × 8 B (dist.verify_every > 0)", 2.0 * replica * 8.0)],
        ));
    }
    let gather = if c == 2.0 { max_bucket / world * c + if cpu_mpi { max_bucket * 4.0 + max_bucket / world * 4.0 } else { 0.0 } } else { 0.0 };
    if gather > 0.0 {
        moments.push(Moment::new("re-gather replicas", vec![row("all-gather buffers", "bf16 piece casts (+ fp32 host copies under MPI), one bucket at a time", gather)]));
    }
    phases.push(phase("update (reduce, direction, step, EMA, gather)", true, common, moments, &ctx));

    let (peak_phase, peak_bytes) =
        phases.iter().map(|ph| (ph.name.clone(), ph.total_bytes)).max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or_default();
    let budget_bytes = p.budget_gib * GIB;
    Plan {
        input: p.clone(),
        params: (trainable_n + frozen_n) as i64,
        trainable_params: trainable_n as i64,
        frozen_params: frozen_n as i64,
        shard_elems: layout.shard_len(),
        flat_elems: layout.total,
        buckets: layout.buckets.len(),
        resident,
        phases,
        fits: peak_bytes <= budget_bytes,
        peak_phase,
        peak_bytes,
        budget_bytes,
    }
}

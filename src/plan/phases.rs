//! The phases of a run and what each holds at its worst moment (see the module header of
//! `plan`). Every row names the buffer of the trainer it stands for.

use super::activations::{nograd_logprobs_per_logit, Widths};
use super::{count, Device, Phase, PlanInput, Row, GIB};
use crate::config::{Dtype, OptimName, TeacherMode, Trainable};
use crate::dist::zero::FlatLayout;
use crate::methods::Spec;
use crate::model::{param_specs, ParamSpec};
use crate::train::layout;

/// Elements per piece of `dist::zero::{dot, checksum}`.
const PIECE: f64 = (1u64 << 22) as f64;

pub(super) fn row(component: impl Into<String>, formula: impl Into<String>, bytes: f64) -> Row {
    Row { component: component.into(), formula: formula.into(), bytes }
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

/// What every phase is measured against.
pub(super) struct PhaseCtx {
    pub resident: f64,
    /// Non-tensor bytes (no allocator slack on them).
    pub baseline: f64,
    /// Allocator slack as a share of tensor bytes (CUDA only).
    pub slack: f64,
}

impl PhaseCtx {
    fn with_slack(&self, total: f64) -> f64 {
        total + (total - self.baseline).max(0.0) * self.slack
    }

    /// The phase at its worst moment: `common` rows plus the rows of the largest moment.
    fn phase(&self, name: &str, on_top: bool, common: Vec<Row>, moments: Vec<Moment>) -> Phase {
        let base = if on_top { self.resident } else { 0.0 };
        let mut rows: Vec<Row> = common.into_iter().filter(|r| r.bytes > 0.0).collect();
        let common_bytes: f64 = rows.iter().map(|r| r.bytes).sum();
        let mut note = String::new();
        if let Some(w) = moments.iter().enumerate().max_by(|a, b| a.1.bytes().total_cmp(&b.1.bytes())).map(|(i, _)| i) {
            let others: Vec<String> = moments
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != w)
                .map(|(_, m)| format!("{} {:.2}", m.name, self.with_slack(base + common_bytes + m.bytes()) / GIB))
                .collect();
            note = format!("worst moment: {}", moments[w].name);
            if !others.is_empty() {
                note += &format!("; other moments (GiB): {}", others.join(", "));
            }
            rows.extend(moments[w].rows.iter().cloned());
        }
        let total = base + rows.iter().map(|r| r.bytes).sum::<f64>();
        if self.slack > 0.0 {
            let pct = format!("assumed {:.0}% of the phase's tensor bytes", self.slack * 100.0);
            rows.push(row("caching-allocator slack", pct, self.with_slack(total) - total));
        }
        Phase { name: name.into(), note, on_top_of_resident: on_top, rows, total_bytes: self.with_slack(total) }
    }
}

fn numel(s: &&ParamSpec) -> i64 {
    s.numel()
}

/// The sizes every phase is made of, derived once from the plan's inputs.
pub(super) struct Sizes<'a> {
    p: &'a PlanInput,
    m: &'a Spec,
    /// The trainer's flat layout (same specs, shard count and bucket size as `Trainer::new`).
    pub layout: FlatLayout,
    w: Widths,
    /// Compute dtype bytes, and in words.
    c: f64,
    cw: &'static str,
    world: f64,
    pub trainable_n: f64,
    pub frozen_n: f64,
    flat: f64,
    shard: f64,
    /// Padded elements of the largest block's buckets, and of the outer (embeddings/head) ones.
    block_span: f64,
    outer_span: f64,
    block_params: f64,
    max_param: f64,
    max_bucket: f64,
    /// Tokens of one rank's micro-batch, and its logits `b·s·V`.
    tokens: f64,
    logits: f64,
    layers: f64,
    cpu_mpi: bool,
    /// Gradients reduced once per step from a full-length local sum (else every micro-batch).
    reduce_step: bool,
    bsv: String,
    shard_words: String,
    /// fp32 compute on one shard below ZeRO-3: the compute replicas are the fp32 shards (train/mod.rs).
    replicas_are_shards: bool,
}

impl<'a> Sizes<'a> {
    pub fn new(p: &'a PlanInput, reduce_step: bool) -> Self {
        let specs = param_specs(&p.model);
        let trainable = layout::trainable_specs(&specs, p.trainable);
        let frozen_n = specs.iter().filter(|s| !p.trainable.includes(s.role)).map(ParamSpec::numel).sum::<i64>() as f64;
        let shards = layout::shard_count(p.zero, p.world_size);
        let layout = layout::flat_layout(&trainable, p.zero, p.world_size, p.bucket_mb);
        let span = |l: Option<usize>| -> f64 { layout.layer_buckets(l).iter().map(|&b| layout.buckets[b].padded as f64).sum() };
        let n_layers = p.model.num_hidden_layers as usize;
        let block_params =
            (0..n_layers).map(|l| trainable.iter().filter(|s| s.layer == Some(l)).map(numel).sum::<i64>() as f64).fold(0.0, f64::max);
        let c = match p.dtype {
            Dtype::Bf16 => 2.0,
            Dtype::Fp32 => 4.0,
        };
        let w = Widths::new(&p.model, c, p.trainable == Trainable::All);
        let (b, s) = ((p.batch / p.world_size) as f64, p.seq as f64);
        let shard = layout.shard_len() as f64;
        Sizes {
            p,
            m: &p.method_spec,
            w,
            c,
            cw: if c == 2.0 { "2 B (bf16)" } else { "4 B (fp32)" },
            world: p.world_size as f64,
            trainable_n: trainable.iter().map(numel).sum::<i64>() as f64,
            frozen_n,
            flat: layout.total as f64,
            shard,
            block_span: (0..n_layers).map(|l| span(Some(l))).fold(0.0, f64::max),
            outer_span: span(None),
            block_params,
            max_param: trainable.iter().map(numel).max().unwrap_or(0) as f64,
            max_bucket: layout.buckets.iter().map(|b| b.padded).max().unwrap_or(0) as f64,
            tokens: b * s,
            logits: b * s * w.vocab,
            layers: n_layers as f64,
            cpu_mpi: p.device == Device::Cpu && p.world_size > 1,
            reduce_step: reduce_step || p.zero < 2 || p.world_size == 1,
            bsv: format!("b·s·V = {b}×{s}×{}", w.vocab),
            shard_words: if shards == 1 {
                "the whole flat buffer (not sharded)".to_string()
            } else {
                format!("shard {} (flat/{shards})", count(shard))
            },
            replicas_are_shards: c == 4.0 && shards == 1 && p.zero < 3,
            layout,
        }
    }

    fn baseline_row(&self) -> Row {
        row("process baseline", self.p.baseline_words.clone(), self.p.baseline_bytes)
    }
    fn master_row(&self) -> Row {
        row("fp32 master weights", format!("{} × 4 B", self.shard_words), self.shard * 4.0)
    }
    /// The layer being used and the next one being gathered (prefetch one layer ahead).
    fn gathered_layers_row(&self, what: &str, present: bool, bytes_per: f64, words: &str) -> Row {
        let f = format!("current + prefetched: 2 × block span {} × {words}", count(self.block_span));
        row(what.to_string(), f, if present { 2.0 * self.block_span * bytes_per } else { 0.0 })
    }
    fn block_grads_row(&self) -> Row {
        row("one block's weight gradients", format!("{} × {}", count(self.block_params), self.cw), self.block_params * self.c)
    }
    fn backward_temps_row(&self) -> Row {
        let t = self.w.block_backward_temps();
        row("block backward temporaries", format!("b·s × {t:.0} B (MLP product-rule gradients, a hidden-width gradient)"), self.tokens * t)
    }
    fn all_activations_row(&self) -> Row {
        let a = self.w.block_saved(false);
        row(
            "saved activations, every layer",
            format!("plain executor: {} layers × b·s {} × {a:.0} B", self.layers, count(self.tokens)),
            self.layers * self.tokens * a,
        )
    }
    /// What a pass's reductions hold besides the accumulators: under `micro-batch`, the bucket
    /// being assembled and up to `MAX_IN_FLIGHT` issued ones with their received pieces; bf16
    /// wire copies; Open MPI's scratch on the CPU (about one bucket).
    fn reduction_rows(&self) -> Vec<Row> {
        let p = self.p;
        let mut rows = vec![];
        if p.world_size == 1 {
            return rows;
        }
        let inflight = crate::train::sink::MAX_IN_FLIGHT as f64;
        let b = self.max_bucket;
        let piece = b / self.world;
        let wire = if p.bf16_wire() { 2.0 } else { 4.0 };
        if !self.reduce_step {
            let words = format!(
                "assembling + {inflight} in flight: ({inflight} + 1) × largest bucket × 4 B + {inflight} received pieces (bucket/N)"
            );
            let bytes = (inflight + 1.0) * b * 4.0 + inflight * piece * wire + if p.bf16_wire() { inflight * b * 2.0 } else { 0.0 };
            rows.push(row("bucket buffers in flight", words, bytes));
        } else if p.bf16_wire() {
            let per = if self.layout.shards == 1 { b } else { piece };
            let words = format!("bf16 copies of ≤ {inflight} buckets in flight and their received pieces");
            rows.push(row("bf16 reduction buffers", words, inflight * (b + per) * 2.0));
        }
        if self.cpu_mpi {
            rows.push(row(
                "MPI scratch",
                "the communication thread's send copy / Open MPI's reduction scratch: ≈ largest bucket × 4 B",
                b * 4.0,
            ));
        }
        rows
    }
    fn grad_cast_row(&self) -> Row {
        let bytes = if self.c == 2.0 { self.max_param * 4.0 } else { 0.0 };
        row("fp32 cast of one gradient", "largest trainable tensor × 4 B (bf16 only; added to the accumulator)", bytes)
    }

    /// What lives from the end of `Trainer::new` to the end of the run.
    pub fn resident(&self) -> Phase {
        let (p, m, c, cw) = (self.p, self.m, self.c, self.cw);
        let (flat, shard) = (self.flat, self.shard);
        let mut res = vec![self.baseline_row()];
        res.push(row(
            "frozen weights",
            if self.frozen_n > 0.0 {
                format!("embeddings, head, norms: {} × {cw}, replicated", count(self.frozen_n))
            } else {
                "none (model.trainable = all)".into()
            },
            self.frozen_n * c,
        ));
        res.push(if self.replicas_are_shards {
            row("student compute replica", "the fp32 master itself (fp32, one shard)", 0.0)
        } else if p.zero < 3 {
            row("student compute replica", format!("student_full: flat {} × {cw}, replicated", count(flat)), flat * c)
        } else {
            row("student compute replica", "absent at ZeRO-3 (one layer gathered at a time, see forward/backward)", 0.0)
        });
        res.push(self.master_row());
        if p.optim == OptimName::AdamW {
            res.push(row("AdamW state", "exp_avg + exp_avg_sq: 2 × shard × 4 B", 2.0 * shard * 4.0));
        } else {
            res.push(row(
                "SGD momentum",
                if p.sgd_momentum { "1 × shard × 4 B (from the first step)" } else { "none (optim.momentum = 0)" },
                if p.sgd_momentum { shard * 4.0 } else { 0.0 },
            ));
        }
        if m.teacher() {
            res.push(row("EMA teacher shard", "fp32 θ̄: shard × 4 B", shard * 4.0));
            res.push(if p.teacher == TeacherMode::Replica && self.replicas_are_shards {
                row("teacher compute replica", "the EMA teacher shard itself (fp32, one shard)", 0.0)
            } else if p.teacher == TeacherMode::Replica {
                row("teacher compute replica", format!("teacher_full (dist.teacher = replica): flat {} × {cw}", count(flat)), flat * c)
            } else {
                row("teacher compute replica", "none (dist.teacher = gather: one layer gathered per teacher forward)", 0.0)
            });
        }
        let n_acc = p.accumulators() as f64;
        let which =
            if n_acc == 1.0 && m.losses.len() > 1 { "1 (the weighted sum of the objectives)".to_string() } else { format!("{n_acc}") };
        let sharded = self.layout.shards > 1;
        let (one, words) = match (self.reduce_step, sharded) {
            (true, false) => (flat * 4.0, format!("full flat {} (reduced in place)", count(flat))),
            (true, true) => (flat * 4.0 + shard * 4.0, format!("(local sum, full flat {} + reduced shard {})", count(flat), count(shard))),
            (false, _) => (shard * 4.0, format!("shard {} (reduce-scatter every micro-batch)", count(shard))),
        };
        res.push(row("gradient accumulators", format!("{which} × {words} × 4 B"), n_acc * one));
        if m.reference.is_some() {
            res.push(row("NPO reference sums", "8 B per forget example (host Vec<f64>), negligible", 0.0));
        }
        if let (Some(fm), Some(fc)) = (&m.frozen_model, &p.frozen_model) {
            let n = param_specs(fc).iter().map(ParamSpec::numel).sum::<i64>() as f64;
            res.push(row("frozen side model", format!("method.{} loaded whole: {} × {cw}, replicated", fm.key, count(n)), n * c));
        }
        let total_bytes = res.iter().map(|r| r.bytes).sum();
        Phase { name: "resident (whole run)".into(), note: String::new(), on_top_of_resident: false, rows: res, total_bytes }
    }

    /// Loading and flattening, before most resident state exists (rows stand alone).
    pub fn init(&self, ctx: &PhaseCtx) -> Phase {
        let (c, cw) = (self.c, self.cw);
        let frozen = || row("frozen weights", format!("{} × {cw}", count(self.frozen_n)), self.frozen_n * c);
        let flat = || row("flat compute buffer", format!("flatten_and_bind: flat {} × {cw}", count(self.flat)), self.flat * c);
        let load = Moment::new(
            "load + flatten",
            vec![
                self.baseline_row(),
                frozen(),
                row("trainable weights as loaded", format!("{} × {cw}, freed one by one", count(self.trainable_n)), self.trainable_n * c),
                flat(),
            ],
        );
        let master = Moment::new(
            "master shard extraction",
            vec![
                self.baseline_row(),
                frozen(),
                flat(),
                row(
                    "one weight read as fp32",
                    "params::master_shard reads the checkpoint a weight at a time: largest trainable tensor × (stored + 4 B)",
                    self.max_param * (c + 4.0),
                ),
                self.master_row(),
            ],
        );
        // With replicas that are the shards, the master is the flat buffer: nothing is read again.
        let moments = if self.replicas_are_shards { vec![load] } else { vec![load, master] };
        ctx.phase("init (load, flatten, shard)", false, vec![], moments)
    }

    /// NPO's reference log-likelihoods: `reference_sums` runs the per-rank micro-batch's worth of
    /// examples per chunk, without a graph.
    pub fn reference(&self, ctx: &PhaseCtx) -> Option<Phase> {
        let reference = self.m.reference?;
        let (c, cw) = (self.c, self.cw);
        let ref_tokens = (self.p.batch / self.p.world_size).max(1) as f64 * self.p.seq as f64;
        let mut common = vec![];
        if reference.separate_model {
            let n = self.trainable_n + self.frozen_n;
            common.push(row("reference model", format!("method.reference_model loaded whole: {} × {cw}", count(n)), n * c));
        } else {
            common.push(self.gathered_layers_row("gathered layers", self.p.zero == 3, c, cw));
        }
        let nograd = self.w.block_nograd_peak();
        let block = Moment::new(
            "a block",
            vec![row(
                "no-grad block working set",
                format!("{} tokens (per-rank batch × s) × {nograd:.0} B", count(ref_tokens)),
                ref_tokens * nograd,
            )],
        );
        let per = nograd_logprobs_per_logit(c);
        let head = Moment::new(
            "logits",
            vec![row(
                "logits + fp32 log-probs",
                format!("per-rank batch·s·V = {} × {per:.0} B", count(ref_tokens * self.w.vocab)),
                ref_tokens * self.w.vocab * per,
            )],
        );
        Some(ctx.phase("NPO reference pass (once, at start)", true, common, vec![block, head]))
    }

    /// One objective's forward/backward, the worst of the method's objectives.
    pub fn forward_backward(&self, ctx: &PhaseCtx) -> Option<Phase> {
        let (p, m, w, c, cw) = (self.p, self.m, &self.w, self.c, self.cw);
        let (tokens, logits, nl) = (self.tokens, self.logits, self.layers);
        let mut worst: Option<Phase> = None;
        for &(obj, loss) in &m.losses {
            let mut common = vec![];
            let mut moments = vec![];
            if m.teacher_on == Some(obj) {
                common.push(row("teacher logits", format!("{} × {cw}, held through the student pass", self.bsv), logits * c));
                let nograd = w.block_nograd_peak();
                moments.push(Moment::new(
                    "teacher forward",
                    vec![
                        row(
                            "teacher block working set (no grad)",
                            format!("b·s = {} tokens × {nograd:.0} B", count(tokens)),
                            tokens * nograd,
                        ),
                        // Without a teacher replica the teacher's weights are gathered layer by layer.
                        self.gathered_layers_row("gathered teacher layers", p.teacher == TeacherMode::Gather, c, cw),
                    ],
                ));
            }
            if let (Some(fm), Some(fc)) = (m.frozen_model.as_ref().filter(|f| f.on == obj), &p.frozen_model) {
                common.push(row(
                    format!("method.{} logits", fm.key),
                    format!("{} × {cw}, held through the student pass", self.bsv),
                    logits * c,
                ));
                let nograd = Widths::new(fc, c, false).block_nograd_peak();
                let working =
                    row("its block working set (no grad)", format!("b·s = {} tokens × {nograd:.0} B", count(tokens)), tokens * nograd);
                moments.push(Moment::new(format!("method.{} forward", fm.key), vec![working]));
            }
            let per = loss.peak_per_logit(c);
            let loss_row =
                row(format!("logits and {} loss", loss.name()), format!("{} × {per:.0} B: {}", self.bsv, loss.peak_words()), logits * per);
            if !p.layer_wise() {
                let head = w.head_saved();
                moments.push(Moment::new(
                    "loss (all activations saved)",
                    vec![
                        self.all_activations_row(),
                        row("head activations", format!("final norm input + normed hidden: b·s × {head:.0} B"), tokens * head),
                        loss_row,
                    ],
                ));
                // Backward runs layer by layer from the top: the head's buffers and the logits are
                // freed by the head's segment, and each layer's weight gradients go to the
                // accumulator before the next segment.
                let mut top = vec![
                    self.all_activations_row(),
                    self.backward_temps_row(),
                    row("block output gradient", format!("g_out: b·s × d × {cw}"), tokens * w.hidden * c),
                    self.block_grads_row(),
                ];
                top.extend(self.reduction_rows());
                top.push(self.grad_cast_row());
                moments.push(Moment::new("top block backward", top));
            } else {
                common.push(row(
                    "stored layer inputs",
                    format!("layer-wise executor: ({nl} + 1) × b·s {} × d {} × {cw}", count(tokens), w.hidden),
                    (nl + 1.0) * tokens * w.hidden * c,
                ));
                if p.trainable == Trainable::All {
                    let outer = count(self.outer_span);
                    let gathered = if p.zero == 3 { self.outer_span * c } else { 0.0 };
                    common.push(row("gathered outer weights", format!("embeddings/head/norms span {outer} × {cw}, whole pass"), gathered));
                    let buffers = if self.reduce_step { 0.0 } else { self.outer_span * 4.0 };
                    common.push(row(
                        "outer bucket buffers",
                        format!("embeddings/head/norms span {outer} × 4 B, until the pass ends"),
                        buffers,
                    ));
                }
                let head = w.head_saved();
                moments.push(Moment::new("loss", vec![row("head activations", format!("b·s × {head:.0} B"), tokens * head), loss_row]));
                let saved = w.block_saved(c == 4.0);
                let mut layer = vec![
                    row("one block recomputed with graph", format!("b·s {} × {saved:.0} B", count(tokens)), tokens * saved),
                    self.backward_temps_row(),
                    row(
                        "block output and g_out",
                        format!("y and the gradient reaching it: 2 × b·s × d × {cw}"),
                        2.0 * tokens * w.hidden * c,
                    ),
                    self.block_grads_row(),
                    self.gathered_layers_row("gathered layers", p.zero == 3, c, cw),
                ];
                layer.extend(self.reduction_rows());
                layer.push(self.grad_cast_row());
                moments.push(Moment::new("block backward", layer));
            }
            let ph = ctx.phase(&format!("forward/backward ({}: {})", obj.name(), loss.name()), true, common, moments);
            if worst.as_ref().is_none_or(|w| ph.total_bytes > w.total_bytes) {
                worst = Some(ph);
            }
        }
        worst
    }

    /// Reduction, gradient statistics, direction, optimizer, EMA and re-gathering.
    pub fn update(&self, ctx: &PhaseCtx) -> Phase {
        let (p, m, c, shard) = (self.p, self.m, self.c, self.shard);
        let common = vec![];
        let d_row = || {
            let (words, bytes) = if m.update.direction_aliases { ("aliases a gradient shard", 0.0) } else { ("shard × 4 B", shard * 4.0) };
            row("direction d", words, bytes)
        };
        let piece = (shard).min(PIECE);
        let dot_row = |what: &str| row(what.to_string(), "dist::zero::dot: piece products, 4 Mi elements × (4 + 8) B", piece * 12.0);
        let mut moments = vec![Moment::new("gradient statistics", vec![dot_row("fp64 temporaries of ‖g‖², ⟨g_F,g_R⟩")])];
        let reductions = self.reduction_rows();
        if !reductions.is_empty() {
            moments.push(Moment::new("last reductions", reductions));
        }
        let temps = m.update.direction_temps;
        moments.push(Moment::new(
            "direction",
            vec![d_row(), row("direction temporaries", format!("{temps} × shard × 4 B"), temps * shard * 4.0)],
        ));
        if p.clip_norm {
            moments.push(Moment::new("clip", vec![d_row(), dot_row("fp64 temporaries of ‖d‖² (optim.clip_norm)")]));
        }
        let step_row = match (p.optim, p.weight_decay) {
            // optim/adamw.rs updates the shard in pieces through two persistent scratch buffers.
            (OptimName::AdamW, _) => row("AdamW step scratch", "2 × 1 Mi elements × 4 B", 2.0 * shard.min(1048576.0) * 4.0),
            (_, true) => row("SGD step temporaries", "2 × shard × 4 B", 2.0 * shard * 4.0),
            _ => row("SGD step temporaries", "1 × shard × 4 B", shard * 4.0),
        };
        moments.push(Moment::new("optimizer step", vec![d_row(), step_row]));
        if m.update.after_step_temps > 0.0 {
            moments.push(Moment::new(
                "EMA update",
                vec![d_row(), row("EMA temporary", "θ·δc: shard × 4 B", m.update.after_step_temps * shard * 4.0)],
            ));
        }
        if m.autolr.is_some() {
            let wt_delta = row("probe shards w_t and Δ", "2 × shard × 4 B", 2.0 * shard * 4.0);
            moments.push(Moment::new(
                "AutoLR trial point",
                vec![d_row(), wt_delta.clone(), row("w_t + rΔ temporaries", "2 × shard × 4 B", 2.0 * shard * 4.0)],
            ));
            // The probes run in fp32 on the master: frozen weights cast to fp32 (bf16 runs), the
            // trainable ones gathered per layer in fp32, activations and logits in fp32.
            let w32 = Widths::new(&p.model, 4.0, p.trainable == Trainable::All);
            let fwd = (self.tokens * w32.block_nograd_peak()).max(self.logits * nograd_logprobs_per_logit(4.0));
            let frozen32 = if c == 2.0 { self.frozen_n * 4.0 } else { 0.0 };
            moments.push(Moment::new(
                "AutoLR probe forward",
                vec![
                    d_row(),
                    wt_delta,
                    row("fp32 frozen weights", format!("probe model: {} × 4 B (bf16 runs only)", count(self.frozen_n)), frozen32),
                    row("probe forward", "no grad, fp32: block working set, or logits + log-probs", fwd),
                    self.gathered_layers_row("gathered fp32 layers", true, 4.0, "4 B"),
                ],
            ));
        }
        if p.verify {
            let replica = if p.zero < 3 || (m.teacher() && p.teacher == TeacherMode::Replica) { self.flat.min(PIECE) } else { 0.0 };
            let words = "dist::zero::checksum: an fp64 piece and its square, 2 × 4 Mi elements × 8 B";
            moments.push(Moment::new("replica verification", vec![row("fp64 pieces of a replica", words, 2.0 * replica * 8.0)]));
        }
        if c == 2.0 {
            let words = "bf16 piece casts of the fp32 shard, one bucket at a time (bf16 travels as it is, MPI included)";
            moments.push(Moment::new("re-gather replicas", vec![row("all-gather buffers", words, self.max_bucket / self.world * c)]));
        }
        ctx.phase("update (reduce, direction, step, EMA, gather)", true, common, moments)
    }
}

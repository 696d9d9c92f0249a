//! The step-time model of `unlearn plan`: compute from FLOPs at a stated efficiency, every
//! collective of a step from its bytes on a named fabric, and how much of the communication the
//! trainer hides behind compute, by replaying one step's schedule.
//!
//! Compute: matrix FLOPs per token read off `model::llama` (2 per multiply-add; attention is the
//! fused causal kernel, so its score and value products cost `2·heads·head_dim·s` per token per
//! layer, half the full square), for each pass the method runs: the student's forward and
//! backward per objective (input gradients everywhere, weight gradients for trainable weights,
//! attention backward twice its forward), the layer recompute of `train.recompute`/ZeRO-3, the
//! teacher's forward, and the AutoLR probes (3 forwards of `grad_accum` batches every
//! `autolr_period` steps). Elementwise work (norms, losses, the optimizer) is not counted.
//! Time = FLOPs / (peak × MFU).
//!
//! Communication: ring algorithms (NCCL's and Open MPI's for large messages): a reduce-scatter or
//! all-gather moves `(N−1)/N` of its buffer per rank, an all-reduce twice that, at the fabric's
//! bus bandwidth, plus a per-call latency. One collective runs at a time, in issue order (the MPI
//! communication thread, the NCCL communication stream). The schedule replay then charges as
//! *exposed* only the time compute waits: for a bucket's gathered weights (ZeRO-3, the gathered
//! teacher, the fp32 probes; prefetched one layer ahead; the replicas' re-gather after the
//! update, which the next step's forward waits for layer by layer), for a free slot among the
//! micro-batch reductions in flight, at the step's final wait for the gradient reductions, and for
//! the collectives that block (scalar all-reduces; the re-gathers with `dist.overlap = false`).
//!
//! "Before" replays the same step as the trainer did before issue 11: one accumulator per
//! objective, ZeRO-0/1 all-reducing it after the last micro-batch (ZeRO-1 keeping a shard of the
//! result), ZeRO-2/3 reduce-scattering every objective's every micro-batch, AutoLR probes on the
//! re-gathered compute replica, and every collective waited for where it was issued.
//!
//! Not modelled: NCCL kernels sharing the GPU with compute (a few % of the SMs while they run),
//! stragglers, the data loader, host syncs of logged values, the NPO reference pass (once per run).

use serde::Serialize;
use tch::Tensor;

use super::{count, PlanInput};
use crate::config::{Dtype, ReduceMode, TeacherMode, Trainable};
use crate::dist::zero::FlatLayout;
use crate::methods::Gradients;
use crate::train::sink::MAX_IN_FLIGHT;

/// A named interconnect: per-rank bus bandwidth within a node and across nodes.
#[derive(Debug, Clone, Serialize)]
pub struct Fabric {
    pub name: String,
    /// GB/s, within a node (NVLink).
    pub intra_gbs: f64,
    /// GB/s of bus bandwidth when the ring crosses nodes: the NIC bandwidth of a node.
    pub inter_gbs: f64,
    pub ranks_per_node: usize,
    /// Per collective call, µs.
    pub latency_us: f64,
}

/// The fabrics `--fabric` names. Bandwidths are the bus bandwidths NCCL's tests report for large
/// messages on such machines (assumed here; no cluster was measured): H100 SXM NVLink 4 about
/// 450 GB/s; a node's 400 Gb/s NICs 50 GB/s each.
pub const FABRICS: &[(&str, f64, f64, f64, &str)] = &[
    ("nvlink", 450.0, 450.0, 15.0, "one node, NVLink 4 (H100 SXM): 450 GB/s bus"),
    ("ib-400g-x8", 450.0, 400.0, 30.0, "NVLink in a node, 8 × 400 Gb/s InfiniBand NICs per node: 400 GB/s across nodes"),
    ("ib-400g-x1", 450.0, 50.0, 30.0, "NVLink in a node, 1 × 400 Gb/s InfiniBand NIC per node: 50 GB/s across nodes"),
    ("ethernet-100g", 450.0, 12.5, 50.0, "NVLink in a node, 1 × 100 Gb/s Ethernet per node: 12.5 GB/s across nodes"),
    ("host-shm", HOST_SHM_GBS, HOST_SHM_GBS, 20.0, "CPU ranks on one machine, Open MPI shared memory (benches/reduce.rs)"),
];

/// Bus bandwidth of fp32 reductions between 2 CPU ranks through Open MPI's shared memory,
/// measured with benches/reduce.rs on the development machine (benches/scale.md).
pub const HOST_SHM_GBS: f64 = 2.0;

impl Fabric {
    /// A named fabric with `ranks_per_node` ranks on each node.
    /// Bandwidths given on the command line (GB/s per rank within and across nodes).
    pub fn explicit(intra_gbs: f64, inter_gbs: f64, ranks_per_node: usize, latency_us: f64) -> Fabric {
        Fabric { name: "explicit".into(), intra_gbs, inter_gbs, ranks_per_node: ranks_per_node.max(1), latency_us }
    }

    pub fn named(name: &str, ranks_per_node: usize) -> crate::Result<Fabric> {
        let (n, intra, inter, lat, _) = FABRICS.iter().find(|f| f.0 == name).ok_or_else(|| {
            crate::other!("--fabric {name:?}: unknown (known: {})", FABRICS.iter().map(|f| f.0).collect::<Vec<_>>().join(", "))
        })?;
        Ok(Fabric { name: n.to_string(), intra_gbs: *intra, inter_gbs: *inter, ranks_per_node: ranks_per_node.max(1), latency_us: *lat })
    }

    /// Bus bandwidth (bytes/s) of a collective over `world` ranks.
    fn bus(&self, world: usize) -> f64 {
        let gbs = if world <= self.ranks_per_node { self.intra_gbs } else { self.intra_gbs.min(self.inter_gbs) };
        gbs * 1e9
    }

    pub fn words(&self, world: usize) -> String {
        let nodes = world.div_ceil(self.ranks_per_node);
        let desc = FABRICS.iter().find(|f| f.0 == self.name).map_or("explicit bandwidths", |f| f.4);
        format!(
            "{} ({desc}): {nodes} node(s) × {} rank(s), bus {:.1} GB/s, {:.0} µs per call",
            self.name,
            self.ranks_per_node.min(world),
            self.bus(world) / 1e9,
            self.latency_us
        )
    }
}

/// The compute side: peak FLOP/s of one rank's device and the share of it reached.
#[derive(Debug, Clone, Serialize)]
pub struct Compute {
    pub peak_flops: f64,
    pub mfu: f64,
    pub words: String,
}

impl Compute {
    /// H100 SXM: 989 TFLOP/s dense bf16; fp32 matrix products without TF32 (libtorch's default)
    /// run at 67 TFLOP/s.
    pub fn h100(dtype: Dtype, mfu: f64) -> Compute {
        let (peak, what) = match dtype {
            Dtype::Bf16 => (989e12, "H100 SXM dense bf16 989 TFLOP/s"),
            Dtype::Fp32 => (67e12, "H100 SXM fp32 (no TF32) 67 TFLOP/s"),
        };
        Compute { peak_flops: peak, mfu, words: format!("{what} at {:.0}% MFU", mfu * 100.0) }
    }
}

/// FLOPs per token of one pass, by kind.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Flops {
    /// Forward of one block.
    pub block_forward: f64,
    /// Backward of one block (input and weight gradients, attention).
    pub block_backward: f64,
    /// Final norm and LM head, forward.
    pub head_forward: f64,
    pub head_backward: f64,
    /// The first block's q/k/v input gradients, which nobody needs when the embedding is frozen
    /// (autograd skips them: the block's input does not require a gradient).
    pub first_block_saving: f64,
    pub layers: f64,
    /// Per token: the whole forward and backward.
    pub forward_per_token: f64,
    pub backward_per_token: f64,
}

impl Flops {
    pub fn of(p: &PlanInput) -> Flops {
        let m = &p.model;
        let (d, i, v) = (m.hidden_size as f64, m.intermediate_size as f64, m.vocab_size as f64);
        let (q, kv) = ((m.num_attention_heads * m.head_dim) as f64, (m.num_key_value_heads * m.head_dim) as f64);
        let attn_params = d * q + 2.0 * d * kv + q * d;
        let mlp_params = 3.0 * d * i;
        let block = attn_params + mlp_params;
        let attn = 2.0 * q * p.seq as f64;
        // Block matrices train under both trainable sets; the head and the embedding only under
        // "all". Norm weights are elementwise, not counted.
        let (head_trainable, embed_trainable) = (p.trainable == Trainable::All, p.trainable == Trainable::All);
        let mut f = Flops {
            block_forward: 2.0 * block + attn,
            block_backward: 4.0 * block + 2.0 * attn,
            head_forward: 2.0 * d * v,
            head_backward: 2.0 * d * v + if head_trainable { 2.0 * d * v } else { 0.0 },
            first_block_saving: if embed_trainable { 0.0 } else { 2.0 * d * (q + 2.0 * kv) },
            layers: m.num_hidden_layers as f64,
            forward_per_token: 0.0,
            backward_per_token: 0.0,
        };
        f.forward_per_token = f.layers * f.block_forward + f.head_forward;
        f.backward_per_token = f.layers * f.block_backward + f.head_backward - f.first_block_saving;
        f
    }
    pub fn forward(&self) -> f64 {
        self.forward_per_token
    }
    pub fn backward(&self) -> f64 {
        self.backward_per_token
    }
}

/// One kind of collective in a step.
#[derive(Debug, Clone, Serialize)]
pub struct CommRow {
    pub what: String,
    pub op: &'static str,
    pub calls: f64,
    /// Payload bytes per step (the buffers handed to the collective).
    pub bytes: f64,
    pub seconds: f64,
}

/// One design's step, replayed.
#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    pub compute_s: f64,
    pub comm_s: f64,
    pub exposed_s: f64,
    pub step_s: f64,
    pub comm: Vec<CommRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    pub compute: Compute,
    pub fabric: Fabric,
    pub flops: Flops,
    /// Compute FLOPs per step per rank, by part.
    pub compute_rows: Vec<(String, f64)>,
    /// Tokens per rank per step that are trained on (every objective's micro-batches).
    pub tokens: f64,
    pub now: Replay,
    pub before: Replay,
    pub tokens_per_s_gpu: f64,
}

/// The clocks of one step: compute runs on one clock, collectives queue on another.
#[derive(Default)]
struct Sim {
    t: f64,
    comm_free: f64,
    compute: f64,
    exposed: f64,
    rows: Vec<CommRow>,
    /// End times of reductions in flight (micro-batch mode's cap).
    in_flight: std::collections::VecDeque<f64>,
    /// The previous update's replica gathers still arriving (`dist.overlap`): (teacher's, layer,
    /// end), waited for by the first forward that reaches the layer.
    arriving: Vec<(bool, Option<usize>, f64)>,
}

impl Sim {
    fn work(&mut self, s: f64) {
        self.t += s;
        self.compute += s;
    }
    fn wait(&mut self, until: f64) {
        if until > self.t {
            self.exposed += until - self.t;
            self.t = until;
        }
    }
    /// Wait for `layer`'s post-update gather of the teacher's or the student's replica, if it is
    /// still arriving.
    fn arrive(&mut self, teacher: bool, layer: Option<usize>) {
        if let Some(i) = self.arriving.iter().position(|a| a.0 == teacher && a.1 == layer) {
            let end = self.arriving.remove(i).2;
            self.wait(end);
        }
    }

    /// Queue `calls` collectives (a layer's buckets); returns when they end.
    fn issue(&mut self, what: &str, op: &'static str, bytes: f64, calls: f64, seconds: f64) -> f64 {
        let start = self.t.max(self.comm_free);
        self.comm_free = start + seconds;
        match self.rows.iter_mut().find(|r| r.what == what && r.op == op) {
            Some(r) => {
                r.calls += calls;
                r.bytes += bytes;
                r.seconds += seconds;
            }
            None => self.rows.push(CommRow { what: what.into(), op, calls, bytes, seconds }),
        }
        self.comm_free
    }
}

/// What the replay needs to know about the run, derived once.
struct Model<'a> {
    p: &'a PlanInput,
    fabric: &'a Fabric,
    rate: f64,
    f: Flops,
    tokens: f64,
    layout: FlatLayout,
    n_layers: usize,
    c: f64,
    world: f64,
    shards: usize,
    reduce_step: bool,
}

/// Which design to replay.
#[derive(Clone, Copy, PartialEq)]
enum Design {
    Now,
    Before,
}

impl Model<'_> {
    fn seconds(&self, op: &str, bytes: f64, calls: f64) -> f64 {
        if self.p.world_size == 1 {
            return 0.0;
        }
        let n = self.world;
        let factor = if op == "all_reduce" { 2.0 * (n - 1.0) / n } else { (n - 1.0) / n };
        calls * self.fabric.latency_us * 1e-6 + factor * bytes / self.fabric.bus(self.p.world_size)
    }

    fn layer_elems(&self, l: Option<usize>) -> f64 {
        self.layout.layer_buckets(l).iter().map(|&b| self.layout.buckets[b].padded as f64).sum()
    }

    fn layer_buckets(&self, l: Option<usize>) -> f64 {
        self.layout.layer_buckets(l).len() as f64
    }

    /// A pass's weights gathered layer by layer (ZeRO-3 student, gathered teacher, fp32 probes):
    /// `each` runs the layer's compute; prefetched one layer ahead in the current design.
    fn gathered(
        &self,
        sim: &mut Sim,
        d: Design,
        what: &str,
        bytes_per: f64,
        order: &[Option<usize>],
        each: &mut dyn FnMut(&mut Sim, Option<usize>),
    ) {
        let gather = |sim: &mut Sim, l: Option<usize>| {
            if self.layer_buckets(l) == 0.0 {
                return sim.t; // nothing trainable in this layer: nothing to gather
            }
            let (bytes, calls) = (self.layer_elems(l) * bytes_per, self.layer_buckets(l));
            let s = self.seconds("all_gather", bytes, calls);
            sim.issue(what, "all_gather", bytes, calls, s)
        };
        if d == Design::Before {
            for &l in order {
                let end = gather(sim, l);
                sim.wait(end);
                each(sim, l);
            }
            return;
        }
        let mut ahead = order.first().map(|&l| gather(sim, l));
        for (k, &l) in order.iter().enumerate() {
            if let Some(end) = ahead.take() {
                sim.wait(end);
            }
            if let Some(&next) = order.get(k + 1) {
                ahead = Some(gather(sim, next));
            }
            each(sim, l);
        }
    }

    /// Reduce a layer's gradient buckets (`issue` in the current design; blocking before).
    fn reduce(&self, sim: &mut Sim, d: Design, op: &'static str, elems: f64, calls: f64) {
        if calls == 0.0 || self.p.world_size == 1 {
            return;
        }
        let wire = if d == Design::Now && self.p.bf16_wire() { 2.0 } else { 4.0 };
        let bytes = elems * wire;
        let s = self.seconds(op, bytes, calls);
        let micro = d == Design::Now && !self.reduce_step;
        if micro {
            while sim.in_flight.len() >= MAX_IN_FLIGHT {
                let oldest = sim.in_flight.pop_front().expect("non-empty");
                sim.wait(oldest);
            }
        }
        let end = sim.issue("gradient reduction", op, bytes, calls, s);
        if d == Design::Before || !self.p.overlap {
            sim.wait(end);
        } else if micro {
            sim.in_flight.push_back(end);
        }
    }

    /// One objective's forward and backward; `reduce_now`: its buckets are reduced as they
    /// complete (`Some(op)`).
    fn pass(&self, sim: &mut Sim, d: Design, teacher: bool, reduce_now: Option<&'static str>) {
        let (f, tok, rate) = (self.f, self.tokens, self.rate);
        if teacher {
            let fwd_layer = tok * f.block_forward / rate;
            if self.p.teacher == TeacherMode::Gather && self.shards > 1 {
                let order = self.order_forward();
                self.gathered(sim, d, "teacher gather", self.c, &order, &mut |sim, l| sim.work(if l.is_some() { fwd_layer } else { 0.0 }));
                sim.work(tok * f.head_forward / rate);
            } else {
                self.resident_forward(sim, true);
            }
        }
        let recompute = self.p.layer_wise();
        let fwd_layer = tok * f.block_forward / rate;
        let bwd_layer = tok * (f.block_backward + if recompute { f.block_forward } else { 0.0 }) / rate;
        let reduce_layer = |sim: &mut Sim, l: Option<usize>| {
            if let Some(op) = reduce_now {
                self.reduce(sim, d, op, self.layer_elems(l), self.layer_buckets(l));
            }
        };
        if self.p.zero == 3 {
            // Forward over the layers, head, then backward from the top (the last layer stays).
            let order = self.order_forward();
            self.gathered(sim, d, "ZeRO-3 weight gather", self.c, &order, &mut |sim, l| {
                sim.work(if l.is_some() { fwd_layer } else { 0.0 })
            });
            sim.work(tok * (f.head_forward + f.head_backward) / rate);
            let back: Vec<Option<usize>> = (0..self.n_layers.saturating_sub(1)).rev().map(Some).collect();
            sim.work(bwd_layer);
            reduce_layer(sim, Some(self.n_layers - 1));
            self.gathered(sim, d, "ZeRO-3 weight gather", self.c, &back, &mut |sim, l| {
                sim.work(bwd_layer);
                reduce_layer(sim, l);
            });
        } else {
            self.resident_forward(sim, false);
            sim.work(tok * f.head_backward / rate);
            for l in (0..self.n_layers).rev() {
                sim.work(bwd_layer);
                if d == Design::Now || self.p.layer_wise() {
                    reduce_layer(sim, Some(l));
                }
            }
            if d == Design::Before && !self.p.layer_wise() {
                // The plain executor handed every bucket over after the whole backward.
                if let Some(op) = reduce_now {
                    self.reduce(
                        sim,
                        d,
                        op,
                        self.layout.total as f64 - self.layer_elems(None),
                        self.layout.buckets.len() as f64 - self.layer_buckets(None),
                    );
                }
            }
        }
        reduce_layer(sim, None);
    }

    /// A forward on a resident replica: layer by layer while the previous update's gathers into
    /// it are arriving (each layer waits for its own), else in one piece.
    fn resident_forward(&self, sim: &mut Sim, teacher: bool) {
        let (f, tok, rate) = (self.f, self.tokens, self.rate);
        if !sim.arriving.iter().any(|a| a.0 == teacher) {
            sim.work(tok * f.forward() / rate);
            return;
        }
        for l in self.order_forward() {
            sim.arrive(teacher, l);
            sim.work(tok * if l.is_some() { f.block_forward } else { 0.0 } / rate);
        }
        sim.work(tok * f.head_forward / rate);
    }

    fn order_forward(&self) -> Vec<Option<usize>> {
        std::iter::once(None).chain((0..self.n_layers).map(Some)).collect()
    }

    fn replay(&self, d: Design) -> Replay {
        let p = self.p;
        let m = &p.method_spec;
        let mut sim = Sim::default();
        let objectives = m.objectives();
        let separate = matches!(m.gradients, Gradients::Separate);
        let accs = if d == Design::Before || separate { objectives.len() } else { 1 };
        let a = p.grad_accum;
        let sharded = self.shards > 1;
        let rs = if sharded { "reduce_scatter" } else { "all_reduce" };
        // The compute replicas re-gathered after the update: waited for there, or (`dist.overlap`)
        // started there and waited for layer by layer by the next step's first forward of each
        // replica, which in the steady state this replay stands for means: issued as the step
        // starts, in the order that forward reads the layers (the teacher's first when the first
        // pass begins with the teacher forward, as the trainer issues them).
        let regathers: Vec<(bool, &str)> = [(false, "student replica re-gather"), (true, "teacher replica re-gather")]
            .into_iter()
            .filter(|&(teacher, _)| sharded && if teacher { m.teacher() && p.teacher == TeacherMode::Replica } else { p.zero < 3 })
            .collect();
        let overlapped = d == Design::Now && p.overlap;
        if overlapped {
            let teacher_first = m.teacher_on.is_some() && m.teacher_on == objectives.first().copied();
            let mut order = regathers.clone();
            if teacher_first {
                order.reverse();
            }
            for (teacher, what) in order {
                for l in self.order_forward().into_iter().filter(|&l| self.layer_buckets(l) > 0.0) {
                    let (bytes, calls) = (self.layer_elems(l) * self.c, self.layer_buckets(l));
                    let end = sim.issue(what, "all_gather", bytes, calls, self.seconds("all_gather", bytes, calls));
                    sim.arriving.push((teacher, l, end));
                }
            }
        }
        for k in 0..a {
            for (j, &o) in objectives.iter().enumerate() {
                let teacher = m.teacher_on == Some(o);
                let last_for_acc = if accs == 1 { j + 1 == objectives.len() } else { true };
                let reduce_now = match d {
                    Design::Before if p.zero >= 2 && sharded => Some("reduce_scatter"),
                    Design::Before => None,
                    Design::Now if !self.reduce_step => Some("reduce_scatter"),
                    Design::Now if k + 1 == a && last_for_acc => Some(rs),
                    Design::Now => None,
                };
                self.pass(&mut sim, d, teacher, reduce_now);
            }
        }
        if d == Design::Before && p.zero < 2 {
            // ZeRO-0/1 all-reduced each objective's full accumulator after the last micro-batch.
            for _ in 0..accs {
                self.reduce(&mut sim, d, "all_reduce", self.layout.total as f64, self.layout.buckets.len() as f64);
            }
        }
        // The final wait: every reduction in flight.
        let end = sim.comm_free;
        sim.wait(end);
        let scalar = |sim: &mut Sim, n: f64| {
            for _ in 0..n as usize {
                let s = self.seconds("all_reduce", 64.0, 1.0);
                let e = sim.issue("scalars (losses, norms)", "all_reduce", 64.0, 1.0, s);
                sim.wait(e);
            }
        };
        scalar(&mut sim, if d == Design::Before { 2.0 } else { 1.0 });
        // AutoLR probes, averaged over their period.
        if let Some(period) = m.autolr {
            let share = 1.0 / period as f64;
            let mut probe = Sim::default();
            // Before: the compute replica re-gathered at each trial point (ZeRO-1/2) or the
            // student's layers gathered per forward (ZeRO-3). Now: fp32 layers from the master.
            let per_layer = match d {
                Design::Now if sharded => Some(("AutoLR probe gathers (fp32)", 4.0)),
                Design::Before if p.zero == 3 => Some(("AutoLR probe gathers", self.c)),
                _ => None,
            };
            for _ in 0..3 {
                if d == Design::Before && sharded && p.zero < 3 {
                    let (bytes, calls) = (self.layout.total as f64 * self.c, self.layout.buckets.len() as f64);
                    let s = self.seconds("all_gather", bytes, calls);
                    let e = probe.issue("AutoLR probe gathers", "all_gather", bytes, calls, s);
                    probe.wait(e);
                }
                for _ in 0..a {
                    let fwd_layer = self.tokens * self.f.block_forward / self.rate;
                    if let Some((what, bytes_per)) = per_layer {
                        let order = self.order_forward();
                        self.gathered(&mut probe, d, what, bytes_per, &order, &mut |s, l| {
                            s.work(if l.is_some() { fwd_layer } else { 0.0 })
                        });
                        probe.work(self.tokens * self.f.head_forward / self.rate);
                    } else {
                        probe.work(self.tokens * self.f.forward() / self.rate);
                    }
                }
                let s = self.seconds("all_reduce", 8.0, 1.0);
                let e = probe.issue("scalars (losses, norms)", "all_reduce", 8.0, 1.0, s);
                probe.wait(e);
            }
            sim.compute += share * probe.compute;
            sim.exposed += share * probe.exposed;
            sim.t += share * probe.t;
            for mut r in probe.rows {
                r.calls *= share;
                r.bytes *= share;
                r.seconds *= share;
                match sim.rows.iter_mut().find(|x| x.what == r.what && x.op == r.op) {
                    Some(x) => {
                        x.calls += r.calls;
                        x.bytes += r.bytes;
                        x.seconds += r.seconds;
                    }
                    None => sim.rows.push(r),
                }
            }
        }
        if !overlapped {
            for (_, what) in regathers {
                let (bytes, calls) = (self.layout.total as f64 * self.c, self.layout.buckets.len() as f64);
                let s = self.seconds("all_gather", bytes, calls);
                let e = sim.issue(what, "all_gather", bytes, calls, s);
                sim.wait(e);
            }
        }
        let comm_s = sim.rows.iter().map(|r| r.seconds).sum();
        Replay { compute_s: sim.compute, comm_s, exposed_s: sim.exposed, step_s: sim.compute + sim.exposed, comm: sim.rows }
    }
}

/// The step time of the planned run on `fabric` at `compute`.
pub fn step_time(p: &PlanInput, reduce: ReduceMode, compute: Compute, fabric: Fabric) -> StepTime {
    let specs = crate::model::param_specs(&p.model);
    let trainable = crate::train::layout::trainable_specs(&specs, p.trainable);
    let layout = crate::train::layout::flat_layout(&trainable, p.zero, p.world_size, p.bucket_mb);
    let f = Flops::of(p);
    let tokens = (p.batch / p.world_size) as f64 * p.seq as f64;
    let model = Model {
        p,
        fabric: &fabric,
        rate: compute.peak_flops * compute.mfu,
        f,
        tokens,
        shards: layout.shards,
        layout,
        n_layers: p.model.num_hidden_layers as usize,
        c: if p.dtype == Dtype::Bf16 { 2.0 } else { 4.0 },
        world: p.world_size as f64,
        reduce_step: reduce == ReduceMode::Step || p.zero < 2,
    };
    let m = &p.method_spec;
    let a = p.grad_accum as f64;
    let n_obj = m.losses.len() as f64;
    let mut compute_rows = vec![
        ("student forward".to_string(), a * n_obj * tokens * f.forward()),
        ("student backward".to_string(), a * n_obj * tokens * f.backward()),
    ];
    if p.layer_wise() {
        compute_rows.push(("layer recompute".into(), a * n_obj * tokens * f.layers * f.block_forward));
    }
    if m.teacher() {
        compute_rows.push(("teacher forward".into(), a * tokens * f.forward()));
    }
    if let Some(period) = m.autolr {
        compute_rows.push((
            format!("AutoLR probes (3 × {} forwards every {period} steps)", p.grad_accum),
            3.0 * a * tokens * f.forward() / period as f64,
        ));
    }
    let now = model.replay(Design::Now);
    let before = model.replay(Design::Before);
    let trained = a * n_obj * tokens;
    StepTime { tokens_per_s_gpu: trained / now.step_s.max(1e-12), compute, fabric, flops: f, compute_rows, tokens: trained, now, before }
}

fn ms(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

impl StepTime {
    pub fn render(&self, world: usize) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let f = &self.flops;
        let _ = writeln!(out, "\nstep time (per rank; compute: {}; fabric: {})", self.compute.words, self.fabric.words(world));
        let _ = writeln!(
            out,
            "  FLOPs per token: forward {} (block {} × {} layers + head {}), backward {}",
            count(f.forward()),
            count(f.block_forward),
            f.layers,
            count(f.head_forward),
            count(f.backward())
        );
        let rate = self.compute.peak_flops * self.compute.mfu;
        for (what, flops) in &self.compute_rows {
            let _ = writeln!(out, "  {what:<52} {:>12}FLOP {:>10}", count(*flops), ms(flops / rate));
        }
        let _ = writeln!(out, "  {:<52} {:>16} {:>10}", "= compute", "", ms(self.now.compute_s));
        let _ = writeln!(out, "  {:<38} {:>15} {:>8} {:>14} {:>10}", "collectives per step", "op", "calls", "bytes", "time");
        for r in &self.now.comm {
            let _ = writeln!(out, "  {:<38} {:>15} {:>8.1} {:>13}B {:>10}", r.what, r.op, r.calls, count(r.bytes), ms(r.seconds));
        }
        let share = |r: &Replay| 100.0 * r.exposed_s / r.step_s.max(1e-12);
        let now = &self.now;
        let _ = writeln!(
            out,
            "  communication {} of which hidden behind compute {}, exposed {} ({:.1}% of the step)",
            ms(now.comm_s),
            ms(now.comm_s - now.exposed_s),
            ms(now.exposed_s),
            share(now)
        );
        let _ = writeln!(
            out,
            "  predicted step time {} ({} tokens per rank), {:.0} tokens/s per GPU",
            ms(now.step_s),
            count(self.tokens),
            self.tokens_per_s_gpu
        );
        let b = &self.before;
        let _ = writeln!(
            out,
            "  design before issue 11 (per-objective accumulators, per-micro-batch ZeRO-2/3 reductions, nothing overlapped): \
             communication {}, exposed {} ({:.1}%), step {}",
            ms(b.comm_s),
            ms(b.exposed_s),
            share(b),
            ms(b.step_s)
        );
        out
    }
}

/// The share of the measured fp32 matrix-product peak that `unlearn run`'s CPU step reaches
/// (SmolLM2-135M fine-tune, 4 × 256 tokens, measured on the development machine: benches/scale.md).
pub const CPU_MFU: f64 = 0.45;

/// The compute side of a CPU rank: this machine's fp32 matrix-product rate, measured now on the
/// threads one rank gets (as `unlearn run` splits the cores between the ranks of a node).
pub fn cpu_compute(mfu: Option<f64>) -> Compute {
    let before = tch::get_num_threads();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / crate::dist::local_world_size().max(1)).max(1);
    tch::set_num_threads(threads as i32);
    let peak = measure_gemm_flops();
    tch::set_num_threads(before);
    let mfu = mfu.unwrap_or(CPU_MFU);
    Compute {
        peak_flops: peak,
        mfu,
        words: format!("fp32 matrix product measured now at {:.0} GFLOP/s on {threads} thread(s), at {:.0}% MFU", peak / 1e9, mfu * 100.0),
    }
}

/// Best rate of 1024² fp32 matrix products over about a quarter of a second.
fn measure_gemm_flops() -> f64 {
    let n = 1024i64;
    let opts = (tch::Kind::Float, tch::Device::Cpu);
    let (a, b) = (Tensor::randn([n, n], opts), Tensor::randn([n, n], opts));
    let _ = a.matmul(&b);
    let start = std::time::Instant::now();
    let mut best = 0.0f64;
    while start.elapsed().as_secs_f64() < 0.25 {
        let t = std::time::Instant::now();
        let c = a.matmul(&b);
        let _ = c.double_value(&[0, 0]);
        best = best.max(2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

//! The trainer: the one place where model, method and distribution meet.
//!
//! One optimizer step (see ARCHITECTURE.md):
//! 1. every rank draws the same global micro-batches and takes its slice;
//! 2. for each objective the method uses (forget, retain) the student runs forward/backward and the
//!    gradients land in an accumulator: one per objective when the method reads them separately
//!    (NGDiff normalises each by its own global norm), else one for all, each loss scaled by its
//!    declared weight (the weighted sum is all such a method reads);
//! 3. accumulators are reduced over ranks once per step (or per micro-batch under ZeRO-2/3 when
//!    memory requires), each bucket as soon as the last pass has produced it, while backward goes
//!    on (see `sink`);
//! 4. one all-reduce of the logged losses and the shard-local squared norms gives every rank the
//!    same scalars;
//! 5. the method combines the shards into a direction; AutoLR may probe (in fp32, the master's
//!    precision); the optimizer updates this rank's fp32 master shard; the method's after-step hook
//!    runs (teacher EMA);
//! 6. shards are all-gathered back into the compute-dtype replicas (student, teacher).
//!
//! A step whose loss or gradient norm is not finite on any rank is skipped on every rank (no
//! update of weights, optimizer, teacher or AutoLR), up to `train.max_skipped_steps` in a row.

pub mod backward;
mod eval_hook;
mod final_model;
mod frozen;
pub mod layout;
mod net;
pub mod out_dir;
pub mod params;
mod passes;
pub mod sink;
mod verify;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::Attached;
use crate::config::{DataSource, ReduceMode, RunConfig};
use crate::data::loader::{local_batch, Loader, LocalBatch};
use crate::data::{read_records, tokenize_all, Example, Record, Template, Tokenizer};
use crate::dist::count::{Counted, OpCount, Tally};
use crate::dist::zero::FlatLayout;
use crate::dist::{watchdog, Collective, Comm};
use crate::fault::{self, Fault};
use crate::methods::{self, Aux, GradStats, Gradients, Grads, Method, Objective, Reduced, Spec};
use crate::model::{load_model, param_specs};
use crate::optim::{self, Optimizer, Schedule};
use crate::Result;
use backward::{forward_backward, forward_logits, Weights};
use frozen::Frozen;
use net::{teacher_net, Net, Residency};
use sink::{Accumulator, ReduceAt, Sink};

/// One line of metrics.jsonl.
///
/// Gradient norms are of the reduced (global) gradients, except the `_local` ones: a method that
/// reads only the weighted sum of its objectives' gradients has one accumulator, so each
/// objective's reduced gradient never exists. For such a method with two objectives,
/// `grad_norm` is the global norm of the weighted sum (what mean teacher clips) and
/// `grad_norm_{forget,retain}_local` estimate each objective's norm before reduction: the root of
/// the summed squared norms of the unreduced pieces (each rank's share of each micro-batch,
/// divided by the objective's weight). With one rank and one micro-batch that is the exact norm;
/// otherwise it equals the global norm when the pieces are orthogonal and is √K smaller when all
/// K = ranks × grad_accum pieces are equal, so compare it across runs of the same K only.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub loss_forget: Option<f64>,
    pub loss_retain: Option<f64>,
    pub grad_norm_forget: Option<f64>,
    pub grad_norm_retain: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm_forget_local: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm_retain_local: Option<f64>,
    pub lr: f64,
    pub clip: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// Seconds the step spent blocked on collectives (MPI; NCCL waits are on the device): the
    /// communication it did not hide behind compute.
    pub comm_wait_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autolr: Option<methods::autolr::Fit>,
    /// Calls and payload bytes per collective this rank issued in the step
    /// (`UNLEARN_COUNT_COLLECTIVES=1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collectives: Option<std::collections::BTreeMap<&'static str, OpCount>>,
    /// A non-finite loss or gradient norm: no update was applied.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Some rank was asked to stop (a signal) before this step's agreement: every rank sees it.
    #[serde(skip)]
    pub stop_requested: bool,
}

/// One objective's data, the accumulator its gradients go to, and the weight its loss is scaled
/// by before backward (1 when the method reads the objectives' gradients separately).
struct ObjectiveState {
    obj: Objective,
    loader: Loader,
    acc: usize,
    weight: f64,
}

/// The seed stream of an objective's loader (independent samplers from one `train.seed`).
fn stream(obj: Objective) -> u64 {
    match obj {
        Objective::Forget => 1,
        Objective::Retain => 2,
    }
}

pub struct Trainer {
    cfg: RunConfig,
    comm: Comm,
    kind: Kind,
    device: Device,
    student: Net,
    /// The EMA teacher's model, for methods whose spec asks for one.
    teacher: Option<Net>,
    /// The method's frozen side model (IT's small teacher).
    frozen: Option<Frozen>,
    layout: FlatLayout,
    shard_rank: usize,
    /// This rank's fp32 master shard of the trainable weights.
    master: Tensor,
    optim: Box<dyn Optimizer>,
    method: Box<dyn Method>,
    spec: Spec,
    schedule: Schedule,
    /// In the order every micro-step runs them (the spec's).
    objectives: Vec<ObjectiveState>,
    /// One per objective (`Gradients::Separate`) or one for all (`WeightedSum`).
    accs: Vec<Accumulator>,
    /// Per objective, ‖g‖² of its unreduced gradients this step (two-objective weighted sums).
    local_sq: Vec<Option<Tensor>>,
    reduce_dtype: Kind,
    /// Collective calls and bytes per step, when counted.
    tally: Option<std::rc::Rc<Tally>>,
    layer_wise: bool,
    pad_id: i64,
    raw_config: Value,
    step: u64,
    /// Consecutive steps skipped for non-finite values.
    skipped_in_a_row: u64,
}

impl Trainer {
    /// Load the model, lay out and shard its trainable weights, build the method and the data,
    /// and run the method's one-off passes. `device` is this rank's, resolved by the caller.
    pub fn new(cfg: &RunConfig, comm: Comm, device: Device) -> Result<Self> {
        let (comm, tally) = match std::env::var("UNLEARN_COUNT_COLLECTIVES").is_ok_and(|v| v == "1") {
            true => {
                let (c, t) = Counted::wrap(comm);
                (c, Some(t))
            }
            false => (comm, None),
        };
        let kind = cfg.model.dtype.kind();
        let (rank, world) = (comm.rank(), comm.world());
        layout::check_batch_split(cfg.train.batch_size, world, "config")?;
        let zero = cfg.dist.zero;
        let layer_wise = layout::layer_wise(cfg.train.recompute, zero);
        if zero == 3 && !cfg.train.recompute && rank == 0 {
            tracing::info!("dist.zero = 3 gathers weights per layer, so layers are recomputed in backward");
        }

        // Tokenizer and prompt template first: a bad template stops the run before the weights load.
        let student_cfg = crate::model::Config::from_model_dir(&cfg.model.path)?;
        let tok = Tokenizer::from_model_dir(&cfg.model.path, &student_cfg)?;
        let template = Template::load(cfg.data.template, &cfg.model.path, &tok)?;
        let frozen = Frozen::load(cfg.method.spec().frozen_model.as_ref(), &cfg.model.path, &student_cfg, &tok, kind, device)?;
        let mut loaded = load_model(&cfg.model.path, kind, device)?;
        let specs = param_specs(&loaded.config);
        let layout = layout::flat_layout(&layout::trainable_specs(&specs, cfg.model.trainable), zero, world, cfg.dist.bucket_mb);
        let shard_rank = if layout.shards == 1 { 0 } else { rank };

        let mut model = loaded.model;
        let full = params::flatten_and_bind(&mut model, &layout, kind, true);
        // fp32 compute with one shard: the compute replica *is* the master (one copy of the weights,
        // nothing to copy back after a step), as in a plain PyTorch loop. Otherwise the fp32 master
        // comes from the checkpoint's own values, not from the compute-dtype copy: a bf16 run keeps
        // the full precision of an fp32/fp16 checkpoint in its master weights.
        let replicas_are_shards = kind == Kind::Float && layout.shards == 1 && zero < 3;
        let master =
            if replicas_are_shards { full.shallow_clone() } else { params::master_shard(&cfg.model.path, &layout, shard_rank, device)? };
        let mut student = if replicas_are_shards {
            Net::new(model, Residency::Shard(full))
        } else if zero < 3 {
            Net::new(model, Residency::Replica(full))
        } else {
            drop(full);
            for l in layout.layers() {
                params::release(&mut model, &layout, l);
            }
            Net::new(model, Residency::Gathered)
        };

        let spec = cfg.method.spec();
        let method = cfg.method.build(&master, cfg.optim.lr)?;
        let optim = optim::build(&cfg.optim, &master);
        let schedule = Schedule::new(&cfg.optim, cfg.train.steps);
        let teacher = match spec.teacher() {
            true => {
                let own_shard = method.teacher_shard().filter(|_| replicas_are_shards);
                Some(teacher_net(&mut student, cfg.dist.teacher, own_shard, &layout, &*comm, &master, kind, device)?)
            }
            false => None,
        };

        let reduce_at = reduce_at(cfg, &loaded.config, world, device, rank == 0)?;
        let mut objectives = vec![];
        let mut accs = vec![];
        for obj in spec.objectives() {
            let examples = load_examples(&cfg.data.source(obj, cfg.train.max_len), &tok, &template)?;
            let loader = Loader::new(examples, cfg.data.sampling, cfg.train.seed, stream(obj));
            let (acc, weight) = match spec.gradients {
                Gradients::Separate => (accs.len(), 1.0),
                Gradients::WeightedSum { forget, retain } => (0, if obj == Objective::Forget { forget } else { retain }),
            };
            if acc == accs.len() {
                accs.push(Accumulator::new(&layout, reduce_at, device));
            }
            objectives.push(ObjectiveState { obj, loader, acc, weight });
        }
        // Per-objective local norms only where the reduced ones do not exist.
        let estimate = matches!(spec.gradients, Gradients::WeightedSum { .. }) && objectives.len() > 1;
        let local_sq = objectives.iter().map(|_| estimate.then(|| Tensor::zeros([], (Kind::Double, device)))).collect();
        check_same_data(&*comm, cfg, &objectives)?;
        if rank == 0 {
            let n = |o: Objective| objectives.iter().find(|s| s.obj == o).map_or(0, |s| s.loader.len());
            tracing::info!(
                "{}: {} trainable parameters in {} buckets, {} shard(s) of {}; forget {} / retain {} examples; {world} rank(s) ({})",
                cfg.method.name(),
                layout.params.iter().map(|p| p.numel).sum::<i64>(),
                layout.buckets.len(),
                layout.shards,
                layout.shard_len(),
                n(Objective::Forget),
                n(Objective::Retain),
                comm.backend()
            );
        }

        let mut trainer = Trainer {
            accs,
            local_sq,
            reduce_dtype: if world > 1 { cfg.dist.reduce_dtype.kind() } else { Kind::Float },
            tally,
            pad_id: tok.pad_id(),
            raw_config: loaded.raw_config.take(),
            cfg: cfg.clone(),
            comm,
            kind,
            device,
            student,
            teacher,
            frozen,
            layout,
            shard_rank,
            master,
            optim,
            method,
            spec,
            schedule,
            objectives,
            layer_wise,
            step: 0,
            skipped_in_a_row: 0,
        };
        trainer.prepare_method()?;
        Ok(trainer)
    }

    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// Optimizer steps taken (restored ones included).
    pub fn step(&self) -> u64 {
        self.step
    }

    fn is_main(&self) -> bool {
        self.comm.rank() == 0
    }

    /// The method's one-off passes (NPO's reference log-likelihoods) through [`passes::Runner`].
    fn prepare_method(&mut self) -> Result<()> {
        let mut runner = passes::Runner {
            student: &mut self.student,
            layout: &self.layout,
            comm: &*self.comm,
            master: &self.master,
            kind: self.kind,
            device: self.device,
            pad_id: self.pad_id,
            objectives: &self.objectives,
            rows_per_rank: self.cfg.train.batch_size / self.comm.world(),
        };
        self.method.prepare(&mut runner)
    }

    fn objective_mut(&mut self, obj: Objective) -> &mut ObjectiveState {
        self.objectives.iter_mut().find(|s| s.obj == obj).expect("state for every objective of the spec")
    }

    fn draw(&mut self, obj: Objective) -> LocalBatch {
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let (batch_size, pad_id, device) = (self.cfg.train.batch_size, self.pad_id, self.device);
        let loader = &mut self.objective_mut(obj).loader;
        let idx = loader.next_indices(batch_size);
        local_batch(loader.examples(), &idx, rank, world, pad_id, device)
    }

    /// Forward/backward of one objective on one micro-batch into its accumulator. `last`: no later
    /// pass of this step adds to that accumulator, so its buckets are reduced as they complete.
    /// Returns this rank's share of the logged loss value.
    fn accumulate(&mut self, k: usize, batch: &LocalBatch, last: bool) -> Result<f64> {
        let obj = self.objectives[k].obj;
        let mut aux = Aux::default();
        if self.spec.teacher_on == Some(obj) {
            let teacher = self.teacher.as_mut().expect("teacher model");
            let shard = self.method.teacher_shard().expect("teacher shard");
            let (model, mut w) = teacher.pass(&*self.comm, shard, self.kind);
            aux.teacher_logits = Some(forward_logits(model, &self.layout, &mut w, &batch.batch)?);
        }
        if let Some(frozen) = self.frozen.as_mut().filter(|f| f.on == obj) {
            aux.frozen_logits = Some(frozen.logits(&self.layout, &batch.batch)?);
        }
        let accum = self.cfg.train.grad_accum as f64;
        let weight = self.objectives[k].weight;
        let step = self.step + 1;
        fault::check(Fault::Backward, step, "forward/backward")?;
        let poison = fault::active(Fault::NonFinite, step);
        let mut value = 0.0;
        let method = &mut self.method;
        let mut loss_fn = |logits: &Tensor| -> Result<Tensor> {
            let mut out = method.loss(obj, logits, batch, &aux)?;
            if poison {
                out.loss *= f64::NAN;
                out.value = f64::NAN;
            }
            value = out.value;
            let loss = out.loss / accum;
            // The weighted sum is accumulated by scaling each loss before backward.
            Ok(if weight == 1.0 { loss } else { loss * weight })
        };
        let mut sink = Sink {
            acc: &mut self.accs[self.objectives[k].acc],
            layout: &self.layout,
            comm: &*self.comm,
            last,
            dtype: self.reduce_dtype,
            blocking: !self.cfg.dist.overlap,
            sq_norm: self.local_sq[k].as_mut(),
        };
        let (model, mut w) = self.student.pass(&*self.comm, &self.master, self.kind);
        forward_backward(model, &self.layout, &mut w, self.layer_wise, &batch.batch, &mut loss_fn, &mut sink)?;
        Ok(value)
    }

    /// Copy the master shard into the student's replica and the teacher shard into the
    /// teacher's (all-gathers when sharded; nothing for gathered weights). With `dist.overlap`
    /// the gathers are started here and the next step's forward waits for each layer's just
    /// before it runs; they are issued in the order that forward reads them (the teacher's first
    /// when the step's first pass begins with the teacher forward).
    fn sync_replicas(&mut self) -> Result<()> {
        let overlap = self.cfg.dist.overlap;
        let teacher_first = self.spec.teacher_on.is_some() && self.spec.teacher_on == self.objectives.first().map(|o| o.obj);
        let sync_teacher = |tr: &mut Trainer| match (tr.teacher.as_mut(), tr.method.teacher_shard()) {
            (Some(teacher), Some(shard)) => teacher.sync(&tr.layout, &*tr.comm, shard, overlap),
            _ => Ok(()),
        };
        if teacher_first {
            sync_teacher(self)?;
        }
        self.student.sync(&self.layout, &*self.comm, &self.master, overlap)?;
        if !teacher_first {
            sync_teacher(self)?;
        }
        Ok(())
    }

    /// Wait for every replica gather still in flight: before the shards they read are written
    /// (update, teacher EMA, AutoLR probe points, restores), and wherever a run may end (a
    /// checkpoint, which a stop writes; a model directory, which the end of a run writes), so
    /// that no collective is left in flight.
    fn settle_replicas(&mut self) -> Result<()> {
        self.student.settle()?;
        self.teacher.as_mut().map_or(Ok(()), Net::settle)
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepLog> {
        let t0 = Instant::now();
        crate::dist::take_blocked_seconds();
        let step = self.step + 1;
        watchdog::set_step(step);
        let objectives = self.spec.objectives();
        for acc in &mut self.accs {
            acc.zero_();
        }
        for sq in self.local_sq.iter_mut().flatten() {
            let _ = sq.zero_();
        }
        let accum = self.cfg.train.grad_accum;
        // The last pass that reaches each accumulator in the step.
        let last_pass: Vec<usize> = (0..self.accs.len())
            .map(|a| self.objectives.iter().rposition(|o| o.acc == a).expect("every accumulator has an objective"))
            .collect();
        let mut losses = [0.0f64; 2];
        let mut tokens = 0i64;
        for micro in 0..accum {
            for k in 0..self.objectives.len() {
                let obj = self.objectives[k].obj;
                let batch = self.draw(obj);
                tokens += batch.global.targets;
                let last = micro + 1 == accum && last_pass[self.objectives[k].acc] == k;
                let v = self.accumulate(k, &batch, last)?;
                losses[obj as usize] += v / accum as f64;
            }
        }

        // The update writes the shards the replicas' post-update gathers read: none may be in
        // flight (every pass of the step has waited for them, so this costs nothing).
        self.settle_replicas()?;
        // The only wait for the gradient reductions.
        let (comm, layout, dtype) = (&*self.comm, &self.layout, self.reduce_dtype);
        let shards: Vec<Tensor> = self.accs.iter_mut().map(|a| a.finish(layout, comm, dtype)).collect::<Result<_>>()?;

        let uses = |o: Objective| objectives.contains(&o);
        for o in objectives.iter().filter(|o| !losses[**o as usize].is_finite()) {
            // Every rank logs its warnings (the log prefixes the rank), so this names the rank at fault.
            tracing::warn!("step {step}: this rank's {} loss is {}", o.name(), losses[*o as usize]);
        }
        // The step's agreement, one all-reduce for every scalar of the step: the logged losses
        // (per-rank shares of global means), this rank's stop request (a signal), the local
        // squared norms, and the shard-local sums of the reduced gradients' squares. Under one
        // shard every rank holds the whole reduced gradient: rank 0's sums stand for all. A
        // non-finite value on any rank stays non-finite in the sum and a stop request on any
        // rank is seen by all, so every rank skips or stops in this same step.
        let dot = crate::dist::zero::dot;
        let owner = layout.shards > 1 || self.comm.rank() == 0;
        let mine = |v: f64| if owner { v } else { 0.0 };
        let mut local = [0.0f64; 2];
        for (st, sq) in self.objectives.iter().zip(&self.local_sq) {
            if let Some(sq) = sq {
                local[st.obj as usize] = if st.weight != 0.0 { sq.double_value(&[]) / (st.weight * st.weight) } else { f64::NAN };
            }
        }
        let grad_sq: Vec<f64> = match self.spec.gradients {
            Gradients::Separate => {
                let of = |o: Objective| self.objectives.iter().find(|s| s.obj == o).map(|s| &shards[s.acc]);
                let (f, r) = (of(Objective::Forget), of(Objective::Retain));
                let cross = match (f, r) {
                    (Some(a), Some(b)) => dot(a, b),
                    _ => 0.0,
                };
                vec![f.map_or(0.0, |g| dot(g, g)), r.map_or(0.0, |g| dot(g, g)), cross]
            }
            Gradients::WeightedSum { .. } => vec![dot(&shards[0], &shards[0])],
        };
        let stop = crate::signals::requested().map_or(0.0, |_| 1.0);
        let mut scalars: Vec<f64> =
            [losses[0], losses[1], stop].iter().chain(&local).copied().chain(grad_sq.iter().map(|&v| mine(v))).collect();
        fault::hang_if(Fault::Hang, step);
        {
            let _g = watchdog::enter("the step's losses and stop requests");
            self.comm.all_reduce_f64(&mut scalars)?;
        }
        let (losses, stop_requested) = ([scalars[0], scalars[1]], scalars[2] > 0.0);
        let local = [scalars[3], scalars[4]];
        let sq = &scalars[5..];

        let mut log = StepLog {
            step,
            loss_forget: uses(Objective::Forget).then_some(losses[0]),
            loss_retain: uses(Objective::Retain).then_some(losses[1]),
            grad_norm_forget: None,
            grad_norm_retain: None,
            grad_norm: None,
            grad_norm_forget_local: None,
            grad_norm_retain_local: None,
            lr: 0.0,
            clip: 1.0,
            tokens_per_s: 0.0,
            elapsed_s: 0.0,
            comm_wait_s: 0.0,
            autolr: None,
            collectives: None,
            skipped: false,
            stop_requested,
        };
        if let Some(o) = objectives.iter().find(|o| !losses[**o as usize].is_finite()) {
            return self.skip_step(log, format!("the {} loss is {}", o.name(), losses[*o as usize]), tokens, t0);
        }
        if sq.iter().any(|v| !v.is_finite()) {
            let norms = match self.spec.gradients {
                Gradients::Separate => format!("‖g_F‖² {}, ‖g_R‖² {}, ⟨g_F, g_R⟩ {}", sq[0], sq[1], sq[2]),
                Gradients::WeightedSum { .. } => format!("‖g‖² {}", sq[0]),
            };
            return self.skip_step(log, format!("the gradient norms are not finite ({norms})"), tokens, t0);
        }
        self.skipped_in_a_row = 0;

        let reduced = match self.spec.gradients {
            Gradients::Separate => {
                let stats = GradStats { sq_forget: sq[0], sq_retain: sq[1], dot: sq[2] };
                log.grad_norm_forget = uses(Objective::Forget).then(|| stats.sq_forget.sqrt());
                log.grad_norm_retain = uses(Objective::Retain).then(|| stats.sq_retain.sqrt());
                let of = |o: Objective| self.objectives.iter().find(|s| s.obj == o).map(|s| &shards[s.acc]);
                Reduced::Separate { forget: of(Objective::Forget), retain: of(Objective::Retain), stats }
            }
            Gradients::WeightedSum { .. } => {
                if let [only] = &self.objectives[..] {
                    // One objective: the sum is its gradient, scaled by its weight.
                    let norm = Some(sq[0].sqrt() / only.weight.abs());
                    match only.obj {
                        Objective::Forget => log.grad_norm_forget = norm,
                        Objective::Retain => log.grad_norm_retain = norm,
                    }
                } else {
                    log.grad_norm = Some(sq[0].sqrt());
                    log.grad_norm_forget_local = uses(Objective::Forget).then(|| local[0].sqrt());
                    log.grad_norm_retain_local = uses(Objective::Retain).then(|| local[1].sqrt());
                }
                Reduced::Sum { g: &shards[0], sq: sq[0] }
            }
        };
        let (loss_forget, loss_retain) = (losses[Objective::Forget as usize], losses[Objective::Retain as usize]);
        let mut dir = self.method.direction(&Grads { reduced, loss_forget, loss_retain, params: &self.master })?;
        if self.cfg.optim.clip_norm > 0.0 {
            let mut n = [dot(&dir.d, &dir.d)];
            if layout.shards > 1 {
                self.comm.all_reduce_f64(&mut n)?;
            }
            let c = optim::clip_coef(self.cfg.optim.clip_norm, n[0].sqrt());
            if c < 1.0 {
                dir.d = &dir.d * c;
                dir.clip *= c;
            }
        }
        drop(shards);

        // Learning rate: AutoLR owns it when enabled, else the schedule.
        let lr = if let Some(auto) = self.method.autolr() {
            if auto.due(step) {
                log.autolr = Some(self.autolr_probe(&dir.d)?);
            }
            self.method.autolr().expect("autolr").lr
        } else {
            self.schedule.lr(step)
        };
        tch::no_grad(|| self.optim.step(&mut self.master, &dir.d, lr))?;
        self.method.after_step(&self.master, &dir)?;
        self.sync_replicas()?;
        self.step = step;
        if self.cfg.dist.verify_every > 0 && step.is_multiple_of(self.cfg.dist.verify_every) {
            self.fault_injection_perturb(step);
            self.verify_replicas()?;
        }
        log.lr = lr;
        log.clip = dir.clip;
        Ok(self.close_log(log, tokens, t0))
    }

    /// The step's timing and communication figures, filled in as it ends.
    fn close_log(&self, mut log: StepLog, tokens: i64, t0: Instant) -> StepLog {
        let elapsed = t0.elapsed().as_secs_f64();
        log.tokens_per_s = tokens as f64 / elapsed.max(1e-9);
        log.elapsed_s = elapsed;
        log.comm_wait_s = crate::dist::take_blocked_seconds();
        log.collectives = self.tally.as_ref().map(|t| t.take());
        log
    }

    /// A step whose loss or gradient norm is not finite (on every rank alike): nothing is updated
    /// (weights, optimizer, teacher, AutoLR), the data it drew stays consumed, and the step counts.
    /// Too many in a row stop the run, before anything of them reaches a checkpoint.
    fn skip_step(&mut self, mut log: StepLog, why: String, tokens: i64, t0: Instant) -> Result<StepLog> {
        let step = log.step;
        self.skipped_in_a_row += 1;
        let max = self.cfg.train.max_skipped_steps;
        if self.skipped_in_a_row > max {
            return Err(crate::Error::NonFinite {
                step,
                msg: format!(
                    "{why}; {} step(s) in a row were not finite (train.max_skipped_steps = {max}), so the run stops; \
                     no update of these steps was applied, so the latest checkpoint holds the last good state",
                    self.skipped_in_a_row
                ),
            });
        }
        if self.is_main() {
            tracing::warn!("step {step}: {why}; step skipped without an update ({} in a row, at most {max})", self.skipped_in_a_row);
        }
        self.step = step;
        log.lr = match self.method.autolr() {
            Some(a) => a.lr,
            None => self.schedule.lr(step),
        };
        log.clip = 0.0;
        log.skipped = true;
        Ok(self.close_log(log, tokens, t0))
    }

    /// GeN probe (see methods::autolr): three forwards on a fresh retain batch around the
    /// optimizer's step, then the parabola fit updates the rate. The probes run in fp32 on the
    /// master weights themselves (gathered layer by layer), not on the compute-dtype replica: a
    /// probe step at lr 1e-5 is about 0.1 ulp of a bf16 weight of 0.02, so on the replica the
    /// three losses would be quantisation noise.
    fn autolr_probe(&mut self, d: &Tensor) -> Result<methods::autolr::Fit> {
        let lr = self.method.autolr().expect("autolr").lr;
        let w_t = self.master.copy();
        tch::no_grad(|| self.optim.step(&mut self.master, d, lr))?; // the probe step (state updated: GeN quirk)
        let delta = &self.master - &w_t;
        let batches: Vec<LocalBatch> = (0..self.cfg.train.grad_accum).map(|_| self.draw(Objective::Retain)).collect();
        let mut model = net::probe_model(self.student.ready()?, &self.layout);
        let mut at = |tr: &mut Trainer, r: f64| -> Result<f64> {
            tch::no_grad(|| tr.master.copy_(&(&w_t + &delta * r)));
            let mut w = Weights::Gathered { comm: &*tr.comm, shard: &tr.master, kind: Kind::Float };
            let mut total = 0.0;
            for b in &batches {
                let logits = forward_logits(&mut model, &tr.layout, &mut w, &b.batch)?;
                total += methods::batch_nll(&logits, b).double_value(&[]);
            }
            let mut v = [total / batches.len() as f64];
            tr.comm.all_reduce_f64(&mut v)?;
            Ok(v[0])
        };
        let l_minus = at(self, -1.0)?; // w + ηd
        let l_plus = at(self, 1.0)?; // w − ηd
        let l_zero = at(self, 0.0)?;
        tch::no_grad(|| self.master.copy_(&w_t));
        Ok(self.method.autolr().expect("autolr").update(l_minus, l_zero, l_plus))
    }

    /// What a checkpoint holds, borrowed from the trainer, and the communicator to write it with
    /// (no gather in flight: a restore writes the master they read, and a checkpoint is where a
    /// stopped run leaves off).
    fn checkpoint_parts(&mut self) -> Result<(crate::checkpoint::Parts<'_>, &dyn Collective)> {
        self.settle_replicas()?;
        let parts = crate::checkpoint::Parts {
            step: self.step,
            method_name: self.cfg.method.name(),
            layout: &self.layout,
            shard: self.shard_rank,
            master: &mut self.master,
            optim: &mut *self.optim,
            method: &mut *self.method,
            loaders: self.objectives.iter_mut().map(|s| (s.obj, &mut s.loader)).collect(),
        };
        Ok((parts, &*self.comm))
    }

    /// Write a checkpoint of the current step under `root` (collective), keeping the last `keep`,
    /// with the run's `attached` state (the in-run evaluation's history).
    pub fn save_checkpoint(&mut self, root: &Path, keep: usize, attached: &Attached) -> Result<PathBuf> {
        let (mut parts, comm) = self.checkpoint_parts()?;
        crate::checkpoint::save(root, &mut parts, attached, comm, keep)
    }

    /// Continue from a checkpoint written at any world size; returns the state attached to it.
    pub fn restore(&mut self, dir: &Path) -> Result<Attached> {
        let (mut parts, _) = self.checkpoint_parts()?;
        let (step, attached) = crate::checkpoint::restore(dir, &mut parts)?;
        self.step = step;
        self.sync_replicas()?;
        Ok(attached)
    }
}

/// When this run reduces its gradients (`dist.reduce`): once per step unless the layout keeps
/// only shards (ZeRO-2/3) and the config asks for every micro-batch, or leaves it to the memory
/// plan (`auto`: once per step when the plan with a full fp32 gradient buffer fits this rank's
/// memory).
fn reduce_at(cfg: &RunConfig, model: &crate::model::Config, world: usize, device: Device, log: bool) -> Result<ReduceAt> {
    if cfg.dist.zero < 2 || world == 1 {
        return Ok(ReduceAt::Step);
    }
    match cfg.dist.reduce {
        ReduceMode::Step => Ok(ReduceAt::Step),
        ReduceMode::MicroBatch => Ok(ReduceAt::MicroBatch),
        ReduceMode::Auto => {
            let plan_device = if device.is_cuda() { crate::plan::Device::Cuda } else { crate::plan::Device::Cpu };
            let (budget, baseline) = crate::plan::run_budget(plan_device, device);
            let input = crate::plan::PlanInput::from_run_config(cfg, model.clone(), String::new(), world, plan_device, budget, baseline)?;
            let plan = crate::plan::estimate(&input);
            if log {
                tracing::info!("dist.reduce = auto: {}", plan.reduce_note);
            }
            Ok(if plan.reduce == ReduceMode::Step { ReduceAt::Step } else { ReduceAt::MicroBatch })
        }
    }
}

/// Read, limit and tokenize the records of one objective's data files.
fn load_examples(src: &DataSource, tok: &Tokenizer, template: &Template) -> Result<Vec<Example>> {
    let mut records: Vec<Record> = vec![];
    for p in src.paths {
        records.extend(read_records(p)?);
    }
    if let Some(n) = src.limit {
        records.truncate(n);
    }
    let first = src.paths[0].display();
    let ex = tokenize_all(tok, template, &records, src.max_len, src.overflow).map_err(|e| crate::other!("{first}: {e}"))?;
    if ex.is_empty() {
        return Err(crate::other!("{first}: no usable examples after tokenization"));
    }
    Ok(ex)
}

/// Every rank must train on the same data: a rank given other files (another node's copy, a path
/// through a variable set differently) would silently train another model. The examples as read
/// and tokenized are hashed and compared across ranks once, at start-up (one small all-reduce).
fn check_same_data(comm: &dyn Collective, cfg: &RunConfig, objectives: &[ObjectiveState]) -> Result<()> {
    use std::hash::{Hash, Hasher};
    if comm.world() == 1 {
        return Ok(());
    }
    let hashes: Vec<u64> = objectives
        .iter()
        .map(|st| {
            // SipHash with fixed keys: the same on every rank of one binary.
            let mut h = std::hash::DefaultHasher::new();
            for ex in st.loader.examples() {
                ex.ids.hash(&mut h);
                ex.n_context.hash(&mut h);
            }
            h.finish()
        })
        .collect();
    // Max of (hi, lo, -hi, -lo) over ranks: max == -min for both halves iff every rank agrees
    // (32-bit halves are exact in f64).
    let mut v: Vec<f64> = hashes.iter().flat_map(|h| [(h >> 32) as f64, (h & 0xffff_ffff) as f64]).collect();
    v.extend(v.clone().iter().map(|x| -x));
    comm.all_reduce_max_f64(&mut v)?;
    let half = v.len() / 2;
    for (i, st) in objectives.iter().enumerate() {
        if v[2 * i] != -v[half + 2 * i] || v[2 * i + 1] != -v[half + 2 * i + 1] {
            let key = match st.obj {
                Objective::Forget => "data.forget",
                Objective::Retain => "data.retain",
            };
            let files =
                cfg.data.source(st.obj, cfg.train.max_len).paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(crate::input!(
                "{key} ({files}) differs between ranks ({} examples on this rank, content hash {:016x}); every rank must read the same \
                 files (a shared filesystem, or identical copies on every node)",
                st.loader.len(),
                hashes[i]
            ));
        }
    }
    Ok(())
}

/// Append one JSON line to metrics.jsonl (rank 0).
pub fn append_metrics(path: &Path, log: &impl Serialize) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| crate::Error::io(path, e))?;
    writeln!(f, "{}", serde_json::to_string(log).expect("metrics serialize")).map_err(|e| crate::Error::io(path, e))
}

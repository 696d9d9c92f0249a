//! The trainer: the one place where model, method and distribution meet.
//!
//! One optimizer step (see ARCHITECTURE.md):
//! 1. every rank draws the same global micro-batches and takes its slice;
//! 2. for each objective the method uses (forget, retain) the student runs forward/backward and the
//!    gradients land in that objective's own accumulator — forget and retain gradients are never
//!    mixed, because NGDiff needs their separate global norms and mean teacher clips their sum;
//! 3. accumulators are reduced over ranks (all-reduce, or reduce-scatter under ZeRO ≥ 2);
//! 4. one all-reduce of [‖g_F‖², ‖g_R‖², ⟨g_F,g_R⟩] over shards gives every rank the same scalars;
//! 5. the method combines the shards into a direction; AutoLR may probe; the optimizer updates
//!    this rank's fp32 master shard; the method's after-step hook runs (teacher EMA);
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

use crate::config::{DataSource, RunConfig};
use crate::data::loader::{local_batch, LocalBatch, Loader};
use crate::data::{read_records, tokenize_all, Example, Record, Template, Tokenizer};
use crate::dist::zero::FlatLayout;
use crate::dist::{watchdog, Collective, Comm};
use crate::fault::{self, Fault};
use crate::methods::{self, Aux, GradStats, Grads, Method, Objective, Spec};
use crate::model::{load_model, param_specs};
use crate::optim::{self, Optimizer, Schedule};
use crate::Result;
use backward::{forward_backward, forward_logits};
use frozen::Frozen;
use net::{teacher_net, Net, Residency};
use sink::{Accumulator, Sink};

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub loss_forget: Option<f64>,
    pub loss_retain: Option<f64>,
    pub grad_norm_forget: Option<f64>,
    pub grad_norm_retain: Option<f64>,
    pub lr: f64,
    pub clip: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// Seconds of this step spent in collectives (only with `UNLEARN_COMM_TIMING=1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autolr: Option<methods::autolr::Fit>,
    /// A non-finite loss or gradient norm: no update was applied.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Some rank was asked to stop (a signal) before this step's agreement: every rank sees it.
    #[serde(skip)]
    pub stop_requested: bool,
}

/// One objective's data and gradient accumulator.
struct ObjectiveState {
    obj: Objective,
    loader: Loader,
    acc: Accumulator,
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
        let student = if replicas_are_shards {
            Net { model, residency: Residency::Shard(full) }
        } else if zero < 3 {
            Net { model, residency: Residency::Replica(full) }
        } else {
            drop(full);
            for l in layout.layers() {
                params::release(&mut model, &layout, l);
            }
            Net { model, residency: Residency::Gathered }
        };

        let spec = cfg.method.spec();
        let method = cfg.method.build(&master, cfg.optim.lr)?;
        let optim = optim::build(&cfg.optim, &master);
        let schedule = Schedule::new(&cfg.optim, cfg.train.steps);
        let teacher = match spec.teacher() {
            true => {
                let own_shard = method.teacher_shard().filter(|_| replicas_are_shards);
                Some(teacher_net(&student, cfg.dist.teacher, own_shard, &layout, &*comm, &master, kind, device)?)
            }
            false => None,
        };

        let mut objectives = vec![];
        for obj in spec.objectives() {
            let examples = load_examples(&cfg.data.source(obj, cfg.train.max_len), &tok, &template)?;
            let loader = Loader::new(examples, cfg.data.sampling, cfg.train.seed, stream(obj));
            objectives.push(ObjectiveState { obj, loader, acc: Accumulator::new(&layout, zero >= 2, device) });
        }
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

    /// Forward/backward of one objective on one micro-batch into its accumulator.
    /// Returns this rank's share of the logged loss value.
    fn accumulate(&mut self, obj: Objective, batch: &LocalBatch) -> Result<f64> {
        let mut aux = Aux::default();
        if self.spec.teacher_on == Some(obj) {
            let teacher = self.teacher.as_mut().expect("teacher model");
            let shard = self.method.teacher_shard().expect("teacher shard");
            let w = teacher.weights(&*self.comm, shard, self.kind);
            aux.teacher_logits = Some(forward_logits(&mut teacher.model, &self.layout, &w, &batch.batch)?);
        }
        if let Some(frozen) = self.frozen.as_mut().filter(|f| f.on == obj) {
            aux.frozen_logits = Some(frozen.logits(&self.layout, &batch.batch)?);
        }
        let accum = self.cfg.train.grad_accum as f64;
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
            Ok(out.loss / accum)
        };
        let acc = &mut self.objectives.iter_mut().find(|s| s.obj == obj).expect("state for every objective of the spec").acc;
        let mut sink = Sink { acc, layout: &self.layout, comm: &*self.comm };
        let w = self.student.weights(&*self.comm, &self.master, self.kind);
        forward_backward(&mut self.student.model, &self.layout, &w, self.layer_wise, &batch.batch, &mut loss_fn, &mut sink)?;
        Ok(value)
    }

    /// Copy the master shard into the student's replica and the teacher shard into the
    /// teacher's (all-gathers when sharded; nothing for gathered weights).
    fn sync_replicas(&mut self) -> Result<()> {
        self.student.sync(&self.layout, &*self.comm, &self.master)?;
        if let (Some(teacher), Some(shard)) = (self.teacher.as_mut(), self.method.teacher_shard()) {
            teacher.sync(&self.layout, &*self.comm, shard)?;
        }
        Ok(())
    }

    /// Global token-mean retain NLL of a global batch at the current student weights (AutoLR probe).
    fn probe_loss(&mut self, batches: &[LocalBatch]) -> Result<f64> {
        let mut total = 0.0;
        for b in batches {
            let w = self.student.weights(&*self.comm, &self.master, self.kind);
            let logits = forward_logits(&mut self.student.model, &self.layout, &w, &b.batch)?;
            total += methods::batch_nll(&logits, b).double_value(&[]);
        }
        let mut v = [total / batches.len() as f64];
        self.comm.all_reduce_f64(&mut v)?;
        Ok(v[0])
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepLog> {
        let t0 = Instant::now();
        let step = self.step + 1;
        watchdog::set_step(step);
        let objectives = self.spec.objectives();
        for st in &mut self.objectives {
            st.acc.zero_();
        }
        let mut losses = [0.0f64; 2];
        let mut tokens = 0i64;
        for _ in 0..self.cfg.train.grad_accum {
            for &obj in &objectives {
                let batch = self.draw(obj);
                tokens += batch.global.targets;
                let v = self.accumulate(obj, &batch)?;
                losses[obj as usize] += v / self.cfg.train.grad_accum as f64;
            }
        }
        let uses = |o: Objective| objectives.contains(&o);
        for o in objectives.iter().filter(|o| !losses[**o as usize].is_finite()) {
            // Every rank logs its warnings (the log prefixes the rank), so this names the rank at fault.
            tracing::warn!("step {step}: this rank's {} loss is {}", o.name(), losses[*o as usize]);
        }
        // Logged values are per-rank shares of global means: one all-reduce sums them, and with
        // them each rank's stop request (a signal), so that every rank learns in this same step
        // of a non-finite value (it stays non-finite in the sum) or a stop request on any rank.
        fault::hang_if(Fault::Hang, step);
        let mut agreed = [losses[0], losses[1], crate::signals::requested().map_or(0.0, |_| 1.0)];
        {
            let _g = watchdog::enter("the step's losses and stop requests");
            self.comm.all_reduce_f64(&mut agreed)?;
        }
        let (losses, stop_requested) = ([agreed[0], agreed[1]], agreed[2] > 0.0);
        let skip = |tr: &mut Trainer, why: String| tr.skip_step(step, why, losses, stop_requested, tokens, t0);
        if let Some(o) = objectives.iter().find(|o| !losses[**o as usize].is_finite()) {
            return skip(self, format!("the {} loss is {}", o.name(), losses[*o as usize]));
        }

        let (g_f, g_r, sq) = self.reduced_gradients()?;
        if sq.iter().any(|v| !v.is_finite()) {
            return skip(self, format!("the gradient norms are not finite (‖g_F‖² {}, ‖g_R‖² {}, ⟨g_F, g_R⟩ {})", sq[0], sq[1], sq[2]));
        }
        self.skipped_in_a_row = 0;
        let (comm, layout) = (&*self.comm, &self.layout);
        let dot = crate::dist::zero::dot;
        let stats = GradStats { sq_forget: sq[0], sq_retain: sq[1], dot: sq[2] };
        let (loss_forget, loss_retain) = (losses[Objective::Forget as usize], losses[Objective::Retain as usize]);
        let grads = Grads { forget: g_f.as_ref(), retain: g_r.as_ref(), stats, loss_forget, loss_retain, params: &self.master };
        let mut dir = self.method.direction(&grads)?;
        if self.cfg.optim.clip_norm > 0.0 {
            let mut n = [dot(&dir.d, &dir.d)];
            if layout.shards > 1 {
                comm.all_reduce_f64(&mut n)?;
            }
            let c = optim::clip_coef(self.cfg.optim.clip_norm, n[0].sqrt());
            if c < 1.0 {
                dir.d = &dir.d * c;
                dir.clip *= c;
            }
        }

        // Learning rate: AutoLR owns it when enabled, else the schedule.
        let mut fit = None;
        let lr = if let Some(auto) = self.method.autolr() {
            if auto.due(step) {
                let f = self.autolr_probe(&dir.d)?;
                fit = Some(f);
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
        let elapsed = t0.elapsed().as_secs_f64();
        Ok(StepLog {
            step,
            loss_forget: uses(Objective::Forget).then_some(losses[0]),
            loss_retain: uses(Objective::Retain).then_some(losses[1]),
            grad_norm_forget: uses(Objective::Forget).then(|| stats.sq_forget.sqrt()),
            grad_norm_retain: uses(Objective::Retain).then(|| stats.sq_retain.sqrt()),
            lr,
            clip: dir.clip,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            elapsed_s: elapsed,
            comm_s: self.comm.take_collective_seconds(),
            autolr: fit,
            skipped: false,
            stop_requested,
        })
    }

    /// The reduced gradient shards (forget, retain) and `[‖g_F‖², ‖g_R‖², ⟨g_F, g_R⟩]` over the
    /// whole buffer (one all-reduce of the shard-local sums when sharded). A gradient that is not
    /// finite on any rank is not finite in these sums on every rank.
    fn reduced_gradients(&mut self) -> Result<(Option<Tensor>, Option<Tensor>, [f64; 3])> {
        let (comm, layout, rank) = (&*self.comm, &self.layout, self.shard_rank);
        let (mut g_f, mut g_r) = (None, None);
        for st in &mut self.objectives {
            let g = Some(st.acc.reduced_shard(layout, comm, rank)?);
            match st.obj {
                Objective::Forget => g_f = g,
                Objective::Retain => g_r = g,
            }
        }
        let dot = crate::dist::zero::dot;
        let mut sq = [
            g_f.as_ref().map_or(0.0, |g| dot(g, g)),
            g_r.as_ref().map_or(0.0, |g| dot(g, g)),
            match (&g_f, &g_r) {
                (Some(a), Some(b)) => dot(a, b),
                _ => 0.0,
            },
        ];
        if layout.shards > 1 {
            comm.all_reduce_f64(&mut sq)?;
        }
        Ok((g_f, g_r, sq))
    }

    /// A step whose loss or gradient norm is not finite (on every rank alike): nothing is updated
    /// (weights, optimizer, teacher, AutoLR), the data it drew stays consumed, and the step counts.
    /// Too many in a row stop the run, before anything of them reaches a checkpoint.
    fn skip_step(&mut self, step: u64, why: String, losses: [f64; 2], stop_requested: bool, tokens: i64, t0: Instant) -> Result<StepLog> {
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
        let lr = match self.method.autolr() {
            Some(a) => a.lr,
            None => self.schedule.lr(step),
        };
        let uses = |o: Objective| self.spec.objectives().contains(&o);
        let elapsed = t0.elapsed().as_secs_f64();
        Ok(StepLog {
            step,
            loss_forget: uses(Objective::Forget).then_some(losses[0]),
            loss_retain: uses(Objective::Retain).then_some(losses[1]),
            grad_norm_forget: None,
            grad_norm_retain: None,
            lr,
            clip: 0.0,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            elapsed_s: elapsed,
            autolr: None,
            skipped: true,
            stop_requested,
            comm_s: self.comm.take_collective_seconds(),
        })
    }

    /// GeN probe (see methods::autolr): three forwards on a fresh retain batch around the
    /// optimizer's step, then the parabola fit updates the rate.
    fn autolr_probe(&mut self, d: &Tensor) -> Result<methods::autolr::Fit> {
        let lr = self.method.autolr().expect("autolr").lr;
        let w_t = self.master.copy();
        tch::no_grad(|| self.optim.step(&mut self.master, d, lr))?; // the probe step (state updated: GeN quirk)
        let delta = &self.master - &w_t;
        let batches: Vec<LocalBatch> = (0..self.cfg.train.grad_accum).map(|_| self.draw(Objective::Retain)).collect();
        let at = |tr: &mut Trainer, r: f64| -> Result<f64> {
            tch::no_grad(|| tr.master.copy_(&(&w_t + &delta * r)));
            tr.student.sync(&tr.layout, &*tr.comm, &tr.master)?;
            tr.probe_loss(&batches)
        };
        let l_minus = at(self, -1.0)?; // w + ηd
        let l_plus = at(self, 1.0)?; // w − ηd
        let l_zero = at(self, 0.0)?;
        tch::no_grad(|| self.master.copy_(&w_t));
        Ok(self.method.autolr().expect("autolr").update(l_minus, l_zero, l_plus))
    }

    /// What a checkpoint holds, borrowed from the trainer, and the communicator to write it with.
    fn checkpoint_parts(&mut self) -> (crate::checkpoint::Parts<'_>, &dyn Collective) {
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
        (parts, &*self.comm)
    }

    /// Write a checkpoint of the current step under `root` (collective), keeping the last `keep`.
    pub fn save_checkpoint(&mut self, root: &Path, keep: usize) -> Result<PathBuf> {
        let (mut parts, comm) = self.checkpoint_parts();
        crate::checkpoint::save(root, &mut parts, comm, keep)
    }

    /// Continue from a checkpoint written at any world size.
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let (mut parts, _) = self.checkpoint_parts();
        self.step = crate::checkpoint::restore(dir, &mut parts)?;
        self.sync_replicas()
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
            let files = cfg.data.source(st.obj, cfg.train.max_len).paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
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

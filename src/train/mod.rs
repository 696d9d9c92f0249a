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

pub mod backward;
pub mod params;
pub mod sink;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::config::RunConfig;
use crate::data::loader::{local_batch, LocalBatch, Loader, Sampling};
use crate::data::{read_records, tokenize_all, Example, Overflow, Record, Tokenizer};
use crate::dist::zero::FlatLayout;
use crate::dist::Comm;
use crate::methods::{self, Aux, GradStats, Grads, Method, Objective};
use crate::model::{load_model, param_specs, parse_device, parse_kind, Llama, ParamRole};
use crate::optim::{self, Optimizer, Schedule};
use crate::progress::Progress;
use crate::Result;
use backward::{forward_backward, forward_logits, Weights};
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
}

pub struct Trainer {
    pub cfg: RunConfig,
    comm: Comm,
    kind: Kind,
    device: Device,
    student: Llama,
    teacher: Option<Llama>,
    layout: FlatLayout,
    shard_rank: usize,
    /// Compute-dtype replica of the trainable weights (ZeRO 0–2); `None` under ZeRO-3.
    student_full: Option<Tensor>,
    /// Compute-dtype replica of the teacher (`dist.teacher = "replica"`).
    teacher_full: Option<Tensor>,
    /// This rank's fp32 master shard of the trainable weights.
    master: Tensor,
    optim: Box<dyn Optimizer>,
    method: Box<dyn Method>,
    schedule: Schedule,
    forget: Option<Loader>,
    retain: Option<Loader>,
    /// Σ_t log p_ref per forget example (NPO), from the frozen reference model.
    ref_sums: Option<Vec<f64>>,
    acc_forget: Option<Accumulator>,
    acc_retain: Option<Accumulator>,
    layer_wise: bool,
    /// The compute replicas are the fp32 shards themselves (fp32, one shard): no sync copies.
    replicas_are_shards: bool,
    pad_id: i64,
    raw_config: Value,
    pub step: u64,
}

impl Trainer {
    pub fn new(cfg: RunConfig, comm: Comm) -> Result<Self> {
        let device = crate::dist::rank_device(parse_device(&cfg.model.device)?);
        let kind = parse_kind(&cfg.model.dtype)?;
        let (rank, world) = (comm.rank(), comm.world());
        if cfg.train.batch_size % world != 0 {
            return Err(crate::Error::config(
                "config",
                "train.batch_size",
                format!("{} is not divisible by the number of ranks ({world})", cfg.train.batch_size),
            ));
        }
        let zero = cfg.dist.zero;
        let layer_wise = cfg.train.recompute || zero == 3;
        if zero == 3 && !cfg.train.recompute && rank == 0 {
            tracing::info!("dist.zero = 3 gathers weights per layer, so layers are recomputed in backward");
        }

        let mut loaded = load_model(&cfg.model.path, kind, device)?;
        let tok = Tokenizer::from_model_dir(&cfg.model.path, &loaded.config)?;
        let specs = param_specs(&loaded.config);
        let trainable: Vec<_> =
            specs.iter().filter(|s| cfg.model.trainable == "all" || s.role == ParamRole::Matrix).collect();
        let (shards, shard_rank) = if zero == 0 { (1, 0) } else { (world, rank) };
        let bucket_elems = ((cfg.dist.bucket_mb * 1024.0 * 1024.0) / 4.0).max(1.0) as i64;
        let layout = FlatLayout::new(&trainable, shards, bucket_elems);

        let mut student = loaded.model;
        let full = params::flatten_and_bind(&mut student, &layout, kind, true);
        // fp32 compute with one shard: the compute replica *is* the master (one copy of the weights,
        // nothing to copy back after a step), as in a plain PyTorch loop. Otherwise the fp32 master
        // comes from the checkpoint's own values, not from the compute-dtype copy: a bf16 run keeps
        // the full precision of an fp32/fp16 checkpoint in its master weights.
        let replicas_are_shards = kind == Kind::Float && layout.shards == 1 && zero < 3;
        let master =
            if replicas_are_shards { full.shallow_clone() } else { params::master_shard(&cfg.model.path, &layout, shard_rank, device)? };
        let student_full = if zero < 3 {
            Some(full)
        } else {
            drop(full);
            for l in layout.layers() {
                params::release(&mut student, &layout, l);
            }
            None
        };

        let method = methods::build(&cfg.method, &master, cfg.optim.lr)?;
        let optim = optim::build(&cfg.optim, &master);
        let schedule = Schedule::new(&cfg.optim, cfg.train.steps);

        let teacher_needed = method.objectives().iter().any(|o| method.needs_teacher(*o));
        let (teacher, teacher_full) = if teacher_needed {
            let mut t = student.shallow_copy();
            if cfg.dist.teacher == "replica" {
                let tf = match &student_full {
                    Some(_) if replicas_are_shards => method.teacher_shard().expect("a teacher method keeps a teacher shard").shallow_clone(),
                    Some(f) => f.copy(),
                    None => Tensor::zeros([layout.total], (kind, device)),
                };
                if student_full.is_none() {
                    layout.gather_buckets(&*comm, &master, &mut tf.shallow_clone(), &(0..layout.buckets.len()).collect::<Vec<_>>(), 0)?;
                }
                params::bind(&mut t, &layout, &tf, 0, None, false);
                (Some(t), Some(tf))
            } else {
                for l in layout.layers() {
                    params::release(&mut t, &layout, l);
                }
                (Some(t), None)
            }
        } else {
            (None, None)
        };

        let sampling = if cfg.data.sampling == "replacement" { Sampling::Replacement } else { Sampling::Shuffle };
        let overflow = |s: &str| if s == "chunk" { Overflow::Chunk } else { Overflow::Truncate };
        let uses = |o| method.objectives().contains(&o);
        let forget = if uses(Objective::Forget) {
            let ex = load_examples(&cfg.data.forget, cfg.data.forget_limit, &tok, cfg.train.max_len, overflow(&cfg.data.forget_overflow))?;
            Some(Loader::new(ex, sampling, cfg.train.seed, 1))
        } else {
            None
        };
        let retain = if uses(Objective::Retain) {
            let max_len = cfg.data.retain_max_len.unwrap_or(cfg.train.max_len);
            let ex = load_examples(&cfg.data.retain, cfg.data.retain_limit, &tok, max_len, overflow(&cfg.data.retain_overflow))?;
            Some(Loader::new(ex, sampling, cfg.train.seed, 2))
        } else {
            None
        };
        if rank == 0 {
            let n = |l: &Option<Loader>| l.as_ref().map_or(0, Loader::len);
            tracing::info!(
                "{}: {} trainable parameters in {} buckets, {} shard(s) of {}; forget {} / retain {} examples; {world} rank(s) ({})",
                cfg.method.name,
                layout.params.iter().map(|p| p.numel).sum::<i64>(),
                layout.buckets.len(),
                layout.shards,
                layout.shard_len(),
                n(&forget),
                n(&retain),
                comm.backend()
            );
        }

        let acc = |o: Objective| uses(o).then(|| Accumulator::new(&layout, zero >= 2, device));
        let mut trainer = Trainer {
            acc_forget: acc(Objective::Forget),
            acc_retain: acc(Objective::Retain),
            pad_id: tok.pad_id(),
            raw_config: loaded.raw_config.take(),
            cfg,
            comm,
            kind,
            device,
            student,
            teacher,
            layout,
            shard_rank,
            student_full,
            teacher_full,
            master,
            optim,
            method,
            schedule,
            forget,
            retain,
            ref_sums: None,
            layer_wise,
            replicas_are_shards,
            step: 0,
        };
        if trainer.method.needs_reference() {
            trainer.ref_sums = Some(trainer.reference_sums()?);
        }
        Ok(trainer)
    }

    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    fn is_main(&self) -> bool {
        self.comm.rank() == 0
    }


    /// `Σ_t log p_ref` of every forget example under the reference model (the model as loaded,
    /// or `method.reference_model`), computed once, split over ranks, summed back.
    fn reference_sums(&mut self) -> Result<Vec<f64>> {
        let examples = self.forget.as_ref().expect("NPO has forget data").examples().to_vec();
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let mut sums = vec![0f64; examples.len()];
        let mine: Vec<usize> = (rank..examples.len()).step_by(world).collect();
        let mut reference = match &self.cfg.method.reference_model {
            Some(p) => Some(load_model(p, self.kind, self.device)?.model),
            None => None,
        };
        let bar = Progress::new(mine.len() as u64, "reference");
        // Chunks of the per-rank micro-batch: the memory of one training micro-batch, no more.
        for chunk in mine.chunks((self.cfg.train.batch_size / world).max(1)) {
            let rows: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
            let batch = crate::data::collate(&rows, self.pad_id, self.device);
            let logits = match reference.as_mut() {
                Some(m) => forward_logits(m, &self.layout, &Weights::Resident, &batch)?,
                None => {
                    let w = weights_of(&self.student_full, &*self.comm, &self.master, self.kind);
                    forward_logits(&mut self.student, &self.layout, &w, &batch)?
                }
            };
            let lp = methods::losses::target_logprobs(&logits, &batch.input_ids, &batch.target_mask);
            let row_sums = Vec::<f64>::try_from(lp.sum_dim_intlist(1, false, Kind::Double).to_device(Device::Cpu))?;
            for (&i, s) in chunk.iter().zip(row_sums) {
                sums[i] = s;
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish();
        self.comm.all_reduce_f64(&mut sums)?;
        Ok(sums)
    }

    fn draw(&mut self, obj: Objective) -> LocalBatch {
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let loader = match obj {
            Objective::Forget => self.forget.as_mut(),
            Objective::Retain => self.retain.as_mut(),
        }
        .expect("loader for a used objective");
        let idx = loader.next_indices(self.cfg.train.batch_size);
        local_batch(loader.examples(), &idx, rank, world, self.pad_id, self.device)
    }

    /// Forward/backward of one objective on one micro-batch into its accumulator.
    /// Returns this rank's share of the logged loss value.
    fn accumulate(&mut self, obj: Objective, batch: &LocalBatch) -> Result<f64> {
        let mut aux = Aux::default();
        if self.method.needs_teacher(obj) {
            let teacher = self.teacher.as_mut().expect("teacher model");
            let shard = self.method.teacher_shard().expect("teacher shard");
            let w = weights_of(&self.teacher_full, &*self.comm, shard, self.kind);
            aux.teacher_logits = Some(forward_logits(teacher, &self.layout, &w, &batch.batch)?);
        }
        if obj == Objective::Forget {
            if let Some(sums) = &self.ref_sums {
                let rows: Vec<f64> = batch.example_ids.iter().map(|&i| sums[i]).collect();
                aux.ref_sums = Some(Tensor::from_slice(&rows).to_kind(Kind::Float).to_device(self.device));
            }
        }
        let accum = self.cfg.train.grad_accum as f64;
        let mut value = 0.0;
        let method = &mut self.method;
        let mut loss_fn = |logits: &Tensor| -> Result<Tensor> {
            let out = method.loss(obj, logits, batch, &aux)?;
            value = out.value;
            Ok(out.loss / accum)
        };
        let acc = match obj {
            Objective::Forget => self.acc_forget.as_mut(),
            Objective::Retain => self.acc_retain.as_mut(),
        }
        .expect("accumulator for a used objective");
        let mut sink = Sink { acc, layout: &self.layout, comm: &*self.comm };
        let w = weights_of(&self.student_full, &*self.comm, &self.master, self.kind);
        forward_backward(&mut self.student, &self.layout, &w, self.layer_wise, &batch.batch, &mut loss_fn, &mut sink)?;
        Ok(value)
    }

    /// Copy the master shard into the student's compute replica (all-gather when sharded).
    fn sync_student(&mut self) -> Result<()> {
        if self.replicas_are_shards {
            return Ok(());
        }
        if let Some(full) = self.student_full.as_mut() {
            let all: Vec<usize> = (0..self.layout.buckets.len()).collect();
            tch::no_grad(|| self.layout.gather_buckets(&*self.comm, &self.master, full, &all, 0))?;
        }
        Ok(())
    }

    fn sync_teacher(&mut self) -> Result<()> {
        if self.replicas_are_shards {
            return Ok(());
        }
        if let (Some(full), Some(shard)) = (self.teacher_full.as_mut(), self.method.teacher_shard()) {
            let all: Vec<usize> = (0..self.layout.buckets.len()).collect();
            tch::no_grad(|| self.layout.gather_buckets(&*self.comm, shard, full, &all, 0))?;
        }
        Ok(())
    }

    /// Global token-mean retain NLL of a global batch at the current student weights (AutoLR probe).
    fn probe_loss(&mut self, batches: &[LocalBatch]) -> Result<f64> {
        let mut total = 0.0;
        for b in batches {
            let w = weights_of(&self.student_full, &*self.comm, &self.master, self.kind);
            let logits = forward_logits(&mut self.student, &self.layout, &w, &b.batch)?;
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
        let objectives = self.method.objectives();
        for acc in [self.acc_forget.as_mut(), self.acc_retain.as_mut()].into_iter().flatten() {
            acc.zero_();
        }
        let mut losses = [0.0f64; 2];
        let mut tokens = 0i64;
        for _ in 0..self.cfg.train.grad_accum {
            for &obj in objectives {
                let batch = self.draw(obj);
                tokens += batch.global.targets;
                let v = self.accumulate(obj, &batch)?;
                losses[obj as usize] += v / self.cfg.train.grad_accum as f64;
            }
        }
        // Logged values are per-rank shares of global means: sum them. A non-finite value on any
        // rank becomes non-finite on all, so every rank stops together.
        self.comm.all_reduce_f64(&mut losses)?;
        let uses = |o: Objective| objectives.contains(&o);
        for (o, name) in [(Objective::Forget, "forget"), (Objective::Retain, "retain")] {
            if uses(o) && !losses[o as usize].is_finite() {
                return Err(crate::Error::NonFinite { step, msg: format!("{name} loss is {}", losses[o as usize]) });
            }
        }

        let (comm, layout, rank) = (&*self.comm, &self.layout, self.shard_rank);
        let g_f = self.acc_forget.as_mut().map(|a| a.reduced_shard(layout, comm, rank)).transpose()?;
        let g_r = self.acc_retain.as_mut().map(|a| a.reduced_shard(layout, comm, rank)).transpose()?;
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
        if sq.iter().any(|v| !v.is_finite()) {
            return Err(crate::Error::NonFinite { step, msg: format!("gradient norms are not finite ({sq:?})") });
        }
        let stats = GradStats { sq_forget: sq[0], sq_retain: sq[1], dot: sq[2] };
        let grads = Grads { forget: g_f.as_ref(), retain: g_r.as_ref(), stats, params: &self.master };
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
        self.sync_student()?;
        self.sync_teacher()?;
        self.step = step;
        if self.cfg.dist.verify_every > 0 && step % self.cfg.dist.verify_every == 0 {
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
            tr.sync_student()?;
            tr.probe_loss(&batches)
        };
        let l_minus = at(self, -1.0)?; // w + ηd
        let l_plus = at(self, 1.0)?; // w − ηd
        let l_zero = at(self, 0.0)?;
        tch::no_grad(|| self.master.copy_(&w_t));
        Ok(self.method.autolr().expect("autolr").update(l_minus, l_zero, l_plus))
    }

    /// Fault injection for the divergence-check test: `UNLEARN_FAULT_PERTURB=RANK:STEP` nudges
    /// that rank's student replica before the check of that step. Never set in normal use.
    fn fault_injection_perturb(&mut self, step: u64) {
        let Ok(v) = std::env::var("UNLEARN_FAULT_PERTURB") else { return };
        let Some((r, s)) = v.split_once(':') else { return };
        if r.parse() == Ok(self.comm.rank()) && s.parse() == Ok(step) {
            if let Some(full) = self.student_full.as_mut() {
                tch::no_grad(|| {
                    let _ = full.narrow(0, 0, 1).f_add_scalar_(1e-3);
                });
            }
        }
    }

    /// Fail loudly if the replicated buffers differ across ranks.
    fn verify_replicas(&self) -> Result<()> {
        for (name, t) in [("student", self.student_full.as_ref()), ("teacher", self.teacher_full.as_ref())] {
            let Some(t) = t else { continue };
            let (sum, sq) = crate::dist::zero::checksum(t);
            let mut v = [sum, sq, -sum, -sq];
            self.comm.all_reduce_max_f64(&mut v)?;
            if v[0] != -v[2] || v[1] != -v[3] {
                return Err(crate::Error::Dist(format!(
                    "step {}: {name} weights differ across ranks (checksum range {:.9e}..{:.9e})",
                    self.step, -v[2], v[0]
                )));
            }
        }
        Ok(())
    }

    /// Write the current student as an HF model directory (rank 0 writes; every rank takes part
    /// in the per-bucket gathers, so no rank ever holds the fp32 model twice).
    pub fn save_final(&mut self, out: &Path) -> Result<()> {
        let cfg = self.student.config().clone();
        let specs = param_specs(&cfg);
        let index = params::param_index(&self.layout);
        let mut writer = if self.is_main() {
            Some(crate::model::weights::HfWriter::create(out, &self.raw_config, &specs, self.kind, crate::model::weights::DEFAULT_MAX_SHARD_BYTES)?)
        } else {
            None
        };
        let frozen: std::collections::HashMap<String, Tensor> =
            self.student.named_params().into_iter().filter(|(n, _)| !index.contains_key(n)).collect();
        let mut cached: Option<(usize, Tensor)> = None;
        for s in &specs {
            let t = match index.get(&s.name) {
                None => frozen[&s.name].shallow_clone(),
                Some(&i) => {
                    let p = &self.layout.params[i];
                    if cached.as_ref().map(|c| c.0) != Some(p.bucket) {
                        let bk = &self.layout.buckets[p.bucket];
                        let mut buf = Tensor::zeros([bk.padded], (Kind::Float, self.device));
                        self.layout.gather_buckets(&*self.comm, &self.master, &mut buf, &[p.bucket], bk.offset)?;
                        cached = Some((p.bucket, buf));
                    }
                    let (_, buf) = cached.as_ref().unwrap();
                    let bk = &self.layout.buckets[p.bucket];
                    buf.narrow(0, p.offset - bk.offset, p.numel).view(p.shape.as_slice())
                }
            };
            if let Some(w) = writer.as_mut() {
                w.write(&s.name, &t)?;
            }
        }
        if let Some(w) = writer {
            w.finish(Some(&self.cfg.model.path))?;
        }
        self.comm.barrier()
    }

    /// State for checkpoints.
    pub fn checkpoint_state(&mut self) -> crate::checkpoint::State {
        let autolr = self.method.autolr().cloned();
        let mut tensors = vec![("master".to_string(), self.master.shallow_clone())];
        for (n, t) in self.optim.state() {
            tensors.push((format!("optim.{n}"), t));
        }
        if let Some(t) = self.method.teacher_shard() {
            tensors.push(("teacher".to_string(), t.shallow_clone()));
        }
        crate::checkpoint::State {
            step: self.step,
            world: self.comm.world(),
            layout: self.layout.clone(),
            tensors,
            optim_scalars: self.optim.scalars(),
            forget: self.forget.as_ref().map(Loader::state),
            retain: self.retain.as_ref().map(Loader::state),
            autolr,
            method: self.cfg.method.name.clone(),
        }
    }

    /// Restore from a checkpoint written at any world size.
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let ck = crate::checkpoint::Loaded::open(dir)?;
        if ck.meta.method != self.cfg.method.name {
            return Err(crate::other!("{}: checkpoint of method `{}`, config says `{}`", dir.display(), ck.meta.method, self.cfg.method.name));
        }
        let rank = self.shard_rank;
        ck.read_shard("master", &self.layout, rank, &mut self.master)?;
        let names: Vec<String> = ck.tensor_names().into_iter().filter(|n| n.starts_with("optim.")).collect();
        let mut optim_tensors = vec![];
        for n in names {
            let mut t = Tensor::zeros([self.layout.shard_len()], (Kind::Float, self.device));
            ck.read_shard(&n, &self.layout, rank, &mut t)?;
            optim_tensors.push((n.trim_start_matches("optim.").to_string(), t));
        }
        self.optim.restore(optim_tensors, &ck.meta.optim_scalars)?;
        if let Some(t) = self.method.teacher_shard_mut() {
            ck.read_shard("teacher", &self.layout, rank, t)?;
        }
        if let (Some(l), Some(s)) = (self.forget.as_mut(), ck.meta.forget) {
            l.restore(s);
        }
        if let (Some(l), Some(s)) = (self.retain.as_mut(), ck.meta.retain) {
            l.restore(s);
        }
        if let (Some(a), Some(saved)) = (self.method.autolr(), ck.meta.autolr.clone()) {
            *a = saved;
        }
        self.step = ck.meta.step;
        self.sync_student()?;
        self.sync_teacher()?;
        Ok(())
    }
}

/// Resident weights when a compute replica exists, else gathered per layer from `shard`.
fn weights_of<'a>(full: &Option<Tensor>, comm: &'a dyn crate::dist::Collective, shard: &'a Tensor, kind: Kind) -> Weights<'a> {
    match full {
        Some(_) => Weights::Resident,
        None => Weights::Gathered { comm, shard, kind },
    }
}

/// Read, limit and tokenize the records of one or more dataset files.
fn load_examples(paths: &[PathBuf], limit: Option<usize>, tok: &Tokenizer, max_len: usize, overflow: Overflow) -> Result<Vec<Example>> {
    let mut records: Vec<Record> = vec![];
    for p in paths {
        records.extend(read_records(p)?);
    }
    if let Some(n) = limit {
        records.truncate(n);
    }
    let ex = tokenize_all(tok, &records, max_len, overflow).map_err(|e| crate::other!("{}: {e}", paths[0].display()))?;
    if ex.is_empty() {
        return Err(crate::other!("{}: no usable examples after tokenization", paths[0].display()));
    }
    Ok(ex)
}

/// Append one JSON line to metrics.jsonl (rank 0).
pub fn append_metrics(path: &Path, log: &StepLog) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| crate::Error::io(path, e))?;
    writeln!(f, "{}", serde_json::to_string(log).expect("metrics serialize")).map_err(|e| crate::Error::io(path, e))
}

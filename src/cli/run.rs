//! `unlearn run`: train (fine-tune or unlearn) as the config says, resumably.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::checkpoint::{self, Attached};
use crate::config::RunConfig;
use crate::dist::{self, watchdog};
use crate::fault::{self, Fault};
use crate::monitor::resume::{self, Saved};
use crate::monitor::{write_record, Monitor};
use crate::progress::Progress;
use crate::record::Record;
use crate::signals;
use crate::tensorboard::EventWriter;
use crate::train::out_dir::{self, Start};
use crate::train::{append_metrics, Trainer};
use crate::Result;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// TOML config (see configs/). With --resume it defaults to the run's saved config.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any config key: --set optim.lr=1e-5 --set train.steps=50
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue the run in this output directory from its latest checkpoint (any world size), or
    /// start it there when it holds none: `run --config X --resume DIR` is the command to repeat
    /// after a preemption or a requeue.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start over in a train.out_dir that holds an earlier run (or other files): replaces what a
    /// run writes there (checkpoints, metrics, config.toml, final/) and leaves every other file.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let config_path = match (&args.config, &args.resume) {
        (Some(c), _) => c.clone(),
        (None, Some(dir)) if !dir.join("config.toml").is_file() => {
            return Err(crate::input!(
                "--resume {}: not a run directory (no config.toml); give --config FILE to start a run there",
                dir.display()
            ))
        }
        (None, Some(dir)) => dir.join("config.toml"),
        (None, None) => return Err(crate::input!("give --config FILE (or --resume DIR of an earlier run)")),
    };
    let mut overrides = args.overrides.clone();
    if let Some(dir) = &args.resume {
        overrides.push(format!("train.out_dir={:?}", dir.display().to_string()));
    }
    let cfg = RunConfig::load(&config_path, &overrides)?;
    let device = cfg.model.device.resolve()?;
    let comm = dist::init_backend(cfg.dist.backend, device, Duration::from_secs_f64(cfg.dist.timeout_s))?;
    dist::set_cpu_threads();
    signals::install();
    let out = cfg.train.out_dir.clone();
    let ckpt_root = out.join("checkpoints");
    let rank = comm.rank();

    // Every rank reads the directory before rank 0 changes anything in it. The model, data and
    // checkpoint are checked before anything is written, so bad input leaves no half-made run
    // directory behind and a refused resume keeps the run's config.toml.
    let inputs = [("model.path", cfg.model.path.as_path())].into_iter();
    let data =
        cfg.data.forget.iter().map(|p| ("data.forget", p.as_path())).chain(cfg.data.retain.iter().map(|p| ("data.retain", p.as_path())));
    out_dir::check_inputs_outside(&out, &inputs.chain(data).collect::<Vec<_>>())?;
    let start = out_dir::decide(&out, args.resume.is_some(), args.overwrite)?;
    barrier(&*comm, "deciding how the run starts")?;
    watchdog::set_phase("loading the model and data");
    let mut trainer = Trainer::new(&cfg, comm.clone(), device)?;
    let mut resumed = None;
    if let Start::Resume(dir) = &start {
        let attached = trainer.restore(dir)?;
        if trainer.step() > cfg.train.steps {
            return Err(crate::Error::config(
                config_path.display().to_string(),
                "train.steps",
                format!(
                    "{} is below the step of the checkpoint {} ({}); nothing to resume",
                    cfg.train.steps,
                    dir.display(),
                    trainer.step()
                ),
            ));
        }
        resumed = resume::check(&cfg.monitor, attached, dir, &config_path.display().to_string())?;
    }
    let metrics = out.join("metrics.jsonl");
    if rank == 0 {
        match &start {
            Start::Resume(dir) => {
                tracing::info!("resumed from {} at step {}", dir.display(), trainer.step());
                let saved = resumed.as_ref().map(|r| &r.saved);
                truncate_metrics(&metrics, trainer.step(), |line| Saved::keeps_line(saved, line))?;
            }
            Start::Fresh => out_dir::clear_earlier_run(&out)?,
        }
        std::fs::create_dir_all(&ckpt_root).map_err(|e| crate::Error::io(&ckpt_root, e))?;
        crate::model::weights::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    }
    barrier(&*comm, "rank 0 preparing the output directory")?;

    let mut events = (rank == 0).then(|| crate::tensorboard::EventWriter::create(&out, trainer.step() + 1)).transpose()?;
    // rank 0 hashes the inputs once; final/ and best/ carry the record.
    let record = (rank == 0).then(|| Record::for_run(&cfg, comm.world())).transpose()?;
    let mut monitor = Monitor::new(&cfg, &mut trainer)?;
    let total = cfg.train.steps;
    if let Some(m) = monitor.as_mut() {
        if let Some(r) = resumed {
            m.resume(r, rank == 0)?;
        }
        // Step 0's evaluation, or the checkpoint's step (evaluated after its checkpoint was written).
        if m.due_at_start(trainer.step(), total) {
            log_lines(rank, &metrics, &mut events, &m.evaluate(&mut trainer, record.as_ref())?.0)?;
        }
    }
    let every = cfg.train.checkpoint_every;
    let keep = cfg.train.keep_checkpoints;
    let log_every = cfg.train.log_every;
    let bar = Progress::new(total, "train");
    bar.inc(trainer.step().min(total));
    let mut gate = StepGate::from_env(rank)?;
    watchdog::set_phase("");
    let attached = |m: &Option<Monitor>| m.as_ref().map_or_else(Attached::default, Monitor::attached);
    while trainer.step() < total && !monitor.as_ref().is_some_and(Monitor::stopped) {
        gate.wait()?;
        let log = trainer.train_step()?;
        if rank == 0 {
            fault::check_io(Fault::Metrics, log.step, &metrics)?;
        }
        log_line(rank, &metrics, &mut events, log.step, &log)?;
        if rank == 0 && (log.step % log_every == 0 || log.step == total) {
            tracing::info!("{}", format_log(&log, total));
        }
        bar.inc(1);
        if log.stop_requested && log.step < total {
            return Err(stop(&mut trainer, &ckpt_root, keep, &attached(&monitor)));
        }
        if every > 0 && log.step % every == 0 && log.step < total {
            let dir = trainer.save_checkpoint(&ckpt_root, keep, &attached(&monitor))?;
            if rank == 0 {
                tracing::info!("checkpoint {}", dir.display());
            }
        }
        if let Some(m) = monitor.as_mut().filter(|m| m.due(log.step, total)) {
            let (lines, stop) = m.evaluate(&mut trainer, record.as_ref())?;
            log_lines(rank, &metrics, &mut events, &lines)?;
            if stop {
                break;
            }
        }
    }
    bar.finish();
    let final_ckpt = checkpoint::step_dir(&ckpt_root, trainer.step());
    if !final_ckpt.join("meta.json").exists() {
        watchdog::set_phase("writing the last checkpoint");
        trainer.save_checkpoint(&ckpt_root, keep, &attached(&monitor))?;
    }
    let outcome = match monitor.as_mut() {
        Some(m) => {
            let (line, outcome) = m.finish(&mut trainer, total)?;
            log_lines(rank, &metrics, &mut events, &line.into_iter().collect::<Vec<_>>())?;
            Some(outcome.to_json())
        }
        None => None,
    };
    let final_dir = out.join("final");
    trainer.save_model(&final_dir, &|tmp| write_record(tmp, record.as_ref(), outcome.as_ref()))?;
    if rank == 0 {
        let rss = crate::plan::rss::peak_rss_bytes().map_or(String::new(), |b| format!(", peak RSS {} MiB on rank 0", b >> 20));
        let why = outcome.as_ref().map_or(String::new(), |o| {
            format!(" (stop rule `{}` at step {})", o["stop"]["rule"].as_str().unwrap_or_default(), o["stop"]["step"])
        });
        tracing::info!("done: {} steps{why}, model in {}{rss}", trainer.step(), final_dir.display());
    }
    Ok(())
}

/// One line of metrics.jsonl and its TensorBoard scalars (rank 0).
fn log_line(rank: usize, metrics: &Path, events: &mut Option<EventWriter>, step: u64, line: &impl serde::Serialize) -> Result<()> {
    if rank == 0 {
        append_metrics(metrics, line)?;
        events.as_mut().map_or(Ok(()), |e| e.scalars(step, line))?;
    }
    Ok(())
}

/// The in-run evaluation's lines (each has its `step`).
fn log_lines(rank: usize, metrics: &Path, events: &mut Option<EventWriter>, lines: &[serde_json::Value]) -> Result<()> {
    lines.iter().try_for_each(|l| log_line(rank, metrics, events, l["step"].as_u64().unwrap_or(0), l))
}

fn barrier(comm: &dyn dist::Collective, what: &'static str) -> Result<()> {
    let _g = watchdog::enter(format!("barrier: {what}"));
    comm.barrier()
}

/// Every rank agreed in this step that some rank was asked to stop: checkpoint the step and
/// return the "preempted" outcome (or the checkpoint's error).
fn stop(trainer: &mut Trainer, ckpt_root: &Path, keep: usize, attached: &Attached) -> crate::Error {
    let step = trainer.step();
    let signal = signals::requested().map_or_else(|| "a signal to another rank".to_string(), signals::name);
    if let Some(s) = signals::requested() {
        tracing::warn!("{} received: writing a checkpoint after step {step} and exiting", signals::name(s));
    }
    watchdog::set_phase("checkpoint on a stop request");
    match trainer.save_checkpoint(ckpt_root, keep, attached) {
        Ok(checkpoint) => crate::Error::Preempted { signal, step, checkpoint },
        Err(e) => e,
    }
}

fn format_log(l: &crate::train::StepLog, total: u64) -> String {
    let mut s = format!("step {}/{total}", l.step);
    if let Some(v) = l.loss_forget {
        s += &format!(" | forget {v:.4}");
    }
    if let Some(v) = l.loss_retain {
        s += &format!(" | retain {v:.4}");
    }
    if let Some(v) = l.grad_norm_forget {
        s += &format!(" | |g_F| {v:.3e}");
    }
    if let Some(v) = l.grad_norm_retain {
        s += &format!(" | |g_R| {v:.3e}");
    }
    if let Some(v) = l.grad_norm {
        s += &format!(" | |g| {v:.3e}");
    }
    if let (Some(f), Some(r)) = (l.grad_norm_forget_local, l.grad_norm_retain_local) {
        s += &format!(" | |g_F|~{f:.2e} |g_R|~{r:.2e} (local)");
    }
    s + &format!(" | lr {:.3e} | clip {:.3} | {:.0} tok/s", l.lr, l.clip, l.tokens_per_s)
}

/// Benchmark hook: with `UNLEARN_STEP_GATE=PATH` (a named pipe; `{rank}` in it is replaced by
/// the rank) every step first waits for one byte on that pipe, so that benches/bench.py can run
/// the steps of `unlearn` and of the PyTorch script turn by turn on a shared machine. The wait is
/// outside the timed step. Unset in normal use.
struct StepGate(Option<(PathBuf, Option<std::fs::File>)>);

impl StepGate {
    fn from_env(rank: usize) -> Result<Self> {
        Ok(StepGate(std::env::var("UNLEARN_STEP_GATE").ok().map(|p| (PathBuf::from(p.replace("{rank}", &rank.to_string())), None))))
    }

    fn wait(&mut self) -> Result<()> {
        use std::io::Read;
        let Some((path, file)) = &mut self.0 else { return Ok(()) };
        if file.is_none() {
            *file = Some(std::fs::File::open(&*path).map_err(|e| crate::Error::io(&*path, e))?);
        }
        let mut byte = [0u8; 1];
        file.as_mut().expect("opened above").read_exact(&mut byte).map_err(|e| crate::Error::io(&*path, e))
    }
}

/// Keep the metrics lines up to `step` that `keep` accepts (a resumed run rewrites the steps after
/// its checkpoint, and the evaluations its checkpoint does not hold).
fn truncate_metrics(path: &Path, step: u64, keep: impl Fn(&serde_json::Value) -> bool) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok().is_some_and(|v| v["step"].as_u64().is_some_and(|s| s <= step) && keep(&v))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::model::weights::write_atomic(path, kept.as_bytes())
}

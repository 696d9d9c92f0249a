//! Distribution: one collective interface, three backends (`none`, `mpi`, `nccl`), and the shard
//! maps of ZeRO. Model and method code never import this module; the trainer hands them flat
//! buffers that this module has reduced, scattered or gathered.
//!
//! All collectives work on contiguous flat tensors (f32 or bf16) and on small f64 vectors for
//! scalars (norms, losses, checksums). Gradients are SUM-reduced: every rank normalises its loss by
//! the *global* token count of the micro-batch, so the sum is the single-process gradient.

pub mod count;
#[cfg(feature = "nccl")]
mod cuda;
pub mod gather;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod watchdog;
pub mod world;
pub mod zero;

pub use world::{abort_world, finalize};

use std::rc::Rc;

use tch::Tensor;

use crate::Result;

/// A group of ranks that move flat buffers between them.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Name for logs ("none", "mpi", "nccl").
    fn backend(&self) -> &'static str;
    /// Elementwise sum over ranks, in place.
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()>;
    /// `full` (world × n elements) summed over ranks; rank r receives block r into `shard` (n).
    fn reduce_scatter_sum(&self, full: &Tensor, shard: &mut Tensor) -> Result<()>;
    /// Every rank's `shard` (n) concatenated in rank order into `full` (world × n).
    fn all_gather(&self, shard: &Tensor, full: &mut Tensor) -> Result<()>;
    /// Copy `root`'s tensor to every rank.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Sum small f64 vectors over ranks (norms, loss sums, token counts). Always exact order-
    /// independent enough for scalars; done on the host.
    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<()>;
    /// Elementwise max of small f64 vectors over ranks.
    fn all_reduce_max_f64(&self, v: &mut [f64]) -> Result<()>;
    /// Copy `root`'s bytes to every rank (length included).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Stop every rank now (MPI_Abort / NCCL abort); used when one rank fails, so that no rank
    /// hangs in a collective waiting for a dead peer.
    fn abort(&self, code: i32) -> !;

    // Collectives that run while the caller computes. Each takes (shallow clones of) its tensors
    // and keeps them alive until the returned handle is waited on; until then the caller must
    // neither read nor write their storage. Collectives run in the order they were issued, the
    // blocking ones above included, so every rank must issue the same sequence. A backend without
    // a communication thread or stream runs them at once (the defaults).

    /// [`Collective::all_reduce_sum`] of `t`, in place.
    fn start_all_reduce(&self, t: Tensor) -> Result<Handle> {
        let mut t = t;
        self.all_reduce_sum(&mut t)?;
        Ok(Box::new(Done))
    }
    /// [`Collective::reduce_scatter_sum`] of `full` into `shard`.
    fn start_reduce_scatter(&self, full: Tensor, shard: Tensor) -> Result<Handle> {
        let mut shard = shard;
        self.reduce_scatter_sum(&full, &mut shard)?;
        Ok(Box::new(Done))
    }
    /// [`Collective::all_gather`] of `shard` into `full`.
    fn start_all_gather(&self, shard: Tensor, full: Tensor) -> Result<Handle> {
        let mut full = full;
        self.all_gather(&shard, &mut full)?;
        Ok(Box::new(Done))
    }
}

/// A collective in flight (see [`Collective::start_all_reduce`]).
pub trait InFlight {
    /// Whether it has finished; never blocks.
    fn is_done(&mut self) -> bool;
    /// Return once its results may be read and its buffers reused: on the host for host
    /// backends; for NCCL, once the compute stream is ordered after it (no host wait).
    fn wait(self: Box<Self>) -> Result<()>;
}

pub type Handle = Box<dyn InFlight>;

/// A collective that ran to completion when it was issued.
pub struct Done;

impl InFlight for Done {
    fn is_done(&mut self) -> bool {
        true
    }
    fn wait(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Wait for every handle, in order (the first error is returned after all have finished, so that
/// no buffer is released while a collective still uses it).
pub fn wait_all(handles: impl IntoIterator<Item = Handle>) -> Result<()> {
    let mut first = Ok(());
    for h in handles {
        let r = h.wait();
        if first.is_ok() {
            first = r;
        }
    }
    first
}

/// Nanoseconds this process's threads have spent blocked waiting for collectives (host
/// backends), since the last [`take_blocked_seconds`].
static BLOCKED_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Run `f`, a wait for a collective, and count the time it blocks.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn blocked<T>(f: impl FnOnce() -> T) -> T {
    let t = std::time::Instant::now();
    let out = f();
    BLOCKED_NS.fetch_add(t.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    out
}

/// Seconds spent blocked on collectives since the last call: the communication a step did not
/// hide behind compute (the trainer logs it per step as `comm_wait_s`).
pub fn take_blocked_seconds() -> f64 {
    BLOCKED_NS.swap(0, std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
}

/// Payload bytes of a tensor, as collectives move and count them.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Shared within one process (collectives are issued from the main thread only; every rank issues
/// the same collectives in the same order, see ARCHITECTURE.md "Collectives").
pub type Comm = Rc<dyn Collective>;

/// The collective backend (`dist.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// NCCL on CUDA devices when built with it, MPI when launched under an MPI launcher, else none.
    Auto,
    None,
    Mpi,
    Nccl,
}

/// [`init_backend`] for a backend named on a command line (`auto`, `none`, `mpi`, `nccl`), with
/// the default collective timeout.
pub fn init(backend: &str, device: tch::Device) -> Result<Comm> {
    let b = crate::config::parse_choice::<Backend>(backend).map_err(|e| crate::input!("backend: {e}"))?;
    init_backend(b, device, std::time::Duration::from_secs_f64(watchdog::DEFAULT_TIMEOUT_S))
}

/// Bring up `backend` (`auto` picks from the device and the environment), check that it sees the
/// ranks the launcher started, and start the watchdog with `timeout` per collective.
pub fn init_backend(backend: Backend, device: tch::Device, timeout: std::time::Duration) -> Result<Comm> {
    let under_launcher = launcher_world_size() > 1;
    let comm = match backend {
        Backend::None => {
            if under_launcher {
                return Err(crate::input!("dist.backend = \"none\" but launched with {} ranks", launcher_world_size()));
            }
            return Ok(Rc::new(local::Local));
        }
        Backend::Mpi => init_mpi()?,
        Backend::Nccl => init_nccl(device)?,
        Backend::Auto => {
            if device.is_cuda() && cfg!(feature = "nccl") {
                init_nccl(device)?
            } else if under_launcher || cfg!(feature = "mpi") && std::env::var("OMPI_COMM_WORLD_SIZE").is_ok() {
                init_mpi()?
            } else {
                return Ok(Rc::new(local::Local));
            }
        }
    };
    check_world(comm.world())?;
    watchdog::start(comm.rank(), timeout);
    Ok(comm)
}

/// The number of ranks the launcher says it started, and from which variable: mpirun's, then
/// the PMI's (MPICH, Slurm's pmi2), then a Slurm job step's (set inside `srun` only; the batch
/// script's `SLURM_NTASKS` describes the allocation, which an mpirun inside it may not fill).
pub fn launcher_ranks() -> Option<(usize, &'static str)> {
    let get = |k: &'static str| std::env::var(k).ok().and_then(|v| v.parse().ok()).map(|n| (n, k));
    get("OMPI_COMM_WORLD_SIZE").or_else(|| get("PMI_SIZE")).or_else(|| get("PMIX_SIZE")).or_else(|| {
        if std::env::var("SLURM_STEP_ID").is_ok() {
            get("SLURM_STEP_NUM_TASKS").or_else(|| get("SLURM_NTASKS"))
        } else {
            None
        }
    })
}

/// Refuse to run when MPI's world is not the launcher's: N copies of a world of one would each
/// train alone and write the same output directory.
fn check_world(world: usize) -> Result<()> {
    let Some((n, var)) = launcher_ranks() else { return Ok(()) };
    if n == world {
        return Ok(());
    }
    let fix = if var.starts_with("SLURM") {
        "srun started the tasks without connecting them to MPI: use `srun --mpi=pmix` (or the PMI plugin your MPI was built \
         with; `srun --mpi=list` shows them), or mpirun inside the allocation (UNLEARN_LAUNCHER=mpirun in launch/slurm.sbatch)"
    } else {
        "the launcher and the MPI library do not agree: launch with the mpirun of the MPI this binary was built against \
         (`mpirun -np N launch/mpirun.sh ...`)"
    };
    Err(crate::input!("MPI sees {world} rank(s) but {var}={n}: {fix}"))
}

#[cfg(feature = "mpi")]
fn init_mpi() -> Result<Comm> {
    Ok(Rc::new(mpi::Mpi::init()?))
}
#[cfg(not(feature = "mpi"))]
fn init_mpi() -> Result<Comm> {
    if launcher_world_size() > 1 {
        return Err(crate::other!("launched with several ranks but this binary was built without the `mpi` feature"));
    }
    Ok(Rc::new(local::Local))
}

#[cfg(feature = "nccl")]
fn init_nccl(device: tch::Device) -> Result<Comm> {
    if !device.is_cuda() {
        return Err(crate::other!("dist.backend = \"nccl\" needs a CUDA device (model.device)"));
    }
    Ok(Rc::new(nccl::Nccl::init(device)?))
}
#[cfg(not(feature = "nccl"))]
fn init_nccl(_device: tch::Device) -> Result<Comm> {
    Err(crate::other!("dist.backend = \"nccl\" but this binary was built without the `nccl` feature"))
}

/// This process's rank as the launcher advertises it (Open MPI, MPICH/PMI, Slurm, torchrun),
/// readable before MPI is initialised; 0 when not launched by any of them.
pub fn env_rank() -> usize {
    env_first(&["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK"]).unwrap_or(0)
}

/// Number of ranks the launcher started (1 when run directly).
pub fn launcher_world_size() -> usize {
    launcher_ranks().map(|(n, _)| n).or_else(|| env_first(&["WORLD_SIZE"])).unwrap_or(1)
}

/// This process's rank among the ranks on its node (0 when not launched by a launcher).
pub fn local_rank() -> usize {
    env_first(&["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"]).unwrap_or(0)
}

/// This rank's device, made current before anything is allocated on it. On a node with several
/// visible GPUs, rank r of the node uses GPU r (mod count); with one visible GPU per rank
/// (launch/mpirun.sh sets CUDA_VISIBLE_DEVICES) this is GPU 0. `run`, `eval` and `comm-check`
/// all take their device from here.
pub fn rank_device(d: tch::Device) -> Result<tch::Device> {
    match d {
        tch::Device::Cuda(0) => {
            let n = tch::Cuda::device_count().max(1) as usize;
            let index = local_rank() % n;
            select_cuda_device(index)?;
            Ok(tch::Device::Cuda(index))
        }
        other => Ok(other),
    }
}

/// Total memory of a CUDA device in bytes (None on the CPU, or when the driver cannot be asked).
#[cfg(feature = "nccl")]
pub fn device_memory_bytes(device: tch::Device) -> Option<u64> {
    if !device.is_cuda() {
        return None;
    }
    // The model is already on the device, so its primary context is current on this thread.
    cuda::total_memory()
}
#[cfg(not(feature = "nccl"))]
pub fn device_memory_bytes(_device: tch::Device) -> Option<u64> {
    None
}

#[cfg(feature = "nccl")]
fn select_cuda_device(index: usize) -> Result<()> {
    cuda::select_device(index)
}
/// Without the driver bindings (built without `nccl`) every allocation names its device explicitly
/// and no communicator needs a current one.
#[cfg(not(feature = "nccl"))]
fn select_cuda_device(_index: usize) -> Result<()> {
    Ok(())
}

/// Ranks on this node, to split CPU threads between them.
pub fn local_world_size() -> usize {
    env_first(&["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE"]).unwrap_or(1)
}

fn env_first(keys: &[&str]) -> Option<usize> {
    keys.iter().find_map(|k| std::env::var(k).ok().and_then(|v| v.parse().ok()))
}

/// Raw f32 view of a contiguous CPU tensor (for host collectives).
#[cfg(feature = "mpi")]
///
/// # Safety
/// The tensor must be a contiguous CPU f32 tensor and must not be aliased mutably elsewhere for
/// the lifetime of the slice.
pub(crate) unsafe fn f32_slice_mut(t: &mut Tensor) -> &mut [f32] {
    debug_assert!(t.device() == tch::Device::Cpu && t.is_contiguous() && t.kind() == tch::Kind::Float);
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel())
}

/// # Safety
/// As [`f32_slice_mut`], read-only.
#[cfg(feature = "mpi")]
pub(crate) unsafe fn f32_slice(t: &Tensor) -> &[f32] {
    debug_assert!(t.device() == tch::Device::Cpu && t.is_contiguous() && t.kind() == tch::Kind::Float);
    std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel())
}

/// Split the node's cores between its ranks for libtorch's intra-op threads (unless the user set
/// OMP_NUM_THREADS): N ranks each using every core would thrash.
pub fn set_cpu_threads() {
    if std::env::var("OMP_NUM_THREADS").is_ok() {
        return;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let per_rank = (cores / local_world_size().max(1)).max(1);
    tch::set_num_threads(per_rank as i32);
}

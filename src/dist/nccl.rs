//! NCCL backend on CUDA tensors, through cudarc's dynamically loaded bindings (the library is
//! found at run time: `libnccl.so`, which launch/setup.sh links to the torch wheel's
//! `libnccl.so.2`, so the process holds a single NCCL).
//!
//! Collectives are enqueued on the legacy default stream (`stream = null`), the stream every tch
//! kernel runs on (tch exposes no stream API): NCCL kernels are thereby ordered after the kernels
//! that produce their inputs and before those that consume their outputs, with no explicit sync.
//! The communicator id is made by rank 0 and broadcast over MPI; host-side scalars (norms, loss
//! sums) and barriers also go through MPI, or nowhere at world size 1.
//!
//! A collective returns once enqueued; it is in flight for the watchdog until a CUDA event
//! recorded after it completes, and the watchdog also polls `ncclCommGetAsyncError`. The
//! communicator lives until the process ends (`dist::world`): destroyed after success, aborted
//! after a failure, never destroyed by a drop while a peer may still wait on it.

use std::ffi::c_void;

use cudarc::nccl::{result as nr, sys as ns};
use tch::{Kind, Tensor};

use super::cuda::Completion;
use super::local::Local;
use super::watchdog;
use super::Collective;
use crate::Result;

pub struct Nccl {
    comm: ns::ncclComm_t,
    rank: usize,
    world: usize,
    /// Host channel: MPI when launched by mpirun, else the trivial world-size-1 group.
    host: Box<dyn Collective>,
}

/// A failed NCCL call; a remote error (a peer's failure reaching this rank) is a peer failure.
fn nccl_err(what: &str, e: nr::NcclError) -> crate::Error {
    match e.0 {
        ns::ncclResult_t::ncclRemoteError => crate::Error::Peer(format!("NCCL {what}: {e:?}")),
        _ => crate::Error::Dist(format!("NCCL {what}: {e:?}")),
    }
}

fn dtype(kind: Kind) -> Result<ns::ncclDataType_t> {
    Ok(match kind {
        Kind::Float => ns::ncclDataType_t::ncclFloat32,
        Kind::BFloat16 => ns::ncclDataType_t::ncclBfloat16,
        Kind::Half => ns::ncclDataType_t::ncclFloat16,
        Kind::Double => ns::ncclDataType_t::ncclFloat64,
        other => return Err(crate::Error::Dist(format!("NCCL: unsupported tensor kind {other:?}"))),
    })
}

fn check(t: &Tensor, what: &str) -> Result<()> {
    if !t.device().is_cuda() || !t.is_contiguous() {
        return Err(crate::Error::Dist(format!("NCCL {what}: tensor must be contiguous and on the GPU")));
    }
    Ok(())
}

impl Nccl {
    pub fn init(device: tch::Device) -> Result<Self> {
        // SAFETY: only probes for the shared library.
        if !unsafe { ns::is_culib_present() } {
            return Err(crate::Error::Dist(
                "libnccl.so not found on LD_LIBRARY_PATH (source launch/env.sh, which links the torch wheel's libnccl.so.2)".into(),
            ));
        }
        let host = host_channel()?;
        let (rank, world) = (host.rank(), host.world());
        let mut id_bytes = vec![0u8; 128];
        if rank == 0 {
            let id = nr::get_uniqueid().map_err(|e| nccl_err("get_uniqueid", e))?;
            for (b, c) in id_bytes.iter_mut().zip(id.internal.iter()) {
                *b = *c as u8;
            }
        }
        host.broadcast_bytes(&mut id_bytes, 0)?;
        let mut id = ns::ncclUniqueId { internal: [0; 128] };
        for (c, b) in id.internal.iter_mut().zip(id_bytes) {
            *c = b as std::os::raw::c_char;
        }
        // The rank's device was made current when it was resolved (`dist::rank_device`); a tch
        // allocation there creates the runtime's state before NCCL looks for it.
        let _warm = Tensor::zeros([1], (Kind::Float, device));
        let mut comm: ns::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is identical on every rank.
        unsafe { nr::comm_init_rank(&mut comm, world as i32, id, rank as i32) }.map_err(|e| nccl_err("comm_init_rank", e))?;
        super::world::hold_nccl(comm);
        // SAFETY: a live communicator.
        let on = unsafe { nr::comm_cu_device(comm) }.map_err(|e| nccl_err("comm_cu_device", e))?;
        if let tch::Device::Cuda(want) = device {
            if on as usize != want {
                return Err(crate::Error::Dist(format!(
                    "rank {rank}: the NCCL communicator is on cuda:{on} but this rank computes on cuda:{want}; \
                     give each rank its own GPU (launch/mpirun.sh sets CUDA_VISIBLE_DEVICES from the local rank)"
                )));
            }
        }
        watch_async_errors(comm);
        let version = nr::get_nccl_version().unwrap_or(0);
        tracing::info!("NCCL {version}: rank {rank} of {world} on {device:?}");
        Ok(Nccl { comm, rank, world, host })
    }

    /// After enqueueing `what`: in flight for the watchdog until the GPU has run it.
    fn track(&self, what: &str, elems: usize) -> Result<()> {
        let done = Completion::record()?;
        watchdog::until(format!("nccl {what} of {elems} elements"), move || done.poll());
        Ok(())
    }
}

/// Let the watchdog poll the communicator's asynchronous error (a peer's failure, a network
/// error): NCCL reports them there, not through the calls, which return once enqueued.
fn watch_async_errors(comm: ns::ncclComm_t) {
    let addr = comm as usize;
    watchdog::health_check(move || {
        let mut state = ns::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is held until the process ends (dist::world); the query is
        // thread-safe.
        let rc = unsafe { ns::ncclCommGetAsyncError(addr as ns::ncclComm_t, &mut state) };
        match (rc, state) {
            (ns::ncclResult_t::ncclSuccess, ns::ncclResult_t::ncclSuccess | ns::ncclResult_t::ncclInProgress) => None,
            (ns::ncclResult_t::ncclSuccess, e) => Some(format!("NCCL reports {e:?} on the communicator")),
            (e, _) => Some(format!("ncclCommGetAsyncError failed: {e:?}")),
        }
    });
}

#[cfg(feature = "mpi")]
fn host_channel() -> Result<Box<dyn Collective>> {
    if super::launcher_world_size() > 1 || std::env::var("OMPI_COMM_WORLD_SIZE").is_ok() {
        return Ok(Box::new(super::mpi::Mpi::init()?));
    }
    Ok(Box::new(Local))
}
#[cfg(not(feature = "mpi"))]
fn host_channel() -> Result<Box<dyn Collective>> {
    if super::launcher_world_size() > 1 {
        return Err(crate::Error::Dist("several ranks need the `mpi` feature to bootstrap NCCL".into()));
    }
    Ok(Box::new(Local))
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        check(t, "all_reduce")?;
        let _g = watchdog::enter("nccl all_reduce (enqueue)");
        let ptr = t.data_ptr();
        // SAFETY: in-place all-reduce on a contiguous device buffer of numel elements.
        unsafe {
            nr::all_reduce(ptr as *const c_void, ptr, t.numel(), dtype(t.kind())?, ns::ncclRedOp_t::ncclSum, self.comm, std::ptr::null_mut())
        }
        .map_err(|e| nccl_err("all_reduce", e))?;
        self.track("all_reduce", t.numel())
    }
    fn reduce_scatter_sum(&self, full: &Tensor, shard: &mut Tensor) -> Result<()> {
        check(full, "reduce_scatter")?;
        check(shard, "reduce_scatter")?;
        if full.numel() != shard.numel() * self.world || full.kind() != shard.kind() {
            return Err(crate::Error::Dist("NCCL reduce_scatter: buffer sizes or kinds disagree".into()));
        }
        let _g = watchdog::enter("nccl reduce_scatter (enqueue)");
        // SAFETY: sizes checked above.
        unsafe {
            nr::reduce_scatter(
                full.data_ptr() as *const c_void,
                shard.data_ptr(),
                shard.numel(),
                dtype(full.kind())?,
                ns::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_err("reduce_scatter", e))?;
        self.track("reduce_scatter", full.numel())
    }
    fn all_gather(&self, shard: &Tensor, full: &mut Tensor) -> Result<()> {
        check(full, "all_gather")?;
        check(shard, "all_gather")?;
        if full.numel() != shard.numel() * self.world || full.kind() != shard.kind() {
            return Err(crate::Error::Dist("NCCL all_gather: buffer sizes or kinds disagree".into()));
        }
        let _g = watchdog::enter("nccl all_gather (enqueue)");
        // SAFETY: sizes checked above.
        unsafe {
            nr::all_gather(shard.data_ptr() as *const c_void, full.data_ptr(), shard.numel(), dtype(full.kind())?, self.comm, std::ptr::null_mut())
        }
        .map_err(|e| nccl_err("all_gather", e))?;
        self.track("all_gather", full.numel())
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        check(t, "broadcast")?;
        let _g = watchdog::enter("nccl broadcast (enqueue)");
        let ptr = t.data_ptr();
        // SAFETY: in-place broadcast on a contiguous device buffer.
        unsafe { nr::broadcast(ptr as *const c_void, ptr, t.numel(), dtype(t.kind())?, root as i32, self.comm, std::ptr::null_mut()) }
            .map_err(|e| nccl_err("broadcast", e))?;
        self.track("broadcast", t.numel())
    }
    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<()> {
        self.host.all_reduce_f64(v)
    }
    fn all_reduce_max_f64(&self, v: &mut [f64]) -> Result<()> {
        self.host.all_reduce_max_f64(v)
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.host.broadcast_bytes(bytes, root)
    }
    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        // dist::world aborts every held communicator (this one included), then MPI.
        super::world::abort_world(code)
    }
}

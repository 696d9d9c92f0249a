//! The CUDA driver calls the distribution needs (through cudarc, loaded at run time): making this
//! rank's GPU current before anything is allocated, and knowing when an enqueued collective has
//! completed on the GPU, for the watchdog.

use cudarc::driver::{result as dr, sys as ds};

use crate::Result;

fn driver_err(what: &str, e: impl std::fmt::Debug) -> crate::Error {
    crate::Error::Dist(format!("CUDA driver {what}: {e:?}"))
}

/// Make GPU `index` current on this thread, through its primary context: the context the CUDA
/// runtime (libtorch, NCCL) uses for that device, so every later allocation, kernel and NCCL
/// communicator of this rank lands on it (without this, NCCL takes whatever `cudaGetDevice`
/// returns, device 0 on a node where every rank sees every GPU).
pub fn select_device(index: usize) -> Result<()> {
    dr::init().map_err(|e| driver_err("cuInit", e))?;
    let dev = dr::device::get(index as i32).map_err(|e| driver_err(&format!("cuDeviceGet({index})"), e))?;
    // SAFETY: `dev` comes from cuDeviceGet; the primary context is retained for the process's life.
    unsafe {
        let ctx = dr::primary_ctx::retain(dev).map_err(|e| driver_err("cuDevicePrimaryCtxRetain", e))?;
        dr::ctx::set_current(ctx).map_err(|e| driver_err("cuCtxSetCurrent", e))?;
    }
    Ok(())
}

/// An event recorded on the NCCL backend's communication stream after an enqueued collective:
/// complete when the collective is. The watchdog owns it and polls it from its own thread.
pub struct Completion {
    event: ds::CUevent,
    ctx: ds::CUcontext,
}

// SAFETY: a CUDA event and context may be used from any thread once the context is made current
// there, which `poll` does.
unsafe impl Send for Completion {}

impl Completion {
    /// Record the point `stream` has reached.
    pub fn record(stream: ds::CUstream) -> Result<Completion> {
        let ctx = dr::ctx::get_current()
            .map_err(|e| driver_err("cuCtxGetCurrent", e))?
            .ok_or_else(|| driver_err("cuCtxGetCurrent", "no current context"))?;
        let event = dr::event::create(ds::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| driver_err("cuEventCreate", e))?;
        // SAFETY: a fresh event, recorded on a live stream of the current context.
        unsafe { dr::event::record(event, stream) }.map_err(|e| driver_err("cuEventRecord", e))?;
        Ok(Completion { event, ctx })
    }

    /// Whether the GPU has passed the event (from any thread).
    pub fn poll(&self) -> super::watchdog::Poll {
        use super::watchdog::Poll;
        // SAFETY: the context is the one the event was created in; the event is live until drop.
        unsafe {
            if let Err(e) = dr::ctx::set_current(self.ctx) {
                return Poll::Failed(format!("cuCtxSetCurrent: {e:?}"));
            }
            match dr::event::query(self.event) {
                Ok(()) => Poll::Done,
                Err(dr::DriverError(ds::cudaError_enum::CUDA_ERROR_NOT_READY)) => Poll::Pending,
                Err(e) => Poll::Failed(format!("the GPU reported {e:?}")),
            }
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // SAFETY: created by `record`, destroyed once (CUDA releases a pending event on completion).
        unsafe {
            let _ = dr::ctx::set_current(self.ctx);
            let _ = dr::event::destroy(self.event);
        }
    }
}

/// Total memory of the current device in bytes, when the driver library can be loaded.
pub fn total_memory() -> Option<u64> {
    // SAFETY: only probes for the driver library.
    if !unsafe { ds::is_culib_present() } {
        return None;
    }
    dr::mem_get_info().ok().map(|(_, total)| total as u64)
}

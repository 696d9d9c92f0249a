//! MPI backend (rsmpi) on CPU tensors: the backend the multi-rank tests use, and the bootstrap
//! channel of the NCCL backend. bf16 buffers are widened to f32 on the host for reductions (MPI
//! has no bf16 type and summing in f32 is what we want anyway) and moved as-is otherwise.

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

use super::watchdog::{self, Guard};
use super::{f32_slice, f32_slice_mut, Collective};
use crate::Result;

/// MPI counts are C ints: move large buffers in pieces.
const CHUNK: usize = 1 << 28;

/// The watchdog's record of one blocking MPI call.
fn watch(op: &str, elems: usize) -> Guard {
    watchdog::enter(format!("mpi {op} of {elems} elements"))
}

/// The world communicator. MPI itself is initialised and finalized by `dist::world`, never by a
/// drop of this (see there why).
pub struct Mpi {
    world: SimpleCommunicator,
    /// Send buffer reused across all-reduces (rsmpi has no MPI_IN_PLACE): one bucket, allocated once.
    scratch: std::cell::RefCell<Vec<f32>>,
}

impl Mpi {
    pub fn init() -> Result<Self> {
        Ok(Mpi { world: super::world::mpi_world()?, scratch: Default::default() })
    }

    /// Run `f` on an f32 CPU version of `t` and write the result back when `t` is not one.
    fn with_f32(t: &mut Tensor, f: impl FnOnce(&mut Tensor)) {
        if t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous() {
            f(t);
        } else {
            let mut tmp = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            f(&mut tmp);
            t.copy_(&tmp);
        }
    }

    fn f32_cpu(t: &Tensor) -> Tensor {
        if t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous() {
            t.shallow_clone()
        } else {
            t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous()
        }
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world(&self) -> usize {
        self.world.size() as usize
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        let _g = watch("all_reduce_sum", t.numel());
        Self::with_f32(t, |t| {
            // SAFETY: contiguous CPU f32, exclusively borrowed.
            let data = unsafe { f32_slice_mut(t) };
            let mut send = self.scratch.borrow_mut();
            for piece in data.chunks_mut(CHUNK) {
                send.clear();
                send.extend_from_slice(piece);
                self.world.all_reduce_into(&send[..], piece, SystemOperation::sum());
            }
        });
        Ok(())
    }

    fn reduce_scatter_sum(&self, full: &Tensor, shard: &mut Tensor) -> Result<()> {
        let n = shard.numel();
        let w = self.world();
        let _g = watch("reduce_scatter_sum", n * w);
        if full.numel() != n * w {
            return Err(crate::other!("reduce_scatter: full has {} elements, expected {w} x {n}", full.numel()));
        }
        let full32 = Self::f32_cpu(full);
        // SAFETY: contiguous CPU f32.
        let send = unsafe { f32_slice(&full32) };
        Self::with_f32(shard, |shard| {
            let recv = unsafe { f32_slice_mut(shard) };
            if n <= CHUNK {
                self.world.reduce_scatter_block_into(send, recv, SystemOperation::sum());
            } else {
                // Scatter piece by piece: block r of every piece goes to rank r.
                let mut off = 0;
                while off < n {
                    let len = CHUNK.min(n - off);
                    let mut piece = Vec::with_capacity(len * w);
                    for r in 0..w {
                        piece.extend_from_slice(&send[r * n + off..r * n + off + len]);
                    }
                    self.world.reduce_scatter_block_into(&piece[..], &mut recv[off..off + len], SystemOperation::sum());
                    off += len;
                }
            }
        });
        Ok(())
    }

    fn all_gather(&self, shard: &Tensor, full: &mut Tensor) -> Result<()> {
        let n = shard.numel();
        let w = self.world();
        let _g = watch("all_gather", n * w);
        if full.numel() != n * w {
            return Err(crate::other!("all_gather: full has {} elements, expected {w} x {n}", full.numel()));
        }
        let shard32 = Self::f32_cpu(shard);
        let send = unsafe { f32_slice(&shard32) };
        Self::with_f32(full, |full| {
            let recv = unsafe { f32_slice_mut(full) };
            if n <= CHUNK {
                self.world.all_gather_into(send, recv);
            } else {
                let mut off = 0;
                while off < n {
                    let len = CHUNK.min(n - off);
                    let mut piece = vec![0f32; len * w];
                    self.world.all_gather_into(&send[off..off + len], &mut piece[..]);
                    for r in 0..w {
                        recv[r * n + off..r * n + off + len].copy_from_slice(&piece[r * len..(r + 1) * len]);
                    }
                    off += len;
                }
            }
        });
        Ok(())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let _g = watch(&format!("broadcast from rank {root}"), t.numel());
        let root = self.world.process_at_rank(root as i32);
        Self::with_f32(t, |t| {
            let data = unsafe { f32_slice_mut(t) };
            for piece in data.chunks_mut(CHUNK) {
                root.broadcast_into(piece);
            }
        });
        Ok(())
    }

    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<()> {
        let _g = watch("all_reduce_f64", v.len());
        let send = v.to_vec();
        self.world.all_reduce_into(&send[..], v, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_max_f64(&self, v: &mut [f64]) -> Result<()> {
        let _g = watch("all_reduce_max_f64", v.len());
        let send = v.to_vec();
        self.world.all_reduce_into(&send[..], v, SystemOperation::max());
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        let _g = watch(&format!("broadcast_bytes from rank {root}"), bytes.len());
        let root_proc = self.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        root_proc.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        // An empty payload (a rank with no evaluation batch) has nothing to send, and Open MPI
        // rejects the dangling pointer of an empty slice (MPI_ERR_ARG); every rank knows `len`.
        if len > 0 {
            root_proc.broadcast_into(&mut bytes[..]);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let _g = watchdog::enter("mpi barrier");
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        super::world::abort_world(code)
    }
}

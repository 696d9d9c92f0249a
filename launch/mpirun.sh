#!/usr/bin/env bash
# Per-rank wrapper for `unlearn`: mpirun (or srun) starts this script once per GPU; it picks the
# rank's GPU, loads the environment and execs the binary with the arguments it was given.
#
# One node, 8 GPUs:
#   mpirun -np 8 --bind-to none launch/mpirun.sh run --config configs/muse-news-mean-teacher.toml
# The same, as a command to repeat after a preemption or a crash (resumes from the latest
# checkpoint in the directory, or starts there when it holds none; a stopped run exits 75):
#   mpirun -np 8 --bind-to none launch/mpirun.sh run --config configs/muse-news-mean-teacher.toml \
#     --resume runs/muse-news-mean-teacher
#
# Two nodes, 8 GPUs each (a hostfile with "node1 slots=8" and "node2 slots=8", or -H node1:8,node2:8).
# mpirun copies the environment only to ranks on its own node: name with -x what the others need.
#   mpirun -np 16 --hostfile hosts --map-by ppr:8:node --bind-to none \
#     -x PATH -x LD_LIBRARY_PATH -x UNLEARN_CACHE -x UNLEARN_BIN \
#     -x NCCL_DEBUG -x NCCL_SOCKET_IFNAME -x NCCL_IB_HCA \
#     launch/mpirun.sh run --config configs/muse-news-mean-teacher.toml
#   (same repository path on every node, e.g. a shared filesystem; launch/env.sh is sourced on each.)
#
# Under Slurm see launch/slurm.sbatch (srun --mpi=pmix launches this same script).
# CPU runs work the same way: `mpirun -np 2 launch/mpirun.sh run --config X` with model.device = "cpu".
#
# Per rank this script:
#  * reads the node-local rank (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, MPI_LOCALRANKID or
#    LOCAL_RANK) and sets CUDA_VISIBLE_DEVICES to that GPU, so the rank sees it as cuda:0 (the
#    device `model.device = "cuda"` uses). A CUDA_VISIBLE_DEVICES list set by the scheduler is
#    indexed by the local rank; a single entry is kept. UNLEARN_KEEP_GPUS=1 leaves it untouched.
#  * sources launch/env.sh if present (LD_LIBRARY_PATH for libtorch and libnccl.so, ORT_DYLIB_PATH);
#  * MALLOC_MMAP_THRESHOLD_=default keeps glibc's adaptive mmap threshold (otherwise the binary
#    pins it to 1 MiB so that freed tensors go back to the OS: with the adaptive threshold, freed
#    activations of a few MiB stay resident and a CPU rank's peak RSS was measured up to 1.5× its
#    live tensors, see benches/plan_rss.sh);
#  * execs $UNLEARN_BIN (default target/release/unlearn) with the environment it was given.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

local_rank=${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-${MPI_LOCALRANKID:-${LOCAL_RANK:-0}}}}

if [ -f "$HERE/env.sh" ]; then
  # shellcheck disable=SC1091
  . "$HERE/env.sh"
fi

if [ "${UNLEARN_KEEP_GPUS:-0}" != 1 ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
    if [ "${#gpus[@]}" -gt 1 ]; then
      if [ "$local_rank" -ge "${#gpus[@]}" ]; then
        echo "launch/mpirun.sh: local rank $local_rank but only ${#gpus[@]} GPUs in CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >&2
        exit 1
      fi
      export CUDA_VISIBLE_DEVICES=${gpus[$local_rank]}
    fi
  else
    export CUDA_VISIBLE_DEVICES=$local_rank
  fi
fi

if [ "${MALLOC_MMAP_THRESHOLD_:-}" = default ]; then
  # glibc cannot parse "default": drop it, and tell the binary not to pin the threshold itself.
  unset MALLOC_MMAP_THRESHOLD_
  export UNLEARN_GLIBC_MALLOC=1
fi

BIN=${UNLEARN_BIN:-$REPO/target/release/unlearn}
if [ ! -x "$BIN" ]; then
  echo "launch/mpirun.sh: $BIN is not an executable (cargo build --release, or set UNLEARN_BIN)" >&2
  exit 1
fi
exec "$BIN" "$@"

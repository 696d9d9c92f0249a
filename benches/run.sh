#!/usr/bin/env bash
# unlearn side by side with PyTorch, in one run (issue 11 item 7): optimizer-step time and peak RSS
# for finetune / ngdiff / mean-teacher against benches/torch_step.py, MPI weak scaling with the
# exposed-communication share, TOFU evaluation throughput against transformers `generate`, and a
# GPU section that runs only where a CUDA device is present. Writes bench-results/results.json and
# bench-results/results.md (output, ignored by git; benches/README.md quotes the latest table).
#
#   . launch/env.sh && cargo build --release
#   benches/run.sh [bench.py options]      # e.g. --sections step --methods finetune --rounds 2
#
# About 15 minutes on 2 idle cores; needs ~13 GiB free (both sides of a comparison are resident
# together, so that their steps can alternate). See benches/bench.py for what each section does.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${UNLEARN_PYTHON:?source launch/env.sh first (UNLEARN_PYTHON, LD_LIBRARY_PATH)}
BIN=${UNLEARN_BIN:-$REPO/target/release/unlearn}
[ -x "$BIN" ] || { echo "build first: cargo build --release ($BIN missing)" >&2; exit 1; }
command -v /usr/bin/time >/dev/null || { echo "GNU time (/usr/bin/time) is needed for peak RSS" >&2; exit 1; }
exec "$PY" "$REPO/benches/bench.py" --bin "$BIN" "$@"

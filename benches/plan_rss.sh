#!/usr/bin/env bash
# Does `unlearn plan` predict what a rank really holds? Runs two training steps (the second one
# has every resident buffer, SGD momentum included) under
# `mpirun -np 2` on the CPU (fp32) and compares each rank's peak RSS (GNU time's "Maximum resident
# set size", i.e. VmHWM) with the plan's peak per rank. Prints the figures; not a cargo test.
#
#   . launch/env.sh            # or /work/main/launch/env.sh
#   cargo build --release
#   benches/plan_rss.sh [CASE...]     # default: w7b act-plain act-recompute-z3
#
# Cases (models are random, made once by tests/py/hf_ref.py make-model under $PLAN_RSS_DIR):
#   w7b            Llama-2-7B width (hidden 4096, 32 heads, MLP 11008, vocab 32000), 1 layer;
#                  mean teacher, ZeRO-2, teacher gathered, 1 × 256 tokens per rank. Peak: the update.
#                  About 6.4 GiB per rank: run it only with ~14 GiB free.
#   act-plain      hidden 512, 8 layers, vocab 320; mean teacher, ZeRO-2, plain executor,
#                  4 × 1024 tokens per rank. Peak: activations of the forward/backward.
#   act-recompute-z3  the same model with ZeRO-3 (layer-wise executor), teacher replica.
#
# The binary pins glibc's mmap threshold (1 MiB); PLAN_RSS_GLIBC_DEFAULT=1
# runs them with glibc's adaptive threshold instead, to see what heap retention adds.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${UNLEARN_BIN:-$REPO/target/release/unlearn}
PY=${UNLEARN_PYTHON:?source launch/env.sh first (UNLEARN_PYTHON, LD_LIBRARY_PATH)}
WORK=${PLAN_RSS_DIR:-${UNLEARN_CACHE:-$HOME/.cache/unlearn}/plan_rss}
TOL=${PLAN_RSS_TOL:-0.15}
mkdir -p "$WORK"
[ -x "$BIN" ] || { echo "build first: cargo build --release ($BIN missing)" >&2; exit 1; }

# Long texts (every example is truncated to max_len, so no batch is padded).
data() {
  local f=$WORK/$1.json
  [ -f "$f" ] && return
  local s="The author was born in a small town near the sea and wrote many books about history, war and family life. "
  local body
  body=$(printf '%.0s'"$s" $(seq 1 120))
  {
    printf '['
    for i in $(seq 0 63); do
      [ "$i" -gt 0 ] && printf ','
      printf '"%s %d. %s"' "$1" "$i" "$body"
    done
    printf ']\n'
  } > "$f"
}

model() { # name, config JSON
  local dir=$WORK/$1
  [ -f "$dir/model.safetensors" ] && return
  echo "making $dir" >&2
  "$PY" "$REPO/tests/py/hf_ref.py" make-model --out "$dir" --config "$2" --seed 1 --tokenizer bytebpe >/dev/null 2>&1
}

# name, model, global batch, max_len, zero, recompute, teacher
run_case() {
  local name=$1 model=$2 batch=$3 len=$4 zero=$5 recompute=$6 teacher=$7
  local dir=$WORK/run-$name cfg=$WORK/$name.toml
  rm -rf "$dir"
  mkdir -p "$dir"
  cat > "$cfg" <<EOF
[model]
path = "$WORK/$model"
device = "cpu"
dtype = "fp32"
[data]
forget = ["$WORK/forget.json"]
retain = ["$WORK/retain.json"]
retain_overflow = "truncate"
[method]
name = "mean-teacher"
[optim]
name = "sgd"
lr = 0.01
momentum = 0.9
[train]
steps = 2
batch_size = $batch
max_len = $len
recompute = $recompute
out_dir = "$dir/out"
[dist]
zero = $zero
teacher = "$teacher"
EOF
  local plan_json predicted
  plan_json=$("$BIN" plan --config "$cfg" --world-size 2 --json)
  predicted=$(jq -r '.peak_bytes' <<< "$plan_json")
  local phase
  phase=$(jq -r '.peak_phase' <<< "$plan_json")
  local need=$(( $(printf '%.0f' "$predicted") * 2 * 13 / 10 / 1024 ))
  local avail
  avail=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
  if [ "$avail" -lt "$need" ]; then
    echo "$name: skipped: needs ~$((need / 1048576)) GiB available, $((avail / 1048576)) GiB are" >&2
    return
  fi
  local malloc=()
  [ "${PLAN_RSS_GLIBC_DEFAULT:-0}" = 1 ] && malloc=(-x MALLOC_MMAP_THRESHOLD_=default)
  local t0=$SECONDS
  # Every rank writes GNU time's report to its own file.
  mpirun -np 2 "${malloc[@]}" \
    sh -c '/usr/bin/time -v -o "$0/time.$OMPI_COMM_WORLD_RANK" "$1/launch/mpirun.sh" run --config "$2"' "$dir" "$REPO" "$cfg" \
    > "$dir/log" 2>&1 || { echo "$name: run failed, see $dir/log" >&2; tail -5 "$dir/log" >&2; return 1; }
  for r in 0 1; do
    local kb
    kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$dir/time.$r")
    awk -v name="$name" -v r="$r" -v kb="$kb" -v p="$predicted" -v tol="$TOL" -v phase="$phase" -v s=$((SECONDS - t0)) 'BEGIN {
      m = kb * 1024; e = (p - m) / m;
      printf "%-18s rank %d: measured peak RSS %7.3f GiB, plan %7.3f GiB (%s), plan/measured - 1 = %+6.1f%%  %s  [%ds]\n",
        name, r, m / 2^30, p / 2^30, phase, 100 * e, (e <= tol && e >= -tol) ? "OK" : "OUTSIDE " 100 * tol "%", s }'
  done
}

data forget
data retain
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(w7b act-plain act-recompute-z3)
for c in "${cases[@]}"; do
  case $c in
    w7b)
      model w7b-l1 '{"hidden_size":4096,"num_attention_heads":32,"num_key_value_heads":32,"intermediate_size":11008,"vocab_size":32000,"num_hidden_layers":1,"max_position_embeddings":4096}'
      run_case w7b w7b-l1 2 256 2 false gather ;;
    act-plain)
      model act-l8 '{"hidden_size":512,"num_attention_heads":8,"num_key_value_heads":8,"intermediate_size":1376,"num_hidden_layers":8,"max_position_embeddings":4096}'
      run_case act-plain act-l8 8 1024 2 false replica ;;
    act-recompute-z3)
      model act-l8 '{"hidden_size":512,"num_attention_heads":8,"num_key_value_heads":8,"intermediate_size":1376,"num_hidden_layers":8,"max_position_embeddings":4096}'
      run_case act-recompute-z3 act-l8 8 1024 3 true replica ;;
    *) echo "unknown case $c (w7b, act-plain, act-recompute-z3)" >&2; exit 2 ;;
  esac
done

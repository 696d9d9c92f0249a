#!/usr/bin/env bash
# GPU smoke check for any CUDA machine with the project's Python image (torch, transformers,
# safetensors, onnxruntime, nvidia-nccl): builds nothing. The binary is carried, built elsewhere
# with `cargo build --release --no-default-features --features cuda` (no MPI on the GPU image).
#
#   launch/gpu_check.sh                  # UNLEARN_BIN=path/to/unlearn to use another binary
#
# 1. environment from the image's Python: LD_LIBRARY_PATH (torch/lib, libnccl.so linked from the
#    nvidia-nccl wheel), ORT_DYLIB_PATH;
# 2. a tiny random Llama (tests/py/hf_ref.py make-model, tokenizer trained on generated text);
# 3. `unlearn comm-check --backend nccl --device cuda`: every collective through NCCL at world
#    size 1, results checked exactly;
#    comm-check includes collectives started while compute kernels run and waited for at the end
#    (the communication stream ordered by CUDA events, buffers kept alive by the handles);
# 4. one step of every method with `dist.backend = "nccl"` on CUDA and the same step on the CPU
#    (`dist.backend = "none"`), both fp32; the final weights compared (tests/py/weights_diff.py):
#    max relative weight difference and relative difference of the two updates; plus mean
#    teacher under ZeRO-3 with its teacher gathered per layer (layers prefetched one ahead);
# 5. NGDiff in bf16 on CUDA with an AutoLR probe every step: the probes run in fp32 on the master
#    weights, so the three probe losses must be finite and resolve the probe step (L(w+ηd) and
#    L(w-ηd) differ; on the bf16 replica a 1e-5 step is below the weights' resolution);
# 6. a summary; exit status 1 if anything failed or an update differs by more than GPU_CHECK_TOL
#    (default 1e-3 relative: fp32 CUDA and CPU kernels sum in different orders, nothing more).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${UNLEARN_BIN:-$REPO/target/release/unlearn}
PY=${UNLEARN_PYTHON:-python3}
TOL=${GPU_CHECK_TOL:-1e-3}
# GPU_CHECK_DEVICE=cpu dry-runs the script on a machine without a GPU (the "cuda" side then runs on
# the CPU with dist.backend = "none", so both sides must agree exactly).
GPU_SIDE=${GPU_CHECK_DEVICE:-cuda}
GPU_BACKEND=$([ "$GPU_SIDE" = cuda ] && echo nccl || echo none)
WORK=${GPU_CHECK_DIR:-$(mktemp -d /tmp/unlearn-gpu-check.XXXXXX)}
mkdir -p "$WORK"
log() { printf '[gpu_check] %s\n' "$*" >&2; }
summary=()
failed=0
note() { summary+=("$1"); }
fail() { summary+=("FAIL $1"); failed=1; }

# 1. Environment.
SITE=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') || { log "no torch in $PY"; exit 1; }
TORCH_LIB=$SITE/torch/lib
NCCL_SO=$(ls "$SITE"/nvidia/nccl/lib/libnccl.so.2 "$TORCH_LIB"/libnccl.so.2 2>/dev/null | head -n1)
mkdir -p "$WORK/lib"
if [ -n "$NCCL_SO" ]; then
  ln -sf "$NCCL_SO" "$WORK/lib/libnccl.so" # cudarc opens libnccl.so, the wheel ships libnccl.so.2
else
  log "no libnccl.so.2 under $SITE (pip package nvidia-nccl-cu13)"
fi
export LD_LIBRARY_PATH="$TORCH_LIB:$WORK/lib:${LD_LIBRARY_PATH:-}"
ORT=$(ls "$SITE"/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1)
[ -n "$ORT" ] && export ORT_DYLIB_PATH=$ORT
log "torch $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'), nccl ${NCCL_SO:-missing}"
[ -x "$BIN" ] || { log "$BIN missing: carry a binary built with --no-default-features --features cuda"; exit 1; }
"$BIN" --version >&2 || { log "$BIN does not start (missing libraries?)"; ldd "$BIN" | grep "not found" >&2; exit 1; }

# 2. A tiny random model and data (nothing from the shared data directory is needed).
words=(author book wrote city river mother father war peace night garden letter teacher music)
gen_text() { # n words, deterministic
  local n=$1 out="" i
  for ((i = 0; i < n; i++)); do out+="${words[$(( (i * 7 + i / 3) % ${#words[@]} ))]} "; done
  printf '%s' "$out"
}
{
  printf '['
  for i in $(seq 0 40); do [ "$i" -gt 0 ] && printf ','; printf '"%s"' "$(gen_text $((30 + i)))"; done
  printf ']\n'
} > "$WORK/texts.json"
qa() { # file, count, offset
  {
    printf '['
    for i in $(seq 0 $(($2 - 1))); do
      [ "$i" -gt 0 ] && printf ','
      printf '{"question": "Who is author %d?", "answer": "%s"}' $((i + $3)) "$(gen_text $((8 + (i + $3) % 9)))"
    done
    printf ']\n'
  } > "$1"
}
qa "$WORK/forget.json" 8 0
qa "$WORK/retain.json" 8 100
if [ ! -f "$WORK/model/model.safetensors" ]; then
  "$PY" "$REPO/tests/py/hf_ref.py" make-model --out "$WORK/model" --config '{"num_key_value_heads": 2}' \
    --seed 5 --tokenizer bytebpe --texts "$WORK/texts.json" > /dev/null || { log "make-model failed"; exit 1; }
fi

# 3. NCCL collectives at world size 1.
if out=$("$BIN" comm-check --backend "$GPU_BACKEND" --device "$GPU_SIDE" --elems 4194304 2>&1); then
  echo "$out" >&2
  note "comm-check $GPU_BACKEND on $GPU_SIDE (world 1): all collectives exact"
else
  echo "$out" >&2
  fail "comm-check nccl: $(echo "$out" | tail -n1)"
fi

# 4. One step of every method on CUDA (NCCL) and on the CPU.
method_toml() {
  case $1 in
    finetune | ga) echo "name = \"$1\"" ;;
    graddiff) printf 'name = "graddiff"\nretain_weight = 1.0' ;;
    npo) printf 'name = "npo"\nretain_weight = 1.0' ;;
    ngdiff) printf 'name = "ngdiff"\nautolr = true\nautolr_period = 1' ;;
    mean-teacher | mean-teacher-zero3-gather) printf 'name = "mean-teacher"\ndelta = 0.05\nclip = 0.5' ;;
  esac
}
dist_toml() {
  case $1 in
    mean-teacher-zero3-gather) printf 'zero = 3\nteacher = "gather"' ;;
  esac
}
optim_toml() {
  case $1 in
    mean-teacher | mean-teacher-zero3-gather) printf 'name = "sgd"\nlr = 0.1\nmomentum = 0.9' ;;
    *) printf 'name = "adamw"\nlr = 0.002' ;;
  esac
}
results=()
for m in finetune ga graddiff npo ngdiff mean-teacher mean-teacher-zero3-gather; do
  cat > "$WORK/$m.toml" <<EOF
[model]
path = "$WORK/model"
dtype = "fp32"
[data]
forget = ["$WORK/forget.json"]
retain = ["$WORK/retain.json"]
[method]
$(method_toml $m)
[optim]
$(optim_toml $m)
[train]
steps = 1
batch_size = 4
max_len = 64
out_dir = "$WORK/unused"
[dist]
$(dist_toml $m)
EOF
  ok=1
  for side in gpu cpu; do
    dev=$([ $side = gpu ] && echo "$GPU_SIDE" || echo cpu)
    backend=$([ $side = gpu ] && echo "$GPU_BACKEND" || echo none)
    rm -rf "$WORK/run-$m-$side"
    if ! "$BIN" run --config "$WORK/$m.toml" --set model.device="\"$dev\"" --set dist.backend="\"$backend\"" \
      --set train.out_dir="\"$WORK/run-$m-$side\"" > "$WORK/run-$m-$side.log" 2>&1; then
      fail "$m on $dev ($backend): run failed: $(tail -n1 "$WORK/run-$m-$side.log")"
      ok=0
    fi
  done
  [ $ok = 1 ] || continue
  if ! diff=$("$PY" "$REPO/tests/py/weights_diff.py" "$WORK/run-$m-gpu/final" "$WORK/run-$m-cpu/final" --init "$WORK/model"); then
    fail "$m: weights_diff failed"
    continue
  fi
  read -r max_rel update_rel update_norm < <("$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["max_rel"], d["update_rel"], d["update_norm"])' "$diff")
  # The step must have moved the weights, or the comparison proves nothing.
  verdict=$("$PY" -c 'import sys; u, n, t = sys.argv[1:4]; print("ok" if u != "None" and float(n) > 0 and float(u) <= float(t) else "FAIL")' "$update_rel" "$update_norm" "$TOL")
  line=$(printf "%-13s $GPU_SIDE($GPU_BACKEND) vs cpu: max rel weight diff %.2e, update rel diff %.2e (update norm %.2e)  %s" "$m" "$max_rel" "$update_rel" "$update_norm" "$verdict")
  if [ "$verdict" = ok ]; then note "$line"; else fail "$line"; fi
done

# 5. AutoLR probes in fp32 while the student computes in bf16.
if [ "$GPU_SIDE" = cuda ]; then
  rm -rf "$WORK/run-autolr-bf16"
  if "$BIN" run --config "$WORK/ngdiff.toml" --set model.device='"cuda"' --set model.dtype='"bf16"' --set dist.backend='"nccl"' \
    --set optim.lr=1e-5 --set train.steps=2 --set train.out_dir="\"$WORK/run-autolr-bf16\"" > "$WORK/run-autolr-bf16.log" 2>&1; then
    probe=$("$PY" -c '
import json, math, sys
fits = [json.loads(l).get("autolr") for l in open(sys.argv[1])]
f = [x for x in fits if x][0]
ok = all(math.isfinite(f[k]) for k in ("l_minus", "l_zero", "l_plus")) and f["l_minus"] != f["l_plus"]
print(("ok" if ok else "FAIL") + " L(w+ηd)=%.9g L(w)=%.9g L(w-ηd)=%.9g outcome %s" % (f["l_minus"], f["l_zero"], f["l_plus"], f["outcome"]))
' "$WORK/run-autolr-bf16/metrics.jsonl")
    case $probe in ok*) note "ngdiff bf16, AutoLR probes in fp32 at lr 1e-5: $probe" ;; *) fail "ngdiff bf16 AutoLR probes: $probe" ;; esac
  else
    fail "ngdiff bf16 with AutoLR: run failed: $(tail -n1 "$WORK/run-autolr-bf16.log")"
  fi
fi

echo
echo "gpu_check summary ($WORK):"
for s in "${summary[@]}"; do echo "  $s"; done
exit $failed

#!/usr/bin/env bash
# The main job, end to end on the embedded SmolLM2-135M-Instruct (CPU, fp32):
#   1. import the model (setup.sh does it once) and score the TOFU forget01 answers;
#   2. fine-tune a TOFU *target* on forget01 + 40 retained QA, and a *retain* model on the 40 alone;
#   3. unlearn forget01 from the target with NGDiff + AutoLR and with mean teacher + NLUL;
#   4. print forget/retain NLL before and after;
#   5. evaluate target, retain and both unlearned models on TOFU forget01 and print the table;
#   6. export the mean-teacher model to ONNX (KV cache, genai_config.json: optimum and
#      onnxruntime-genai load the directory as is) and verify it with onnxruntime against our logits.
# Everything lands in $UNLEARN_DEMO_OUT (default runs/demo), recreated on every run.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/launch/setup.sh"
# shellcheck disable=SC1091
. "$REPO/launch/env.sh"
cd "$REPO"
SHARED=${UNLEARN_SHARED:-$REPO/../shared}
TOFU=$SHARED/data/tofu
OUT=${UNLEARN_DEMO_OUT:-$REPO/runs/demo}
MODEL=$UNLEARN_CACHE/models/smollm2-135m-instruct
BIN=$REPO/target/release/unlearn
START=$(date +%s)
rm -rf "$OUT" && mkdir -p "$OUT"
say() { printf '\n== %s (%ds)\n' "$*" $(( $(date +%s) - START )); }
q() { printf '"%s"' "$1"; }

# Small data so that the whole demo fits in about 20 minutes on 2 CPU cores.
"$UNLEARN_PYTHON" - "$TOFU" "$OUT" <<'PY'
import json, sys
tofu, out = sys.argv[1], sys.argv[2]
retain = []
for line in open(f"{tofu}/retain99.json"):
    if line.strip():
        retain.extend(json.loads(line))
json.dump(retain[:40], open(f"{out}/retain40.json", "w"))
PY
FORGET=$TOFU/forget01.json
RETAIN=$OUT/retain40.json

# Mean answer NLL of model $1 on data $2. Its log goes to a file; a failed score stops the demo
# (the callers assign the result first, so that `set -e` sees the exit status).
mean_nll() {
  local line
  line=$("$BIN" score --model "$1" --data "$2" --out "$OUT/score-$3.jsonl" --max-len 256 --batch-size 8 2>"$OUT/score-$3.log") \
    || { echo "unlearn score failed, see $OUT/score-$3.log:" >&2; tail -n 5 "$OUT/score-$3.log" >&2; return 1; }
  awk '{print $2}' <<< "$line"
}

say "1. base model: score TOFU forget01"
base_nll=$(mean_nll "$MODEL" "$FORGET" base)
echo "SmolLM2-135M-Instruct forget01 answer NLL: $base_nll"

say "2. fine-tune the target (forget01 + retain40) and the retain model (retain40)"
FT=(--config configs/tofu-finetune.toml --set "model.path=$(q "$MODEL")" --set optim.lr=1e-4 --set optim.warmup_steps=2
    --set train.batch_size=8 --set train.checkpoint_every=0 --set train.log_every=5)
"$BIN" run "${FT[@]}" --set "data.retain=[$(q "$FORGET"), $(q "$RETAIN")]" --set train.steps=20 \
  --set "train.out_dir=$(q "$OUT/target")"
"$BIN" run "${FT[@]}" --set "data.retain=$(q "$RETAIN")" --set train.steps=10 --set "train.out_dir=$(q "$OUT/retain")"
TARGET=$OUT/target/final

say "3a. unlearn forget01 with NGDiff + AutoLR"
"$BIN" run --config configs/tofu-ngdiff.toml --set "model.path=$(q "$TARGET")" --set "data.retain=$(q "$RETAIN")" \
  --set optim.lr=1e-4 --set train.batch_size=4 --set train.steps=8 --set "train.out_dir=$(q "$OUT/ngdiff")"
say "3b. unlearn forget01 with mean teacher + NLUL"
"$BIN" run --config configs/tofu-mean-teacher.toml --set "model.path=$(q "$TARGET")" --set "data.retain=$(q "$RETAIN")" \
  --set method.alpha=1.0 --set method.beta=3 --set method.delta=0.1 --set optim.lr=0.05 --set train.batch_size=4 \
  --set train.grad_accum=1 --set train.steps=16 --set train.checkpoint_every=0 --set "train.out_dir=$(q "$OUT/mean-teacher")"

say "4. forget / retain NLL before and after"
printf '%-14s %12s %12s\n' model forget_NLL retain_NLL
for m in target ngdiff mean-teacher retain; do
  f=$(mean_nll "$OUT/$m/final" "$FORGET" "f-$m")
  r=$(mean_nll "$OUT/$m/final" "$RETAIN" "r-$m")
  printf '%-14s %12s %12s\n' "$m" "$f" "$r"
done

say "5. TOFU evaluation (forget quality against the retain model, model utility)"
EVAL=(--forget forget01 --data "$TOFU" --max-samples 15 --max-new-tokens 48)
"$BIN" eval tofu --model "$OUT/retain/final" "${EVAL[@]}" --out "$OUT/eval-retain"
for m in target ngdiff mean-teacher; do
  "$BIN" eval tofu --model "$OUT/$m/final" "${EVAL[@]}" --retain-stats "$OUT/eval-retain/report.json" --out "$OUT/eval-$m"
done
"$BIN" report --reports "$OUT/eval-target" "$OUT/eval-ngdiff" "$OUT/eval-mean-teacher" "$OUT/eval-retain" \
  --names target ngdiff mean-teacher retain --runs "$OUT/ngdiff" "$OUT/mean-teacher" --out "$OUT/report"
cat "$OUT/report/report.md"

say "6. export the mean-teacher model to ONNX and verify it with onnxruntime"
"$BIN" export --model "$OUT/mean-teacher/final" --out "$OUT/onnx" --dtype fp32
"$BIN" verify --model "$OUT/mean-teacher/final" --onnx "$OUT/onnx" --prompts "$FORGET" --out "$OUT/onnx/verify.json"

say "done: outputs in $OUT"

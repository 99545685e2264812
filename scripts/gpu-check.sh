#!/usr/bin/env bash
# GPU check: builds the CUDA extension, runs the CUDA tests and a short kernel benchmark,
# and writes logs and JSON into RESULTS_DIR.
#
#   scripts/gpu-check.sh RESULTS_DIR
#
# For a bare GPU machine with CUDA torch, nvcc, pytest, numpy, msgpack and ninja; no
# network, no node, no pyzmq, no .venv (python is $AMPIPE_PYTHON, else python3). The whole
# run stays under 8 minutes: each step has its own time budget, capped by what is left of
# the overall one ($GPU_CHECK_BUDGET_S, default 450 s).
#
# Layout of RESULTS_DIR: <step>.log for each step, steps.tsv (step, exit code, seconds),
# summary.json, and the JSON the steps write (kernels-bench*.json, *-junit.xml, env.json).
#
# Adding a step: one `step NAME BUDGET_S command...` line below. Steps run in order, each
# logging to its own file; a failed step does not stop the others, and the script exits
# non-zero at the end if any step failed.
set -u

if [ $# -ne 1 ]; then
  echo "usage: $0 RESULTS_DIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

PY="${AMPIPE_PYTHON:-python3}"
export PYTHONPATH="$ROOT/py${PYTHONPATH:+:$PYTHONPATH}"
export AMPIPE_EXT_DIR="${AMPIPE_EXT_DIR:-$ROOT/build/ext}"
export PYTHONDONTWRITEBYTECODE=1
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
START=$(date +%s)
FAILED=()
printf 'step\trc\tseconds\n' >"$OUT/steps.tsv"

# step NAME BUDGET_S CMD...: runs CMD with its output in $OUT/NAME.log, within BUDGET_S
# seconds or whatever is left of the overall budget.
step() {
  local name="$1" budget="$2"
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 10 ]; then
    echo "=== $name: SKIPPED (overall budget of ${BUDGET}s spent)" | tee "$OUT/$name.log"
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >>"$OUT/steps.tsv"
    FAILED+=("$name")
    return
  fi
  [ "$budget" -gt "$left" ] && budget="$left"
  printf "=== %s (budget %ss): %.100s\n" "$name" "$budget" "$*"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$budget" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  [ "$rc" -eq 124 ] && echo "--- timed out after ${budget}s" >>"$OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >>"$OUT/steps.tsv"
  if [ "$rc" -eq 0 ]; then
    echo "    ok (${dt}s)"
  else
    echo "    FAILED rc=$rc (${dt}s), last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/    | /'
    FAILED+=("$name")
  fi
}

# --- steps ----------------------------------------------------------------------------
step env 30 "$PY" -c '
import json, os, sys, shutil, subprocess, torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "nvcc": shutil.which("nvcc"), "cpus": os.cpu_count()}
if info["nvcc"]:
    info["nvcc_version"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
print(json.dumps(info, indent=2))
json.dump(info, open(sys.argv[1], "w"), indent=2)
assert info["cuda_available"], "no CUDA device visible to torch"
' "$OUT/env.json"

step build-ext 200 "$PY" -m ampipe.ops.build --verbose

step ops-tests-cuda 100 "$PY" -m pytest test/py/ops -m cuda -q -rs -p no:cacheprovider \
  --junitxml="$OUT/ops-tests-cuda-junit.xml"

step ops-tests-cpu 60 "$PY" -m pytest test/py/ops -m "not cuda" -q -rs -p no:cacheprovider \
  --junitxml="$OUT/ops-tests-cpu-junit.xml"

step kernels-bench-fp32 60 "$PY" -m ampipe.bench.kernels --device cuda --dtype fp32 \
  --json "$OUT/kernels-bench-fp32.json"

step kernels-bench-bf16 45 "$PY" -m ampipe.bench.kernels --device cuda --dtype bf16 \
  --json "$OUT/kernels-bench-bf16.json"

# --- pipelined block (py/ampipe/pipeline; owned by the executor) ------------------------
# Equivalence with the baseline block on CUDA in fp32 and bf16, and no host synchronisation
# inside the block (torch.cuda.set_sync_debug_mode("error") over a forward+backward).
step pipeline-tests-cuda 120 "$PY" -m pytest test/py/pipeline/test_pipeline_cuda.py -q -rs -p no:cacheprovider \
  --junitxml="$OUT/pipeline-tests-cuda-junit.xml"

# Baseline vs pipelined block on one GPU standing in for an emulated 8-way all-to-all.
step pipeline-bench-cuda 100 "$PY" -m ampipe.bench.pipeline --device cuda --world-size 8 \
  --set seq_length=4096 --set micro_batch_size=1 --set hidden_size=1024 \
  --set num_attention_heads=16 --set num_experts=8 --set moe_ffn_hidden_size=2048 \
  --plan sequential-p1 --plan interleaved-p2 --plan interleaved-p4 --plan grouped-p4 \
  --plan interleaved-p8 --iters 5 --json "$OUT/pipeline-bench-cuda.json"

# The same with a capacity factor: static shapes, so dispatch needs no host read of the
# token counts and the host never waits inside the block (dropless must wait, see docs).
step pipeline-bench-cuda-capacity 60 "$PY" -m ampipe.bench.pipeline --device cuda --world-size 8 \
  --set seq_length=4096 --set micro_batch_size=1 --set hidden_size=1024 \
  --set num_attention_heads=16 --set num_experts=8 --set moe_ffn_hidden_size=2048 \
  --set moe_expert_capacity_factor=1.25 --ratios 0.5,1.0 \
  --plan sequential-p1 --plan interleaved-p4 --plan interleaved-p8 --iters 5 \
  --json "$OUT/pipeline-bench-cuda-capacity.json"

if [ "${GPU_CHECK_FULL:-0}" = "1" ]; then
  step kernels-bench-full 150 "$PY" -m ampipe.bench.kernels --device cuda --full --reps 10 \
    --json "$OUT/kernels-bench-full.json"
fi

# --- summary --------------------------------------------------------------------------
TOTAL=$(($(date +%s) - START))
"$PY" - "$OUT" "$TOTAL" "${FAILED[@]+"${FAILED[@]}"}" <<'EOF'
import csv, json, sys
out, total, failed = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
with open(f"{out}/steps.tsv") as f:
    steps = [dict(r) for r in csv.DictReader(f, delimiter="\t")]
json.dump({"ok": not failed, "failed": failed, "seconds": total, "steps": steps},
          open(f"{out}/summary.json", "w"), indent=2)
EOF
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu-check: FAILED steps: ${FAILED[*]} (${TOTAL}s; logs in $OUT)"
  exit 1
fi
echo "gpu-check: all steps passed (${TOTAL}s; logs in $OUT)"

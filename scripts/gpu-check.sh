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
# summary.json (also the JUnit counts of the pytest steps), the files the steps write
# (env.json, *-junit.xml, kernels-bench*.json, pipeline-bench*.json), and results.tar.gz
# holding all of them. Where only a few files can be copied back from the machine, run
# it with RESULTS_DIR elsewhere and copy summary.json and results.tar.gz.
#
# Environment: AMPIPE_PYTHON (default python3), CUDA_HOME (default: from the nvcc on
# PATH, else /usr/local/cuda), AMPIPE_EXT_DIR (default build/ext), GPU_CHECK_BUDGET_S,
# GPU_CHECK_FULL=1 (adds the full kernel sweep), GPU_CHECK_SANITIZE=1 (adds compute-sanitizer
# runs of the kernels).
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
PY="${AMPIPE_PYTHON:-python3}"
case "$PY" in  # a relative path means relative to the caller's directory (a venv link kept)
  */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
esac
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu-check: no Python at '$PY' (set AMPIPE_PYTHON)" >&2
  exit 2
fi
# No editable install there: ampipe is imported from py/.
export PYTHONPATH="$ROOT/py${PYTHONPATH:+:$PYTHONPATH}"
# torch.utils.cpp_extension runs `ninja` and `nvcc` from PATH. A venv's python may be
# called by its path without the venv on PATH, and pip's ninja lives in that venv's bin.
PY_BIN="$("$PY" -c 'import os, sys; print(os.path.dirname(os.path.abspath(sys.executable)))' 2>/dev/null)"
NINJA_BIN="$("$PY" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null || true)"
export PATH="${PY_BIN:+$PY_BIN:}${NINJA_BIN:+$NINJA_BIN:}$PATH"
# CUDA_HOME: given, else the toolkit of the nvcc on PATH (symlinks resolved), else
# /usr/local/cuda; cpp_extension needs its include/ and lib64/, not just the nvcc binary.
if [ -z "${CUDA_HOME:-}" ]; then
  for c in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")" \
           /usr/local/cuda; do
    if [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then
      export CUDA_HOME="$c"
      break
    fi
  done
fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
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
# Order = value per second of device time: build, then the CUDA correctness tests, then the
# benchmarks; the CPU tests (CI runs them anyway) come last. Typical durations on one H200
# with 16 cores are guesses until the first run: see each step's seconds in steps.tsv.
# pytest steps: `-o timeout=60` bounds each test (pytest-timeout; an unknown ini key only
# warns without it), so one hung test fails alone and the JUnit XML is still written.
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider -o timeout=60 --durations=5)

step env 30 "$PY" -c '
import json, os, sys, shutil, subprocess, torch
info = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "nvcc": shutil.which("nvcc"), "ninja": shutil.which("ninja"),
        "cuda_home": os.environ.get("CUDA_HOME"), "cpus": os.cpu_count()}
if info["nvcc"]:
    info["nvcc_version"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
try:
    import flash_attn
    info["flash_attn"] = flash_attn.__version__
except Exception as exc:
    info["flash_attn"] = f"not importable: {type(exc).__name__}"
print(json.dumps(info, indent=2))
json.dump(info, open(sys.argv[1], "w"), indent=2)
assert info["cuda_available"], "no CUDA device visible to torch"
assert info["ninja"], "ninja is not on PATH (pip install ninja); the extension build needs it"
' "$OUT/env.json"

step build-ext 180 "$PY" -m ampipe.ops.build --verbose

step ops-tests-cuda 90 "${PYTEST[@]}" test/py/ops -m cuda --junitxml="$OUT/ops-tests-cuda-junit.xml"

# Opt-in (GPU_CHECK_SANITIZE=1): the ampipe kernels under compute-sanitizer (memcheck with
# the caching allocator off, so a read past a tensor is caught; racecheck for the shared-
# memory rank counters and block reductions; synccheck for the barriers), on shapes that
# hit every path: several make_row_map tiles, capacity drops, vector and scalar rows, an
# offset (misaligned) input, half types, empty rows.
SANITIZE_PY='
import torch
from ampipe.ops.loader import load_extension
assert load_extension(required=True).cuda, "extension built without CUDA kernels"
ops = torch.ops.ampipe
g = torch.Generator().manual_seed(0)
for T, K, E, H, dtype, cap in [(700, 2, 40, 64, torch.float32, None), (700, 2, 40, 13, torch.bfloat16, 20),
                               (33, 1, 3, 8, torch.float16, 0), (5, 4, 4, 1, torch.float64, 2)]:
    idx = torch.rand(T, E, generator=g).argsort(1)[:, :K].cuda()
    rm, tpe = ops.make_row_map(idx, E, cap)
    R = T * K if cap is None else E * cap
    x = torch.randn(T * H + 1, generator=g).to("cuda", dtype)[1:].view(T, H)  # offset storage
    gates = torch.rand(T, K, generator=g).to("cuda", dtype)
    buf = ops.permute(x, rm, R)
    out = ops.unpermute(buf, rm, gates)
    ops.unpermute(buf, rm, None)
    ops.unpermute_backward(torch.randn_like(out), buf, rm, gates)
torch.cuda.synchronize()
print("sanitized shapes ran")
'
if [ "${GPU_CHECK_SANITIZE:-0}" = "1" ]; then
  SANITIZER="$(command -v compute-sanitizer || true)"
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin" "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer"; do
    [ -z "$SANITIZER" ] && [ -x "$c/compute-sanitizer" ] && SANITIZER="$c/compute-sanitizer"
  done
  SANITIZER="${SANITIZER:-compute-sanitizer}"  # not found: the step fails saying so
  for tool in memcheck racecheck synccheck; do
    step "sanitize-$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
      --error-exitcode 1 --kernel-name kns=ampipe "$PY" -c "$SANITIZE_PY"
  done
fi

# Chunked attention on CUDA (SDPA lower-right, FlashAttention when installed) and the
# baseline block on CUDA against CPU.
step model-tests-cuda 60 "${PYTEST[@]}" test/py/model/test_cuda.py --junitxml="$OUT/model-tests-cuda-junit.xml"

# --- pipelined block (py/ampipe/pipeline; owned by the executor) ------------------------
# Equivalence with the baseline block on CUDA in fp32 and bf16, and no host synchronisation
# inside the block (torch.cuda.set_sync_debug_mode("error") over a forward+backward).
step pipeline-tests-cuda 100 "${PYTEST[@]}" test/py/pipeline/test_pipeline_cuda.py \
  --junitxml="$OUT/pipeline-tests-cuda-junit.xml"
# The Megatron-Core test double swapped for the pipelined block, on CUDA (docs/swap.md).
step adapter-tests-cuda 40 "${PYTEST[@]}" test/py/adapters -m cuda --junitxml="$OUT/adapter-tests-cuda-junit.xml"

step kernels-bench-fp32 45 "$PY" -m ampipe.bench.kernels --device cuda --dtype fp32 \
  --json "$OUT/kernels-bench-fp32.json"

step kernels-bench-bf16 30 "$PY" -m ampipe.bench.kernels --device cuda --dtype bf16 \
  --json "$OUT/kernels-bench-bf16.json"

# Baseline vs pipelined block on one GPU standing in for an emulated 8-way all-to-all.
step pipeline-bench-cuda 90 "$PY" -m ampipe.bench.pipeline --device cuda --world-size 8 \
  --set seq_length=4096 --set micro_batch_size=1 --set hidden_size=1024 \
  --set num_attention_heads=16 --set num_experts=8 --set moe_ffn_hidden_size=2048 \
  --plan sequential-p1 --plan interleaved-p2 --plan interleaved-p4 --plan grouped-p4 \
  --plan interleaved-p8 --iters 5 --overhead-iters 9 --json "$OUT/pipeline-bench-cuda.json"

# The same with a capacity factor: static shapes, so dispatch needs no host read of the
# token counts and the host never waits inside the block (dropless must wait, see docs).
step pipeline-bench-cuda-capacity 60 "$PY" -m ampipe.bench.pipeline --device cuda --world-size 8 \
  --set seq_length=4096 --set micro_batch_size=1 --set hidden_size=1024 \
  --set num_attention_heads=16 --set num_experts=8 --set moe_ffn_hidden_size=2048 \
  --set moe_expert_capacity_factor=1.25 --ratios 0.5,1.0 \
  --plan sequential-p1 --plan interleaved-p4 --plan interleaved-p8 --iters 5 --overhead-iters 5 \
  --json "$OUT/pipeline-bench-cuda-capacity.json"

# The CPU kernels built by this machine's compiler (CI covers them too: lowest value here).
step ops-tests-cpu 45 "${PYTEST[@]}" test/py/ops -m "not cuda" --junitxml="$OUT/ops-tests-cpu-junit.xml"

if [ "${GPU_CHECK_FULL:-0}" = "1" ]; then
  step kernels-bench-full 150 "$PY" -m ampipe.bench.kernels --device cuda --full --reps 10 \
    --json "$OUT/kernels-bench-full.json"
fi

# --- summary --------------------------------------------------------------------------
# summary.json: per step its exit code, seconds and, for pytest steps, the JUnit counts (a
# CUDA test step that passes with everything skipped is visible there). results.tar.gz
# bundles every file of RESULTS_DIR, to copy off a remote machine in one piece.
TOTAL=$(($(date +%s) - START))
"$PY" - "$OUT" "$TOTAL" "${FAILED[@]+"${FAILED[@]}"}" <<'EOF'
import csv, json, os, sys, tarfile
import xml.etree.ElementTree as ET
out, total, failed = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
with open(f"{out}/steps.tsv") as f:
    steps = [dict(r) for r in csv.DictReader(f, delimiter="\t")]
for s in steps:
    junit = f"{out}/{s['step']}-junit.xml"
    if os.path.exists(junit):
        try:
            root = ET.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            s["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        except (ET.ParseError, AttributeError, ValueError) as exc:
            s["tests"] = f"unreadable JUnit XML: {exc}"
json.dump({"ok": not failed, "failed": failed, "seconds": total, "steps": steps},
          open(f"{out}/summary.json", "w"), indent=2)
for s in steps:
    t = s.get("tests")
    counts = (f"  {t['tests']} tests, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
              if isinstance(t, dict) else "")
    print(f"  {s['step']:<30} rc={s['rc']:<8} {s['seconds']:>4}s{counts}")
with tarfile.open(f"{out}/results.tar.gz.tmp", "w:gz") as tar:
    for name in sorted(os.listdir(out)):
        if not name.startswith("results.tar.gz"):
            tar.add(f"{out}/{name}", arcname=f"gpu-check/{name}")
os.replace(f"{out}/results.tar.gz.tmp", f"{out}/results.tar.gz")
EOF
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu-check: FAILED steps: ${FAILED[*]} (${TOTAL}s; logs in $OUT)"
  exit 1
fi
echo "gpu-check: all steps passed (${TOTAL}s; logs in $OUT)"

#!/usr/bin/env bash
# What a session with a lent GPU runs, in one call, each stage in its own time box so that one
# that hangs cannot take the others' time:
#   e2e      scripts/bench.py: mistral-7b shapes, bf16, ours vs transformers (<= 240 s)
#   kernels  scripts/bench_kernels.py: each kernel vs SDPA / its eager reference (<= 100 s)
#   tests    the kernel and model tests on CUDA, four shards in parallel (<= 150 s)
#   model_tests  the model-level CUDA tests only (<= 150 s)
#   sweep    the kernel table again plus alternative tile configs, until SESSION_SECONDS
#   profile  scripts/profile_step.py: prefill and decode time by kernel family (<= 100 s)
#   e2e_b1   scripts/bench.py at batch 1 only, no transformers: a second timing of the headline
#
#     bash scripts/gpu_session.sh                      # e2e kernels tests sweep (~7 min)
#     bash scripts/gpu_session.sh profile sweep e2e_b1
#
# Everything lands in $OUT (else ./gpu_logs), at most 8 files as the device tool returns them:
# session.txt (this script's whole output), bench_e2e.json (copy it to bench/results/, then run
# scripts/bench_table.py), bench_kernels*.json, and logs.tar.gz with every stage's log.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-gpu_logs}
mkdir -p "$DEST"
export GPU_LOG=/tmp/gpu_logs
mkdir -p "$GPU_LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}  # the device image has python3, not always python
SECONDS=0
END=${SESSION_SECONDS:-450}

pack() {
  tar czf "$DEST/logs.tar.gz" -C "$(dirname "$GPU_LOG")" "$(basename "$GPU_LOG")" 2>/dev/null
  cp -f "$GPU_LOG"/*.json "$DEST"/ 2>/dev/null
  return 0
}

e2e() {
  timeout "${E2E_TIMEOUT:-240}" "$PY" scripts/bench.py --out "$GPU_LOG/bench_e2e.json" 2>&1 | tee "$GPU_LOG/bench_e2e.txt"
}
e2e_b1() {
  timeout 90 "$PY" scripts/bench.py --batches 1 --no-hf --runs 3 --out "$GPU_LOG/bench_e2e_b1.json" 2>&1 \
    | tee "$GPU_LOG/bench_e2e_b1.txt"
}
kernels() { BENCH_TIMEOUT=100 bash scripts/gpu_check.sh bench; }
tests() { SHARD_TIMEOUT=150 bash scripts/gpu_check.sh tests; }
sweep() { SWEEP_UNTIL=$((END - SECONDS)) bash scripts/gpu_check.sh sweep; }
model_tests() {  # the model-level CUDA tests alone (~40 s), when only the model code changed
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests -k "(triton or cuda or gpu or fuse) and not test_kernels" \
    2>&1 | tee "$GPU_LOG/model_tests.txt" | tail -n 15
}
profile() { timeout 100 "$PY" scripts/profile_step.py 2>&1 | tee "$GPU_LOG/profile.txt"; }

stages=${*:-e2e kernels tests sweep}
{
  for stage in $stages; do
    echo "== $stage at ${SECONDS}s"
    $stage
    pack
  done
  echo "gpu_session ($stages) done in ${SECONDS}s"
} 2>&1 | tee "$DEST/session.txt"

#!/usr/bin/env bash
# Everything a session with a lent GPU owes, in one call of 7 to 8 minutes (run it with a limit of
# ~560 s): the end-to-end benchmark (scripts/bench.py, mistral-7b shapes, bf16, vs transformers),
# the kernel benchmark, the CUDA tests, then a tile sweep with what is left. Each stage has its own
# time box, so one that hangs cannot take the others' time.
#
# Everything lands in $OUT (else ./gpu_logs), at most 8 files as the device tool returns them:
#   session.txt       this script's whole output
#   bench_e2e.json    scripts/bench.py's result: copy to bench/results/, then run scripts/bench_table.py
#   bench_kernels.json
#   logs.tar.gz       every stage's log (the test shards' pytest output included), refreshed per stage
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
  cp -f "$GPU_LOG"/bench_e2e.json "$GPU_LOG"/bench_kernels.json "$DEST"/ 2>/dev/null
  return 0
}

{
  echo "== end-to-end bench at ${SECONDS}s"
  timeout "${E2E_TIMEOUT:-240}" "$PY" scripts/bench.py --out "$GPU_LOG/bench_e2e.json" 2>&1 | tee "$GPU_LOG/bench_e2e.txt"
  pack
  BENCH_TIMEOUT=100 bash scripts/gpu_check.sh bench
  pack
  SHARD_TIMEOUT=150 bash scripts/gpu_check.sh tests
  pack
  SWEEP_UNTIL=$((END - SECONDS)) bash scripts/gpu_check.sh sweep
  pack
  echo "gpu_session done in ${SECONDS}s"
} 2>&1 | tee "$DEST/session.txt"

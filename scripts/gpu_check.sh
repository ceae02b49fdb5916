#!/usr/bin/env bash
# The kernel and model checks for a lent GPU (H100/H200), under 5 minutes: the kernel tests and the
# model tests that touch CUDA/triton, compiled, in fp32/fp16/bf16; then the kernel benchmark and a
# tile sweep with what is left. Uses the system torch/triton/transformers; nothing is installed.
#
#     bash scripts/gpu_check.sh                 # tests, bench, sweep
#     bash scripts/gpu_check.sh bench tests     # chosen stages, in that order
#
# Logs (and the kernel bench JSON) go to $GPU_LOG, else $OUT, else ./gpu_check_logs.
# SWEEP_UNTIL (seconds since start, default 285) bounds the sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${GPU_LOG:-${OUT:-gpu_check_logs}}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}  # the device image has python3, not always python
SECONDS=0
stages=${*:-tests bench sweep}
fail=0

run_shard() {  # name, pytest args...
  local name=$1; shift
  timeout "${SHARD_TIMEOUT:-170}" "$PY" -m pytest -q -p no:cacheprovider "$@" >"$LOG/test_$name.txt" 2>&1
  local rc=$?
  [ $rc -eq 5 ] && rc=0  # no test selected
  echo "$rc" >"$LOG/test_$name.rc"
}

tests() {  # four shards in parallel: Triton compiles are CPU-bound and single-threaded per process
  run_shard attention_fwd tests/test_kernels_attention.py -k "not realistic and not backward" &
  run_shard attention_bwd_real tests/test_kernels_attention.py -k "realistic or backward" &
  run_shard decode_small tests/test_kernels_decode.py tests/test_kernels_small.py &
  run_shard model tests -k "(triton or cuda or gpu) and not test_kernels" &
  wait
  for f in "$LOG"/test_*.rc; do
    local name rc
    name=$(basename "$f" .rc)
    rc=$(cat "$f")
    echo "== $name: rc=$rc  $(tail -n 1 "$LOG/$name.txt")"
    [ "$rc" != 0 ] && { fail=1; grep -E "^(FAILED|ERROR)" "$LOG/$name.txt" | head -20; }
  done
  echo "tests done at ${SECONDS}s, $([ $fail = 0 ] && echo passed || echo FAILED)"
}

bench() {
  timeout "${BENCH_TIMEOUT:-110}" "$PY" scripts/bench_kernels.py --json "$LOG/bench_kernels.json" 2>&1 \
    | tee "$LOG/bench_kernels.txt"
}

sweep() {  # the table again, then the alternative tiles
  local left=$((${SWEEP_UNTIL:-285} - SECONDS))
  if [ "$left" -gt 40 ]; then
    timeout "$left" "$PY" scripts/bench_kernels.py --sweep --json "$LOG/bench_kernels_sweep.json" 2>&1 \
      | tee "$LOG/bench_sweep.txt"
  else
    echo "sweep skipped: ${left}s left"
  fi
}

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$LOG/env.txt"
for stage in $stages; do
  echo "== stage $stage at ${SECONDS}s"
  $stage
done
echo "gpu_check ($stages) done in ${SECONDS}s"
exit $fail

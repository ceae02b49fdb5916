#!/usr/bin/env bash
# One run on a lent GPU (H100/H200), under 5 minutes: the kernel tests and the model tests that
# touch CUDA/triton, compiled, in fp32/fp16/bf16; then the kernel benchmark (+ a tile sweep if
# time is left). Uses the system torch/triton/transformers; nothing is installed.
# Logs (and bench JSON) go to $OUT when it is set, else to ./gpu_check_logs.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-gpu_check_logs}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
SECONDS=0
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$LOG/env.txt"

# Tests: four shards in parallel (Triton compiles are CPU-bound and single-threaded per process).
run_shard() {  # name, pytest args...
  local name=$1; shift
  timeout 170 python -m pytest -q -p no:cacheprovider "$@" >"$LOG/test_$name.txt" 2>&1
  local rc=$?
  [ $rc -eq 5 ] && rc=0  # no test selected (e.g. the model's triton tests do not exist yet)
  echo "$rc" >"$LOG/test_$name.rc"
}
run_shard attention_fwd tests/test_kernels_attention.py -k "not realistic and not backward" &
run_shard attention_bwd_real tests/test_kernels_attention.py -k "realistic or backward" &
run_shard decode_small tests/test_kernels_decode.py tests/test_kernels_small.py &
run_shard model tests -k "(triton or cuda or gpu) and not test_kernels" &
wait
fail=0
for f in "$LOG"/test_*.rc; do
  name=$(basename "$f" .rc)
  rc=$(cat "$f")
  echo "== $name: rc=$rc  $(tail -n 1 "$LOG/$name.txt")"
  [ "$rc" != 0 ] && { fail=1; grep -E "^(FAILED|ERROR)" "$LOG/$name.txt" | head -20; }
done
echo "tests done at ${SECONDS}s"

# Benchmark: the table first, then the sweep with what is left of the 5 minutes.
timeout 110 python scripts/bench_kernels.py --json "$LOG/bench.json" 2>&1 | tee "$LOG/bench.txt"
left=$((285 - SECONDS))
if [ "$left" -gt 40 ]; then
  timeout "$left" python scripts/bench_kernels.py --sweep 2>&1 | grep -E "sweep" | tee "$LOG/bench_sweep.txt"
fi
echo "gpu_check done in ${SECONDS}s, tests $([ $fail = 0 ] && echo passed || echo FAILED)"
exit $fail

#!/usr/bin/env bash
# Everything a session with a lent GPU (H100/H200) runs, in one call. Each stage has its own time
# box, so one that hangs cannot take the others' time. Uses the device's own torch, triton and
# transformers; nothing is installed.
#
#   tests        the kernel and model tests on CUDA (fp32/fp16/bf16), five shards in parallel (<= 180 s)
#   model_tests  the model-level CUDA tests only (<= 150 s), when only the model code changed
#   kernels      scripts/bench_kernels.py: each kernel vs SDPA / its eager reference (<= 150 s; decode_linear autotunes)
#   sweep        the kernel table again plus alternative tile configs, until SESSION_SECONDS
#   e2e          scripts/bench.py: mistral-7b shapes, bf16, ours vs transformers (<= 270 s; 218 s on an H100)
#   e2e_b1       scripts/bench.py at batch 1 only, no transformers (<= 90 s)
#   profile      scripts/profile_step.py: prefill and decode time by kernel family, decode three times (<= 120 s)
#   ab           bench.py at batch 1 and 8 as is, then --vision-graph (TTFT), the defaults' alternatives:
#                --no-decode-kernels, --no-flash-tma, --pdl; at batch 32 cuBLAS vs --decode-kernels; --no-fuse against
#                --no-decode-kernels (decode_linear needs the fused layout) (most wanted first: a
#                time-out or AB_N cuts the last ones)
#
#     bash scripts/gpu_check.sh                   # tests kernels sweep: under 5 minutes
#     bash scripts/gpu_check.sh e2e kernels tests sweep   # what a first GPU session owes (~7 min)
#     DEADLINE=560 AB_N=4 bash scripts/gpu_check.sh tests e2e ab kernels   # stop every stage by 560 s
#
# Output lands in $OUT (else ./gpu_logs), at most 8 files, as the device tool returns them:
# session.txt (this script's whole output), bench_e2e*.json (copy to bench/results/, then run
# scripts/bench_table.py), bench_kernels*.json (to bench/results/kernels/), and logs.tar.gz
# with every stage's log, the test shards' pytest output included.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-gpu_logs}
LOG=/tmp/gpu_logs
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}  # the device image has python3, not always python
SECONDS=0
END=${SESSION_SECONDS:-285}
# DEADLINE (seconds from the start): no stage runs past it, so a call whose timeout_s is a little
# longer still returns every finished stage's files. Each time box below is cut to what is left.
DEADLINE=${DEADLINE:-100000}
failed=""

left() { echo $((DEADLINE - SECONDS - 15)); }  # seconds before DEADLINE, less 15 s for pack

box() {  # the time box for the next command: min(wanted, left), at least 1
  local want=$1 left
  left=$(left)
  [ "$left" -lt "$want" ] && want=$left
  [ "$want" -lt 1 ] && want=1
  echo "$want"
}

late() {  # true, with a message, when under $1 seconds are left before DEADLINE
  local left
  left=$(left)
  [ "$left" -ge "$1" ] && return 1
  echo "skipped: ${left}s left before DEADLINE=${DEADLINE}"
}

pack() {
  tar czf "$DEST/logs.tar.gz" -C "$(dirname "$LOG")" "$(basename "$LOG")" 2>/dev/null
  cp -f "$LOG"/bench_*.json "$DEST"/ 2>/dev/null  # at most 4; the rest is in the tarball
  return 0
}

MODEL_TESTS="(triton or cuda or gpu or fuse) and not test_kernels and not test_bench_smoke"  # the model-level CUDA tests

run_shard() {  # name, pytest args...
  local name=$1; shift
  timeout "$(box 180)" "$PY" -m pytest -q -p no:cacheprovider "$@" >"$LOG/test_$name.txt" 2>&1
  local rc=$?
  [ $rc -eq 5 ] && rc=0  # no test selected
  echo "$rc" >"$LOG/test_$name.rc"
}

tests() {  # Triton compiles are CPU-bound and single-threaded per process: shard them
  local bad=0 pids=()
  run_shard attention_fwd tests/test_kernels_attention.py -k "not realistic and not backward" & pids+=($!)
  run_shard attention_bwd_real tests/test_kernels_attention.py -k "realistic or backward" & pids+=($!)
  run_shard decode_small tests/test_kernels_decode.py tests/test_kernels_small.py & pids+=($!)
  run_shard linear tests/test_kernels_linear.py tests/test_kernels_pdl.py & pids+=($!)
  run_shard model tests -k "$MODEL_TESTS" & pids+=($!)
  wait "${pids[@]}"  # not a bare wait: that also waits for the tee behind `exec >` below, for ever
  for f in "$LOG"/test_*.rc; do
    local name rc
    name=$(basename "$f" .rc)
    rc=$(cat "$f")
    echo "== $name: rc=$rc  $(tail -n 1 "$LOG/$name.txt")"
    [ "$rc" != 0 ] && { bad=1; grep -E "^(FAILED|ERROR)" "$LOG/$name.txt" | head -20; }
  done
  return $bad
}

model_tests() {
  run_shard model tests -k "$MODEL_TESTS"
  echo "== model: rc=$(cat "$LOG/test_model.rc")  $(tail -n 1 "$LOG/test_model.txt")"
  [ "$(cat "$LOG/test_model.rc")" = 0 ] || { grep -E "^(FAILED|ERROR)" "$LOG/test_model.txt" | head -20; return 1; }
}

kernels() {
  late 30 && return 1
  timeout "$(box 150)" "$PY" scripts/bench_kernels.py --json "$LOG/bench_kernels.json" 2>&1 | tee "$LOG/bench_kernels.txt"
}

sweep() {  # the table again, then the alternative tiles, until SESSION_SECONDS
  local left
  left=$(box $((END - SECONDS)))  # also no later than DEADLINE
  if [ "$left" -gt 40 ]; then
    timeout "$left" "$PY" scripts/bench_kernels.py --sweep --json "$LOG/bench_kernels_sweep.json" 2>&1 \
      | tee "$LOG/bench_sweep.txt"
    local rc=$?
    [ $rc = 124 ] && { echo "sweep stopped at its time box"; return 0; }  # by design: it fills what is left
    return $rc
  else
    echo "sweep skipped: ${left}s left"
  fi
}

e2e() {
  late 60 && return 1
  timeout "$(box "${E2E_TIMEOUT:-270}")" "$PY" scripts/bench.py --out "$LOG/bench_e2e.json" 2>&1 | tee "$LOG/bench_e2e.txt"
}

e2e_b1() {
  late 30 && return 1
  timeout "$(box 90)" "$PY" scripts/bench.py --batches 1 --no-hf --runs 3 --out "$LOG/bench_e2e_b1.json" 2>&1 \
    | tee "$LOG/bench_e2e_b1.txt"
}

ab() {  # same-machine A/B of the leads in bench/NOTES.md: batch 1 and 8, no transformers (~7 x 25 s)
  local i=0 v rc=0 want
  for v in "" "--vision-graph" "--no-decode-kernels" "--no-flash-tma" "--pdl" "--batches 32" \
      "--decode-kernels --batches 32" "--no-decode-kernels --no-fuse"; do
    i=$((i + 1))
    [ "$i" -gt "${AB_N:-8}" ] && break  # AB_N: only the first N variants
    want=120  # the first variant compiles decode_linear's autotune candidates (~36); the rest reuse them
    late 30 && { rc=1; break; }
    echo "-- bench.py $v"
    # shellcheck disable=SC2086  # $v is a list of arguments
    timeout "$(box $want)" "$PY" scripts/bench.py --batches 1 8 --no-hf --runs 3 $v --out "$LOG/ab_$i.json" 2>&1 \
      | tee -a "$LOG/ab.txt" | grep -E "^TTFT|^generate|^ +[0-9]+ " || rc=1
  done
  return $rc
}

profile() {
  late 30 && return 1
  timeout "$(box 120)" "$PY" scripts/profile_step.py --decode-kernels --pdl 2>&1 | tee "$LOG/profile.txt"
}

stages=${*:-tests kernels sweep}
for stage in $stages; do
  declare -F "$stage" >/dev/null || { echo "gpu_check.sh: unknown stage '$stage'" >&2; exit 2; }
done
# Only now, with the stages known good: tests/test_bench_smoke.py runs this script with a bad stage,
# and when it ran inside the tests stage, an earlier rm here deleted the other shards' logs.
rm -rf "$LOG"  # a warm machine keeps /tmp: an earlier call's JSON must not come back as this one's
mkdir -p "$DEST" "$LOG"
exec > >(tee "$DEST/session.txt") 2>&1
TEE=$!
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
for stage in $stages; do
  echo "== $stage at ${SECONDS}s"
  $stage || failed="$failed $stage"  # a test failure, a crash or a timeout (pipefail carries it)
  pack
done
echo "gpu_check ($stages) done in ${SECONDS}s: $([ -z "$failed" ] && echo "all stages passed" || echo "FAILED:$failed")"
exec >&- 2>&-
wait "$TEE"  # session.txt complete before the device tool collects $OUT
[ -z "$failed" ]

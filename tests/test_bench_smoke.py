"""The GPU benchmark's CPU smoke mode runs end to end and its JSON renders into a table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_and_table(tmp_path):
    out = tmp_path / "results" / "cpu.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", "cpu", "--preset", "tiny",
                          "--new-tokens", "4", "--runs", "1", "--batches", "1", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "TTFT ours" in run.stdout
    r = json.loads(out.read_text())
    assert set(r["ours"]["decode_ms_per_token"]) == {"1", "2"}
    assert r["ours"]["ttft_ms"] > 0 and r["transformers"]["ttft_ms"] > 0  # decode times on a busy CPU are noise
    assert set(r["ours"]["generate_call"]) == {"new_tokens", "eager_ms_per_token", "cuda_graph_ms_per_token"}
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_table.py"), "--results",
                          str(out.parent), "--readme", str(readme)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = readme.read_text()
    assert "| cpu |" in text and "old" not in text and text.startswith("before") and text.endswith("after\n")


def test_gpu_check_ab_variants_run(tmp_path):
    """Every bench.py variant gpu_check.sh's `ab` stage runs parses and runs (CPU smoke), and the
    script refuses an unknown stage before touching a GPU: a typo there would cost a lent
    GPU's minutes."""
    import re
    import shlex
    from concurrent.futures import ThreadPoolExecutor

    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    loop = re.search(r'for v in ((?:"[^"]*"\s*(?:\\\n\s*)?)+); do', script)  # the list may continue on a line
    assert loop, "gpu_check.sh's ab loop not found"
    variants = [shlex.split(v) for v in re.findall(r'"([^"]*)"', loop.group(1))]
    assert ["--no-decode-kernels"] in variants and ["--no-flash-tma"] in variants and ["--pdl"] in variants
    assert ["--vision-graph"] in variants
    assert len(variants) == 8 and variants[0] == []  # "as committed" first: the baseline of the others
    def bench(i, extra):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", "cpu", "--preset", "tiny",
                               "--new-tokens", "2", "--runs", "1", "--batches", "1", "--no-hf",
                               "--out", str(tmp_path / f"ab_{i}.json"), *extra],
                              capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(2) as pool:  # two at a time: most of each run is importing torch
        runs = list(pool.map(bench, range(len(variants)), variants))
    for i, (extra, run) in enumerate(zip(variants, runs)):
        assert run.returncode == 0, (extra, run.stderr[-2000:])
        if extra == ["--vision-graph"]:
            assert json.loads((tmp_path / f"ab_{i}.json").read_text())["kernel_experiments"]["vision_graph"] is True
    profile = re.search(r'"\$PY" scripts/profile_step.py(.*?) 2>&1', script).group(1).split()
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_step.py"), *profile, "--preset", "vicuna-7b"],
                         capture_output=True, text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert "needs a CUDA GPU" in run.stderr  # its flags parsed; without a GPU it stops there
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "no_such_stage"], capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert run.returncode == 2 and "unknown stage" in run.stderr


def test_bench_kernels_smoke(tmp_path):
    """scripts/bench_kernels.py's CPU mode (the interpreter, tiny shapes): every kernel's row is
    produced and written, as the `kernels` stage of gpu_check.sh needs."""
    out = tmp_path / "kernels.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--device", "cpu", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"prefill_attn", "vision_attn", "attn_backward", "decode_attn", "rope_decode", "rope_kv_write", "rms_norm",
            "silu_mul", "quick_gelu", "linear_gate_up", "linear_down"} <= kernels
    assert any(r["note"].startswith("K/V by TMA") for r in rows)

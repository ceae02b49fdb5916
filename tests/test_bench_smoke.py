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
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_table.py"), "--results",
                          str(out.parent), "--readme", str(readme)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = readme.read_text()
    assert "| cpu |" in text and "old" not in text and text.startswith("before") and text.endswith("after\n")

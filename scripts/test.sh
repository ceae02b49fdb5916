#!/usr/bin/env bash
# Sets up everything from nothing (a venv in .venv, the CPU build of torch, the package with
# its test extra) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: on the project's machines this is a local CPU build; an unpinned torch
# would pull a multi-GB CUDA build. The package itself only asks for torch>=2.4.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
exec .venv/bin/python -m pytest -q "$@"

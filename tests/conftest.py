import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before
# anything imports triton (it is read when @triton.jit decorates).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# decode_linear would compile and time six tiles for every shape a test tries on a GPU; one test
# switches the autotuner back on (test_kernels_linear.py).
os.environ.setdefault("LLAVA_NEXT_AUTOTUNE", "0")

# Real images, tokenizer models and checkpoint configs live beside the checkout, read-only.
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_path(*parts) -> Path:
    """Path under ../shared/fixtures; skips the test when it is absent (a user's clone),
    fails instead when CI sets LLAVA_NEXT_REQUIRE_FIXTURES=1."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        msg = f"fixture {path} not found (it lives in ../shared/fixtures beside the checkout)"
        if os.environ.get("LLAVA_NEXT_REQUIRE_FIXTURES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path

"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so the kernels run
on the CPU here (fp32/fp16 only: the interpreter's bf16 tl.dot is wrong).
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

SMOLLM2 = ROOT / "checkpoints" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real shipped model, converted by `make model` (a prerequisite of `make test`)."""
    if not (SMOLLM2 / "model.safetensors").exists():
        pytest.fail(f"{SMOLLM2} is missing: run `make model` first (make test does it for you)")
    return SMOLLM2

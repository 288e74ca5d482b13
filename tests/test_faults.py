"""Faults, bad inputs and hostile files (issue 40): each test is one class of fault on a tiny model,
and each fails without its fix.

Sections, one per area (each owned by the engineer who wrote the fix):
  - experts, SVD factors and merged models (svf.py, svd_cache.py, lora.py, model.save_folder)
  - script arguments (checked where they are parsed)

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_faults.py
"""
import pytest  # noqa: F401
import torch  # noqa: F401


# ============================================================================= experts, SVD factors, merged models


# ============================================================================= script arguments

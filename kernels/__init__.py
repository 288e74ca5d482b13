"""Triton kernels, one file per kernel (see docs/STYLE.md, Kernels)."""

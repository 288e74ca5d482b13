"""Triton kernels, one file per kernel (see STYLE.md, Kernels)."""

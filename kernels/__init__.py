"""Triton kernels and their launchers, installed as ctxkern.kernels."""

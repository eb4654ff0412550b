"""Triton GPU kernels and their torch fallbacks (installed as ``t2r.kernels``)."""

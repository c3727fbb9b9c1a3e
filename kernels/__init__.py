"""Triton kernels of ampfuse, installed as ``ampfuse.kernels``.

Import this package only after deciding on ``TRITON_INTERPRET``: Triton reads it when the
kernels are decorated.
"""

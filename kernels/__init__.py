"""Triton kernels, installed as ``ivfast.kernels``.

One file per op family, each holding its kernels, launch functions and autograd Functions.
The readable PyTorch references live beside their users (``ivfast.ops``,
``ivfast.models.diffusion``); kernels know nothing of models.
"""

"""Triton kernels of the fisnet ops (the GPU path; CPU tensors under TRITON_INTERPRET=1).

Nothing here imports triton at package import time: import a submodule, e.g.
``from fisnet_ext.triton import lrp_relu``, only when a Triton kernel is about to run.
"""

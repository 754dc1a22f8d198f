"""fisnet: train image classifiers to ignore biased backgrounds (ISNet and Faster ISNet).

LRP-Flex heatmaps for any ReLU network (`explain`), the ISNet variants, the heatmap loss and
the C1/C2 heuristic, built on the fused kernels of `fisnet_ext`.
"""
from .lrp import LRPTrace, UnsupportedActivationError, explain, trace

__version__ = "0.1.0"
__all__ = ["explain", "trace", "LRPTrace", "UnsupportedActivationError"]

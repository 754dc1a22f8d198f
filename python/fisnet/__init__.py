"""fisnet: train image classifiers to ignore biased backgrounds (ISNet and Faster ISNet).

LRP-Flex heatmaps for any ReLU network (`explain`), the four ISNet variants (`ISNet`), the
heatmap loss (`heatmap_loss`, `ISNetLoss`) and the C1/C2 heuristic (`tune_cuts`), built on
the fused kernels of `fisnet_ext`.
"""
from .lrp import LRPTrace, UnsupportedActivationError, explain, trace
from .loss import ISNetLoss, NonFiniteHeatmapError, gwrp, heatmap_loss, heatmap_loss_parts, resize_masks
from .perf import tune_cpu_malloc
from .variants import VARIANTS, ISNet, ISNetOutput
from .cuts import estimate_cuts, load_cuts, save_cuts, tune_cuts

__version__ = "0.1.0"
__all__ = [
    "explain", "trace", "LRPTrace", "UnsupportedActivationError",
    "ISNet", "ISNetOutput", "VARIANTS", "tune_cuts", "estimate_cuts", "save_cuts", "load_cuts",
    "ISNetLoss", "heatmap_loss", "heatmap_loss_parts", "gwrp", "resize_masks", "NonFiniteHeatmapError",
    "tune_cpu_malloc",
]

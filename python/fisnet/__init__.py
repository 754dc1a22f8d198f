"""fisnet: train image classifiers to ignore biased backgrounds (ISNet and Faster ISNet).

LRP-Flex heatmaps for any ReLU network (`explain`), the four ISNet variants (`ISNet`), the
heatmap loss (`heatmap_loss`, `ISNetLoss`) and the C1/C2 heuristic (`tune_cuts`), built on
the fused kernels of `fisnet_ext`.
"""
from . import optable
from .lrp import LRPTrace, UnsupportedActivationError, explain, trace
from .optable import register_linear
from .loss import ISNetLoss, NonFiniteHeatmapError, gwrp, heatmap_loss, heatmap_loss_parts, resize_masks
from .perf import tune_cpu_malloc
from .variants import VARIANTS, ISNet, ISNetOutput
from .cuts import estimate_cuts, load_cuts, save_cuts, tune_cuts

__version__ = "0.1.0"
__all__ = [
    "explain", "trace", "LRPTrace", "UnsupportedActivationError", "register_linear",
    "ISNet", "ISNetOutput", "VARIANTS", "tune_cuts", "estimate_cuts", "save_cuts", "load_cuts",
    "ISNetLoss", "heatmap_loss", "heatmap_loss_parts", "gwrp", "resize_masks", "NonFiniteHeatmapError",
    "tune_cpu_malloc",
]

# fisnet compare: the RRR and segment_then_classify baselines, localisation metrics, the comparison itself
from .baselines import RRRLoss, SegmentThenClassify, choose_rrr_lambda, train_segmenter  # noqa: E402
from .metrics import pointing_game, relevance_mass, relevance_metrics  # noqa: E402
from .compare import run_compare  # noqa: E402
__all__ += ["RRRLoss", "choose_rrr_lambda", "SegmentThenClassify", "train_segmenter", "pointing_game",
            "relevance_mass", "relevance_metrics", "run_compare"]

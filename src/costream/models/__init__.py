"""Model zoo: Continual 3D CNNs (Co3D, arXiv 2106.00050) and their offline originals.

X3D-XS/S/M/L (arXiv 2004.04730), Slow-8x8-R50 (arXiv 1812.03982) and I3D-R50 (arXiv 1705.07750),
each built once from costream layers, so the same module runs a clip offline (``forward``) and a
stream frame by frame (``forward_step``). Published PyTorchVideo and PySlowFast checkpoints load
through :func:`load_checkpoint` (``torch.load(weights_only=True)``). Not imported by
``import costream``; import ``costream.models`` explicitly.

Example:
    >>> import torch
    >>> from costream.models import create_model
    >>> net = create_model("cox3d_xs", num_classes=4, head_pool=2)
    >>> clip = torch.randn(1, 3, 34, 32, 32)
    >>> stepped = net.forward_steps(clip)  # 34 frames, the first prediction due at step 29
    >>> stepped.shape
    torch.Size([1, 4, 5])
    >>> torch.allclose(stepped, net(clip)[:, :, :5], atol=1e-5)
    True
"""

from ._checkpoints import CheckpointError, load_checkpoint, map_checkpoint
from ._create import create_model
from ._layers import fold_batch_norm
from ._registry import list_models, model_family, register_model
from .features import (
    CoOadTR,
    OadTR,
    ThumosFeatures,
    average_precision,
    load_thumos_features,
    pad_start,
    per_frame_map,
)
from .skeleton import STGCN, SkeletonDataset, SkeletonGraph, bone_stream, skeleton_graph
from .video import X3D, ResNet3D, SqueezeExcitation, kinetics400_classes

__all__ = [
    "CheckpointError", "CoOadTR", "OadTR", "ResNet3D", "STGCN", "SkeletonDataset",
    "SkeletonGraph", "SqueezeExcitation", "ThumosFeatures", "X3D", "average_precision",
    "bone_stream", "create_model", "fold_batch_norm", "kinetics400_classes", "list_models",
    "load_checkpoint", "load_thumos_features", "map_checkpoint", "model_family", "pad_start",
    "per_frame_map", "register_model", "skeleton_graph",
]

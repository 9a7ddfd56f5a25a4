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
from ._graphs import SkeletonGraph, skeleton_graph
from ._kinetics import kinetics400_classes
from ._layers import fold_batch_norm
from ._oadtr import CoOadTR, OadTR
from ._registry import create_model, list_models, model_family, register_model
from ._resnet3d import ResNet3D
from ._se import SqueezeExcitation
from ._skeleton_data import SkeletonDataset, bone_stream
from ._stgcn import STGCN
from ._thumos import (
    ThumosFeatures,
    average_precision,
    load_thumos_features,
    pad_start,
    per_frame_map,
)
from ._x3d import X3D

__all__ = [
    "CheckpointError", "CoOadTR", "OadTR", "ResNet3D", "STGCN", "SkeletonDataset",
    "SkeletonGraph", "SqueezeExcitation", "ThumosFeatures", "X3D", "average_precision",
    "bone_stream", "create_model", "fold_batch_norm", "kinetics400_classes", "list_models",
    "load_checkpoint", "load_thumos_features", "map_checkpoint", "model_family", "pad_start",
    "per_frame_map", "register_model", "skeleton_graph",
]

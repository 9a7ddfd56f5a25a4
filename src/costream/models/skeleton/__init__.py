"""Skeleton models: the ST-GCN family (ST-GCN, AGCN, S-TR and continual versions), their
graphs, data helpers and the published checkpoints' key layout.

The public names are re-exported by :mod:`costream.models`.

Example:
    >>> from costream.models.skeleton import skeleton_graph
    >>> skeleton_graph("ntu").num_joints
    25
"""

from ._graphs import SkeletonGraph, skeleton_graph
from ._skeleton_data import SkeletonDataset, bone_stream
from ._stgcn import STGCN

__all__ = ["STGCN", "SkeletonDataset", "SkeletonGraph", "bone_stream", "skeleton_graph"]

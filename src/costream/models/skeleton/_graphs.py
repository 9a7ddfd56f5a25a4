"""Skeleton graphs for the ST-GCN family: NTU RGB+D (25 joints) and Kinetics-Skeleton (18 joints).

A graph is its joints, its bones (undirected edges), the centre joint of the spatial
partitioning and the root of the bone stream. ST-GCN (Yan et al., AAAI 2018, arXiv 1801.07455)
partitions each joint's neighbourhood (itself and the joints one bone away) into three sets by
the distance to the centre joint (the body's centre of gravity):

* partition 0: the joint itself;
* partition 1: neighbours farther from the centre than the joint (the centrifugal side);
* partition 2: neighbours closer to the centre (the centripetal side).

Each set is an adjacency matrix ``A_k[j, i]`` (``j`` feeds joint ``i``: a graph convolution
computes ``x @ A_k`` on features ``(..., V)``), normalised by the degree of the receiving joint
(its neighbours and itself), so every joint averages over its neighbourhood.

Example:
    >>> from costream.models import skeleton_graph
    >>> g = skeleton_graph("ntu")
    >>> g.num_joints, len(g.edges), g.centre
    (25, 24, 20)
    >>> a = g.partitions()
    >>> a.shape, round(float(a.sum(dim=(0, 1))[0]), 6)  # every column sums to one
    (torch.Size([3, 25, 25]), 1.0)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SkeletonGraph", "skeleton_graph"]

# NTU RGB+D (Kinect v2), joints numbered from 1 as in the dataset's documentation:
# 1 spine base, 2 spine middle, 3 neck, 4 head, 5-8 left shoulder/elbow/wrist/hand,
# 9-12 right shoulder/elbow/wrist/hand, 13-16 left hip/knee/ankle/foot,
# 17-20 right hip/knee/ankle/foot, 21 spine at the shoulders, 22 left hand tip, 23 left thumb,
# 24 right hand tip, 25 right thumb. Each pair is (joint, the next joint towards joint 21), the
# topology of the published ST-GCN family models and of their bone streams.
_NTU_BONES_1 = (
    (1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9),
    (11, 10), (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18),
    (20, 19), (22, 23), (23, 8), (24, 25), (25, 12),
)

# Kinetics-Skeleton (OpenPose, 18 joints, numbered from 0): 0 nose, 1 neck, 2-4 right
# shoulder/elbow/wrist, 5-7 left shoulder/elbow/wrist, 8-10 right hip/knee/ankle,
# 11-13 left hip/knee/ankle, 14 right eye, 15 left eye, 16 right ear, 17 left ear.
# OpenPose has no pelvis joint: each hip hangs from the shoulder on its side.
_KINETICS_BONES = (
    (1, 0), (2, 1), (3, 2), (4, 3), (5, 1), (6, 5), (7, 6), (8, 2), (9, 8), (10, 9),
    (11, 5), (12, 11), (13, 12), (14, 0), (15, 0), (16, 14), (17, 15),
)


@dataclass(frozen=True)
class SkeletonGraph:
    """A skeleton: joints, bones, the partitioning centre and the bone-stream root.

    Args:
        name: ``"ntu"`` or ``"kinetics"`` for the built-in graphs, or any name.
        num_joints: number of joints ``V``.
        edges: the bones as pairs of joint indices (0-based, undirected; the graph must be a
            connected tree or at least connected).
        centre: the joint that splits neighbourhoods into centripetal and centrifugal sets.
        root: the joint whose bone is zero in the bone stream; every other joint's bone points
            from its parent (the neighbour one step closer to ``root``) to the joint.

    Example:
        >>> from costream.models import SkeletonGraph
        >>> chain = SkeletonGraph("chain", 3, ((0, 1), (1, 2)), centre=1, root=1)
        >>> chain.parents()
        (1, 1, 1)
        >>> chain.partitions()[2]  # joint 1 (centre) gets nothing from a closer neighbour
        tensor([[0.0000, 0.0000, 0.0000],
                [0.5000, 0.0000, 0.5000],
                [0.0000, 0.0000, 0.0000]])
    """

    name: str
    num_joints: int
    edges: tuple[tuple[int, int], ...]
    centre: int
    root: int

    def __post_init__(self) -> None:
        v = self.num_joints
        for a, b in self.edges:
            if not (0 <= a < v and 0 <= b < v) or a == b:
                raise ValueError(f"edge ({a}, {b}) is not a pair of distinct joints in [0, {v})")
        for what, j in (("centre", self.centre), ("root", self.root)):
            if not 0 <= j < v:
                raise ValueError(f"{what} joint {j} is not in [0, {v})")
        if min(self.distances(self.centre)) < 0:
            raise ValueError(f"skeleton graph {self.name!r} is not connected")

    def neighbours(self) -> list[list[int]]:
        """The joints one bone away from each joint."""
        out: list[list[int]] = [[] for _ in range(self.num_joints)]
        for a, b in self.edges:
            out[a].append(b)
            out[b].append(a)
        return out

    def distances(self, source: int) -> list[int]:
        """Bones between ``source`` and every joint (breadth-first; -1 if unreachable)."""
        nbrs = self.neighbours()
        dist = [-1] * self.num_joints
        dist[source] = 0
        queue = deque([source])
        while queue:
            j = queue.popleft()
            for n in nbrs[j]:
                if dist[n] < 0:
                    dist[n] = dist[j] + 1
                    queue.append(n)
        return dist

    def parents(self) -> tuple[int, ...]:
        """Each joint's neighbour one step closer to ``root`` (``root`` is its own parent)."""
        dist = self.distances(self.root)
        nbrs = self.neighbours()
        return tuple(j if j == self.root else min(n for n in nbrs[j] if dist[n] == dist[j] - 1)
                     for j in range(self.num_joints))

    def partitions(self) -> Tensor:
        """The three degree-normalised adjacency matrices ``(3, V, V)`` (see the module doc).

        Neighbours at the same distance from the centre as the joint (none in the built-in
        graphs) go to partition 1, as in the published ST-GCN.
        """
        v = self.num_joints
        dist = self.distances(self.centre)
        nbrs = self.neighbours()
        a = torch.zeros(3, v, v)
        for i in range(v):
            degree = len(nbrs[i]) + 1  # the neighbourhood includes the joint itself
            a[0, i, i] = 1.0 / degree
            for j in nbrs[i]:
                a[1 if dist[j] >= dist[i] else 2, j, i] = 1.0 / degree
        return a


def _ntu() -> SkeletonGraph:
    edges = tuple((a - 1, b - 1) for a, b in _NTU_BONES_1)
    return SkeletonGraph("ntu", 25, edges, centre=20, root=20)


def _kinetics() -> SkeletonGraph:
    return SkeletonGraph("kinetics", 18, _KINETICS_BONES, centre=1, root=0)


_GRAPHS = {"ntu": _ntu, "kinetics": _kinetics}


def skeleton_graph(graph: str | SkeletonGraph) -> SkeletonGraph:
    """The built-in graph ``"ntu"`` (NTU RGB+D, 25 joints, centre: spine at the shoulders) or
    ``"kinetics"`` (Kinetics-Skeleton / OpenPose, 18 joints, centre: neck); a
    :class:`SkeletonGraph` passes through.

    Example:
        >>> from costream.models import skeleton_graph
        >>> g = skeleton_graph("kinetics")
        >>> g.num_joints, g.centre, g.parents()[:3]  # the nose is the bone-stream root
        (18, 1, (0, 0, 1))
    """
    if isinstance(graph, SkeletonGraph):
        return graph
    if graph not in _GRAPHS:
        raise ValueError(f"graph must be one of {sorted(_GRAPHS)} or a SkeletonGraph, "
                         f"got {graph!r}")
    return _GRAPHS[graph]()

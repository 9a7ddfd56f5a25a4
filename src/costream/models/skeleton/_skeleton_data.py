"""Skeleton data in the layout of the published ST-GCN family: ``.npy`` arrays and ``.pkl`` labels.

The preprocessed NTU RGB+D (and Kinetics-Skeleton) splits are one ``.npy`` array
``(N, C=3, T=300, V, M=2)`` per split (joint coordinates, zero-padded in time and persons) and
one ``.pkl`` file holding ``(sample_names, labels)``. The bone stream replaces every joint by
the vector from its parent joint (towards the graph's root, whose own bone is zero).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._graphs import SkeletonGraph, skeleton_graph

Stream = Literal["joint", "bone"]

# globals a label pickle may reference: numpy integer labels (scalars or arrays)
_ALLOWED = {
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
}


class _LabelUnpickler(pickle.Unpickler):
    """Unpickles plain containers, strings and numbers (and numpy numbers); nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"label files may not reference {module}.{name}")


def read_skeleton_labels(path: str | Path) -> tuple[list[str], list[int]]:
    """``(sample_names, labels)`` from a ``.pkl`` label file, unpickled with an allow-list
    (plain containers, strings, numbers, numpy integers: no code runs)."""
    with open(path, "rb") as fh:
        try:
            obj = _LabelUnpickler(fh).load()
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path}: not a label file of (sample names, labels): {err}") from err
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pair (sample_names, labels), got "
                         f"{type(obj).__name__}")
    names, labels = (list(v) for v in obj)
    if len(names) != len(labels):
        raise ValueError(f"{path}: {len(names)} sample names but {len(labels)} labels")
    return [str(n) for n in names], [int(v) for v in labels]


def bone_stream(x: Tensor | np.ndarray, graph: str | SkeletonGraph = "ntu") -> Tensor:
    """Bones of skeleton data with joints on dim -2: ``x[..., j, :] - x[..., parent(j), :]``.

    Works for clips ``(N, C, T, V, M)``, samples ``(C, T, V, M)`` and frames ``(N, C, V, M)``;
    the root joint's bone is zero.

    Example:
        >>> import torch
        >>> from costream.models import bone_stream
        >>> x = torch.zeros(3, 1, 25, 1)
        >>> x[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])  # spine base; parent: spine middle
        >>> bone_stream(x)[:, 0, 0, 0], bone_stream(x)[:, 0, 20, 0]  # joint 21 is the root
        (tensor([1., 2., 3.]), tensor([0., 0., 0.]))
    """
    g = skeleton_graph(graph)
    t = torch.as_tensor(x)
    if t.dim() < 2 or t.shape[-2] != g.num_joints:
        raise ValueError(f"expected joints on dim -2 ({g.num_joints} for graph {g.name!r}), "
                         f"got shape {tuple(t.shape)}")
    parents = torch.tensor(g.parents(), device=t.device)
    return t - t.index_select(-2, parents)


class SkeletonDataset(Dataset):
    """A split of NTU RGB+D or Kinetics-Skeleton in the published ``.npy`` + ``.pkl`` layout.

    Args:
        data_path: ``.npy`` array ``(N, C, T, V, M)`` (memory-mapped by default).
        label_path: ``.pkl`` file with ``(sample_names, labels)``.
        stream: ``"joint"`` (coordinates as stored) or ``"bone"`` (see :func:`bone_stream`).
        graph: the skeleton graph of the data (``"ntu"``: 25 joints, ``"kinetics"``: 18).
        mmap: memory-map the array instead of reading it into memory.

    Items are ``(clip, label)`` with ``clip`` a float32 tensor ``(C, T, V, M)``; the array is
    read with ``allow_pickle=False`` and the labels with an allow-list unpickler.

    Example:
        >>> import pickle, tempfile, numpy as np
        >>> from pathlib import Path
        >>> from costream.models import SkeletonDataset
        >>> root = Path(tempfile.mkdtemp())
        >>> np.save(root / "x.npy", np.ones((2, 3, 8, 25, 2), dtype=np.float32))
        >>> (root / "y.pkl").write_bytes(pickle.dumps((["S001A001", "S001A002"], [0, 1]))) > 0
        True
        >>> data = SkeletonDataset(root / "x.npy", root / "y.pkl", stream="bone")
        >>> clip, label = data[1]
        >>> len(data), clip.shape, label, float(clip.abs().sum())  # equal joints: zero bones
        (2, torch.Size([3, 8, 25, 2]), 1, 0.0)
    """

    def __init__(self, data_path: str | Path, label_path: str | Path, *, stream: Stream = "joint",
                 graph: str | SkeletonGraph = "ntu", mmap: bool = True) -> None:
        if stream not in ("joint", "bone"):
            raise ValueError(f"stream must be 'joint' or 'bone', got {stream!r}")
        self.graph = skeleton_graph(graph)
        self.stream = stream
        try:
            self.data = np.load(data_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{data_path}: not a numeric .npy array ({err})") from err
        if self.data.ndim != 5 or self.data.shape[3] != self.graph.num_joints:
            raise ValueError(
                f"{data_path}: expected an array (N, C, T, V={self.graph.num_joints}, M) for graph "
                f"{self.graph.name!r}, got shape {self.data.shape}")
        self.sample_names, self.labels = read_skeleton_labels(label_path)
        if len(self.labels) != self.data.shape[0]:
            raise ValueError(f"{label_path} has {len(self.labels)} labels for "
                             f"{self.data.shape[0]} samples in {data_path}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        clip = torch.from_numpy(np.array(self.data[index], dtype=np.float32))
        if self.stream == "bone":
            clip = bone_stream(clip, self.graph)
        return clip, self.labels[index]

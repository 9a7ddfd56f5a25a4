"""Skeleton graphs (partitions, bones) and the NTU ``.npy`` + ``.pkl`` data layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from costream.models import SkeletonDataset, SkeletonGraph, bone_stream, skeleton_graph

# (joint, parent) of the published bone streams: NTU 1-based, Kinetics (OpenPose) 0-based
NTU_PAIRS = ((1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21),
             (10, 9), (11, 10), (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1),
             (18, 17), (19, 18), (20, 19), (21, 21), (22, 23), (23, 8), (24, 25), (25, 12))
KINETICS_PAIRS = ((0, 0), (1, 0), (2, 1), (3, 2), (4, 3), (5, 1), (6, 5), (7, 6), (8, 2),
                  (9, 8), (10, 9), (11, 5), (12, 11), (13, 12), (14, 0), (15, 0), (16, 14),
                  (17, 15))


# ------------------------------------------------------------------ graphs
def test_parents_are_the_published_bone_pairs() -> None:
    assert skeleton_graph("ntu").parents() == tuple(p - 1 for _, p in NTU_PAIRS)
    assert skeleton_graph("kinetics").parents() == tuple(p for _, p in KINETICS_PAIRS)


@pytest.mark.parametrize("name", ["ntu", "kinetics"])
def test_partitions_split_each_neighbourhood_by_distance_to_the_centre(name: str) -> None:
    g = skeleton_graph(name)
    a = g.partitions()
    dist = g.distances(g.centre)
    adjacency = torch.zeros(g.num_joints, g.num_joints, dtype=torch.bool)
    for i, j in g.edges:
        adjacency[i, j] = adjacency[j, i] = True
    degree = adjacency.sum(0) + 1
    torch.testing.assert_close(a[0], torch.diag(1.0 / degree.float()))
    for j in range(g.num_joints):
        for i in range(g.num_joints):
            got = (a[1, j, i].item(), a[2, j, i].item())
            w = 1 / degree[i].item()
            if adjacency[j, i]:  # j feeds i, from its side of i
                assert got == pytest.approx((w, 0.0) if dist[j] > dist[i] else (0.0, w))
            else:
                assert got == (0.0, 0.0)
    torch.testing.assert_close(a.sum(dim=(0, 1)), torch.ones(g.num_joints))


def test_centre_joints() -> None:
    ntu, kinetics = skeleton_graph("ntu"), skeleton_graph("kinetics")
    # NTU: spine at the shoulders (joint 21) joins spine middle, neck and both shoulders
    assert sorted(ntu.neighbours()[ntu.centre]) == [1, 2, 4, 8]
    assert ntu.partitions()[2][:, ntu.centre].sum() == 0  # nothing is closer to the centre
    # OpenPose: the neck joins nose and both shoulders
    assert sorted(kinetics.neighbours()[kinetics.centre]) == [0, 2, 5]


def test_bad_graphs_are_rejected() -> None:
    with pytest.raises(ValueError, match="not connected"):
        SkeletonGraph("two", 3, ((0, 1),), centre=0, root=0)
    with pytest.raises(ValueError, match="distinct joints"):
        SkeletonGraph("loop", 2, ((0, 0),), centre=0, root=0)
    with pytest.raises(ValueError, match="graph must be one of"):
        skeleton_graph("coco")


# ------------------------------------------------------------------ bones
def test_bone_stream_subtracts_the_parent_joint() -> None:
    x = torch.randn(2, 3, 4, 25, 2)
    bones = bone_stream(x)
    for joint, parent in NTU_PAIRS:
        torch.testing.assert_close(bones[..., joint - 1, :],
                                   x[..., joint - 1, :] - x[..., parent - 1, :])
    frame = x[:, :, 0]
    torch.testing.assert_close(bone_stream(frame), bones[:, :, 0])
    with pytest.raises(ValueError, match="joints on dim -2"):
        bone_stream(x, "kinetics")


# ------------------------------------------------------------------ the .npy + .pkl layout
def write_split(root: Path, data: np.ndarray, names: list, labels: list) -> tuple[Path, Path]:
    np.save(root / "data.npy", data)
    (root / "label.pkl").write_bytes(pickle.dumps((names, labels)))
    return root / "data.npy", root / "label.pkl"


@pytest.mark.parametrize("mmap", [True, False])
def test_dataset_reads_joint_and_bone_streams(tmp_path: Path, mmap: bool) -> None:
    data = np.random.default_rng(0).standard_normal((3, 3, 10, 25, 2)).astype(np.float32)
    paths = write_split(tmp_path, data, ["S001C001P001R001A001", "S001C001P001R001A002",
                                         "S001C001P001R001A003"], [0, 1, 2])
    joints = SkeletonDataset(*paths, mmap=mmap)
    bones = SkeletonDataset(*paths, stream="bone", mmap=mmap)
    assert len(joints) == 3 and joints.sample_names[2].endswith("A003")
    clip, label = joints[2]
    assert label == 2 and clip.dtype == torch.float32
    torch.testing.assert_close(clip, torch.from_numpy(data[2]))
    bone, _ = bones[2]
    torch.testing.assert_close(bone[:, :, 0], torch.from_numpy(data[2, :, :, 0] - data[2, :, :, 1]))
    torch.testing.assert_close(bone[:, :, 20], torch.zeros(3, 10, 2))


def test_numpy_labels_load(tmp_path: Path) -> None:
    data = np.zeros((2, 3, 4, 18, 2), dtype=np.float32)
    paths = write_split(tmp_path, data, np.array(["a", "b"]), np.array([5, 7]))
    dataset = SkeletonDataset(*paths, graph="kinetics")
    assert dataset.labels == [5, 7] and dataset.sample_names == ["a", "b"]


def test_bad_files_are_rejected(tmp_path: Path) -> None:
    good = np.zeros((2, 3, 4, 25, 2), dtype=np.float32)
    paths = write_split(tmp_path, good, ["a", "b"], [0, 1])
    with pytest.raises(ValueError, match=r"V=18"):
        SkeletonDataset(*paths, graph="kinetics")
    with pytest.raises(ValueError, match="stream"):
        SkeletonDataset(*paths, stream="motion")
    paths = write_split(tmp_path, good, ["a"], [0])
    with pytest.raises(ValueError, match="1 labels for 2 samples"):
        SkeletonDataset(*paths)
    paths = write_split(tmp_path, good, ["a", "b"], [Path("0"), Path("1")])
    with pytest.raises(ValueError, match="may not reference pathlib"):
        SkeletonDataset(*paths)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a numeric"):
        SkeletonDataset(tmp_path / "objects.npy", paths[1])


def test_a_loaded_batch_streams_through_a_model(tmp_path: Path) -> None:
    from costream.models import create_model

    data = np.random.default_rng(1).standard_normal((2, 3, 86, 25, 2)).astype(np.float32)
    dataset = SkeletonDataset(*write_split(tmp_path, data, ["a", "b"], [0, 1]), stream="bone")
    batch = torch.stack([dataset[i][0] for i in range(2)])
    model = create_model("cost_gcn_star", num_classes=3, width=8, clip_length=84)
    with torch.no_grad():
        offline = model(batch)
        stepped = model.forward_steps(batch)
    assert offline.shape == stepped.shape == (2, 3, 3)
    torch.testing.assert_close(stepped, offline, rtol=1e-4, atol=1e-5)

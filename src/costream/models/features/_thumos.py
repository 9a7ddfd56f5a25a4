"""THUMOS14-style feature pickles and the per-frame mAP of online action detection.

The feature files of OadTR (arXiv 2106.11149) and CoOadTR (arXiv 2201.06268) are pickles
``{video: {"rgb": (T, 2048), "flow": (T, 1024 | 2048), "anno": (T, 22)}}``: per-frame features
of two streams and one-hot (or multi-hot) per-frame labels, class 0 being background. Pickles
can execute code when loaded, so :func:`load_thumos_features` unpickles with an allow-list:
numpy arrays, dtypes and scalars and plain containers, nothing else.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("builtins", "slice"), ("collections", "OrderedDict"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals numpy arrays and plain containers need."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy.core" or module.startswith("numpy.core."):  # numpy < 2 pickles
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: feature pickles may only hold numpy arrays "
                f"and plain containers")
        if module.startswith("numpy._core") and not hasattr(np, "_core"):
            module = "numpy.core" + module[len("numpy._core"):]
        return super().find_class(module, name)


def load_thumos_features(source: str | Path | bytes) -> dict[str, dict[str, np.ndarray]]:
    """Load a THUMOS14-style feature pickle safely (allow-listed numpy arrays only).

    Args:
        source: a path, or the pickle's bytes.

    Returns:
        ``{video: {"rgb": (T, C_rgb), "flow": (T, C_flow), "anno": (T, K)}}``, checked: every
        video has the three 2-D arrays with the same ``T`` and all videos the same widths.

    Example:
        >>> import pickle, numpy as np
        >>> from costream.models import load_thumos_features
        >>> data = {"v1": {"rgb": np.zeros((5, 4)), "flow": np.zeros((5, 2)),
        ...                "anno": np.eye(3)[[0, 0, 1, 1, 2]]}}
        >>> load_thumos_features(pickle.dumps(data))["v1"]["anno"].shape
        (5, 3)
        >>> load_thumos_features(pickle.dumps(len))
        Traceback (most recent call last):
        ...
        _pickle.UnpicklingError: refusing to load builtins.len: ...
    """
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    data = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    _validate(data)
    return data


def _validate(data: Any) -> None:
    if not isinstance(data, Mapping) or not data:
        raise ValueError("a feature pickle holds a non-empty dict {video: {rgb, flow, anno}}")
    widths = None
    for video, entry in data.items():
        if not isinstance(entry, Mapping) or {"rgb", "flow", "anno"} - set(entry):
            raise ValueError(f"video {video!r}: expected a dict with 'rgb', 'flow' and 'anno'")
        arrays = [np.asarray(entry[k]) for k in ("rgb", "flow", "anno")]
        if any(a.ndim != 2 for a in arrays) or len({a.shape[0] for a in arrays}) != 1:
            shapes = {k: np.asarray(entry[k]).shape for k in ("rgb", "flow", "anno")}
            raise ValueError(f"video {video!r}: expected 2-D arrays with the same number of "
                             f"frames, got {shapes}")
        w = tuple(a.shape[1] for a in arrays)
        if widths is not None and w != widths:
            raise ValueError(f"video {video!r}: widths (rgb, flow, anno) {w} differ from the "
                             f"other videos' {widths}")
        widths = w


class ThumosFeatures(torch.utils.data.Dataset):
    """Videos of a THUMOS14-style feature pickle as streams: features ``(C, T)``, labels ``(T, K)``.

    Features are the concatenation of the ``rgb`` and ``flow`` arrays per frame (``C`` = 4096
    for Kinetics TSN features), labels the ``anno`` arrays.

    Args:
        source: a pickle path, its bytes, or an already loaded dict.
        videos: the videos to use (e.g. a split's list), in this order; default all, sorted.
        dtype: dtype of the feature and label tensors.

    Example:
        >>> import pickle, numpy as np
        >>> from costream.models import ThumosFeatures
        >>> data = {"v1": {"rgb": np.ones((6, 3)), "flow": np.zeros((6, 2)),
        ...                "anno": np.eye(4)[[0, 0, 1, 1, 1, 0]]}}
        >>> ds = ThumosFeatures(pickle.dumps(data))
        >>> x, y = ds[0]
        >>> x.shape, y.shape, ds.in_features, ds.num_classes
        (torch.Size([5, 6]), torch.Size([6, 4]), 5, 4)
        >>> xs, ys = ds.chunks(window=3, outputs=4)  # 2 zero frames first: 8 frames, 2 chunks
        >>> xs.shape, ys.shape, ys.sum().item()  # the end padding has no labels
        (torch.Size([2, 5, 6]), torch.Size([2, 4, 4]), 6.0)
    """

    def __init__(self, source: str | Path | bytes | Mapping[str, Any],
                 videos: Sequence[str] | None = None, *, dtype: torch.dtype = torch.float32,
                 ) -> None:
        data = source if isinstance(source, Mapping) else load_thumos_features(source)
        if isinstance(source, Mapping):
            _validate(data)
        names = sorted(data) if videos is None else list(videos)
        missing = [v for v in names if v not in data]
        if missing:
            raise KeyError(f"videos not in the feature file: {missing[:5]}")
        self.videos = names
        self._features = [torch.as_tensor(np.concatenate(
            [np.asarray(data[v]["rgb"]), np.asarray(data[v]["flow"])], 1), dtype=dtype).t()
            for v in names]
        self._labels = [torch.as_tensor(np.asarray(data[v]["anno"]), dtype=dtype) for v in names]

    @property
    def in_features(self) -> int:
        """``C``: feature width (rgb + flow)."""
        return self._features[0].shape[0]

    @property
    def num_classes(self) -> int:
        """``K``: label width (classes, background included)."""
        return self._labels[0].shape[1]

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._features[index], self._labels[index]

    def chunks(self, window: int, outputs: int) -> tuple[Tensor, Tensor]:
        """Training chunks: ``(N, C, outputs + window - 1)`` features, ``(N, outputs, K)`` labels.

        Each video is preceded by ``window - 1`` zero frames (so its first frame has a full
        window, as when streaming it from :func:`pad_start`) and cut into chunks starting every
        ``outputs`` frames; a model with ``window`` frames of receptive field yields one
        prediction per chunk position, for the frame with that chunk's labels. Chunks past a
        video's end are zero-filled with all-zero labels (mask them out of a loss). When
        ``outputs`` is a multiple of a recycling positional encoding's period, a chunk's
        positions equal those of streaming the padded video from its start.
        """
        if window < 1 or outputs < 1:
            raise ValueError(f"window and outputs must be positive, got {window}, {outputs}")
        xs, ys = [], []
        for x, y in zip(self._features, self._labels):
            x = pad_start(x, window)
            t = y.shape[0]
            count = -(-t // outputs)
            length = count * outputs + window - 1
            x = torch.nn.functional.pad(x, (0, length - x.shape[1]))
            y = torch.nn.functional.pad(y, (0, 0, 0, count * outputs - t))
            xs.append(x.unfold(1, outputs + window - 1, outputs).permute(1, 0, 2))
            ys.append(y.view(count, outputs, -1))
        return torch.cat(xs), torch.cat(ys)


def pad_start(features: Tensor, window: int) -> Tensor:
    """``features`` ``(C, T)`` preceded by ``window - 1`` zero frames: ``(C, T + window - 1)``.

    Streamed through a model with ``window`` frames of receptive field, the padded video yields
    one prediction per original frame (as OadTR, whose windows are zero-padded at a video's
    start).

    Example:
        >>> import torch
        >>> from costream.models import pad_start
        >>> pad_start(torch.ones(2, 3), 3)
        tensor([[0., 0., 1., 1., 1.],
                [0., 0., 1., 1., 1.]])
    """
    return torch.nn.functional.pad(features, (window - 1, 0))


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Average precision of ranking ``scores`` ``(N,)`` against boolean ``positives`` ``(N,)``.

    The area under the precision-recall curve as a step function: the sum over score
    thresholds of (recall gained) x (precision at that threshold); frames with equal scores
    count as one threshold. ``nan`` without positives.

    Example:
        >>> import numpy as np
        >>> from costream.models import average_precision
        >>> average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]))
        0.8333333333333333
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    p = np.asarray(positives).reshape(-1).astype(bool)
    if s.shape != p.shape:
        raise ValueError(f"scores and positives differ in shape: {s.shape} vs {p.shape}")
    total = int(p.sum())
    if total == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, p = s[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(p)[last]
    precision = tp / (last + 1)
    gained = np.diff(np.r_[0, tp]) / total
    return float(np.sum(gained * precision))


def per_frame_map(scores: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                  ignore: Sequence[int] = (0,)) -> tuple[float, np.ndarray]:
    """Per-frame mAP: average precision of every class over all frames, averaged.

    Args:
        scores: ``(N, K)`` class scores of ``N`` frames (e.g. softmax probabilities), all
            videos' frames together.
        labels: ``(N, K)`` one-hot or multi-hot ground truth (a frame is a positive of every
            class whose label is > 0).
        ignore: classes left out of the mean; by default the background class 0, as OadTR
            reports THUMOS14 (pass ``(0, 21)`` to leave out its "ambiguous" class as well).

    Returns:
        ``(mAP, aps)``: the mean over the classes that are not ignored and have positives, and
        the ``(K,)`` per-class APs (``nan`` for ignored classes and classes without positives).

    Example:
        >>> import numpy as np
        >>> from costream.models import per_frame_map
        >>> labels = np.eye(3)[[0, 1, 1, 2, 2]]
        >>> scores = np.array([[.8, .1, .1], [.1, .7, .2], [.2, .3, .5], [.1, .4, .5],
        ...                    [.1, .2, .7]])
        >>> m, aps = per_frame_map(scores, labels)  # class 0 (background) is left out
        >>> round(m, 4), aps.round(4).tolist()  # classes 1 and 2: AP (1 + 2/3) / 2
        (0.8333, [nan, 0.8333, 0.8333])
    """
    s = scores.detach().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"scores and labels must both be (N, K), got {s.shape} and {y.shape}")
    aps = np.full(s.shape[1], np.nan)
    for k in range(s.shape[1]):
        if k not in ignore:
            aps[k] = average_precision(s[:, k], y[:, k] > 0)
    valid = aps[~np.isnan(aps)]
    if valid.size == 0:
        raise ValueError("no class (outside `ignore`) has a positive frame")
    return float(valid.mean()), aps

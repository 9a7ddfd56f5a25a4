"""A small keyword-spotting network over a log-mel front-end, its checkpoint and its detector.

The network is a temporal convolutional network (dilated ``Conv1d`` layers, batch norm, ReLU,
then an average over the last frames and a 1x1 classifier) whose receptive field is exactly one
1-second window of log-mel frames: offline, a 1 s clip gives one output; streamed, every hop
gives the output of the 1 s window ending at that hop, computed continually.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._features import mel_spectrogram

FORMAT = "costream-keyword-spotter"


def spotter_network(n_classes: int, n_mels: int = 40, channels: int = 64,
                    dilations: tuple[int, ...] = (1, 2, 4, 8, 16),
                    window: int = 98) -> nn.Sequential:
    """The offline keyword network ``(B, n_mels, T)`` -> logits ``(B, n_classes, T - window + 1)``.

    An input ``BatchNorm1d``, dilated ``Conv1d`` (kernel 3) + ``BatchNorm1d`` + ``ReLU`` layers,
    then a ``Conv1d`` classifier over the remaining frames, so that the receptive field is
    ``window`` frames (98 log-mel frames of 10 ms: one second).

    Example:
        >>> import torch
        >>> from costream.audio import spotter_network
        >>> net = spotter_network(12).eval()
        >>> net(torch.randn(2, 40, 98)).shape     # one 1 s window: one output
        torch.Size([2, 12, 1])
    """
    layers: list[nn.Module] = [nn.BatchNorm1d(n_mels)]
    c_in, rf = n_mels, 1
    for d in dilations:
        layers += [nn.Conv1d(c_in, channels, 3, dilation=d), nn.BatchNorm1d(channels), nn.ReLU()]
        c_in, rf = channels, rf + 2 * d
    if window < rf:
        raise ValueError(f"window {window} is shorter than the convolutions' receptive field {rf}")
    layers.append(nn.Conv1d(channels, n_classes, window - rf + 1))
    return nn.Sequential(*layers)


def fold_batch_norms(network: nn.Sequential) -> nn.Sequential:
    """An equivalent network with every eval-mode ``BatchNorm1d`` folded into a ``Conv1d``.

    A norm after a convolution scales its output channels; the input norm (before the first
    convolution, which has no padding) scales its input channels. Fewer modules per step.

    Example:
        >>> import torch
        >>> from costream.audio import fold_batch_norms, spotter_network
        >>> net = spotter_network(4, channels=8).eval()
        >>> x = torch.randn(1, 40, 120)
        >>> torch.allclose(fold_batch_norms(net)(x), net(x), atol=1e-4)
        True
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    mods = [copy.deepcopy(m) for m in network]
    out: list[nn.Module] = []
    pending: nn.BatchNorm1d | None = None
    for m in mods:
        if isinstance(m, nn.BatchNorm1d) and out and isinstance(out[-1], nn.Conv1d):
            out[-1] = fuse_conv_bn_eval(out[-1], m)
        elif isinstance(m, nn.BatchNorm1d):
            pending = m
        elif isinstance(m, nn.Conv1d) and pending is not None:
            if m.padding != (0,) or m.padding_mode != "zeros":
                raise ValueError("an input norm folds only into an unpadded convolution")
            scale = pending.weight / torch.sqrt(pending.running_var + pending.eps)
            shift = pending.bias - pending.running_mean * scale
            with torch.no_grad():
                bias = m.bias if m.bias is not None else torch.zeros(m.out_channels)
                m.bias = nn.Parameter(bias + (m.weight * shift[None, :, None]).sum((1, 2)))
                m.weight = nn.Parameter(m.weight * scale[None, :, None])
            pending = None
            out.append(m)
        else:
            out.append(m)
    return nn.Sequential(*out).eval()


def spotter_front_end(sample_rate: int = 16000, n_fft: int = 480, hop_length: int = 160,
                      n_mels: int = 40, center: bool = False, **_: Any) -> nn.Module:
    """The log-mel front-end the spotter was trained with (see :func:`mel_spectrogram`).

    Example:
        >>> from costream.audio import spotter_front_end
        >>> spotter_front_end().delay    # 480-sample windows, 160-sample hops
        2
    """
    return mel_spectrogram(sample_rate, n_fft, hop_length, n_mels, center=center)


def save_spotter(path: str | Path, network: nn.Module, front: dict, net: dict,
                 classes: list[str], keywords: list[int], threshold: float,
                 smooth: int = 1) -> None:
    """Save a trained spotter: its settings, class names, detection threshold and smoothing
    (hops, see :class:`Detector`) and ``state_dict``.

    Example:
        >>> import tempfile, os
        >>> from costream.audio import load_spotter, save_spotter, spotter_network
        >>> p = os.path.join(tempfile.mkdtemp(), "kws.pt")
        >>> save_spotter(p, spotter_network(3, channels=8), {}, {"channels": 8},
        ...              ["a", "b", "_unknown_"], [0, 1], 0.8)
        >>> load_spotter(p)["classes"]
        ['a', 'b', '_unknown_']
    """
    torch.save({"format": FORMAT, "version": 1, "front": dict(front), "net": dict(net),
                "classes": list(classes), "keywords": list(keywords),
                "threshold": float(threshold), "smooth": int(smooth),
                "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()}},
               str(path))


def load_spotter(path: str | Path) -> dict[str, Any]:
    """Load a spotter saved by :func:`save_spotter` (``weights_only=True``).

    Returns its settings with ``network`` (the offline network, eval mode), ``front_end`` and
    ``model``: the continual front-end + network (batch norms folded into the convolutions),
    raw samples in, one hop per step, logits out.

    Example:
        >>> import tempfile, os, torch
        >>> from costream.audio import load_spotter, save_spotter, spotter_network
        >>> p = os.path.join(tempfile.mkdtemp(), "kws.pt")
        >>> save_spotter(p, spotter_network(3, channels=8), {}, {"channels": 8},
        ...              ["a", "b", "_unknown_"], [0, 1], 0.8)
        >>> model = load_spotter(p)["model"]
        >>> outs = [model.forward_step(torch.zeros(1, 160)) for _ in range(100)]
        >>> outs[-1].shape, model.delay       # 2 hops of STFT warm-up, 97 frames of network
        (torch.Size([1, 3]), 99)
    """
    from ..convert import continual
    from ..modules import Sequential

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"no such model file: {path}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SystemExit(f"{path} is not a keyword spotter saved by costream.audio.save_spotter")
    net_kw = dict(ckpt["net"])
    if "dilations" in net_kw:
        net_kw["dilations"] = tuple(net_kw["dilations"])
    network = spotter_network(len(ckpt["classes"]), **net_kw)
    network.load_state_dict(ckpt["state_dict"])
    network.eval()
    front = spotter_front_end(**ckpt["front"])
    model = Sequential(*front, *continual(fold_batch_norms(network))).eval()
    ckpt.setdefault("smooth", 1)  # spotters saved before smoothing existed
    return dict(ckpt, network=network, front_end=front, model=model)


class Detector:
    """Turns per-hop class posteriors into keyword detections.

    The score of a keyword at a hop is its posterior averaged over the last ``smooth`` hops
    (fewer at the start of the stream; ``smooth=1``: the posterior itself). A keyword is
    detected when its score reaches ``threshold`` after having been below it (a rising edge),
    and not within ``refractory`` hops of its previous detection; an edge held back by the
    refractory period fires at the first later hop of the same run above the threshold.
    Averaging posteriors over a few hundred milliseconds keeps a spoken keyword (many hops
    above threshold) and drops brief confident spikes, the usual source of false alarms.

    Example:
        >>> import torch
        >>> from costream.audio import Detector
        >>> det = Detector(keywords=[0, 1], threshold=0.8, refractory=3)
        >>> [det.update(torch.tensor([p, 0.0, 1 - p])) for p in (0.5, 0.9, 0.95, 0.9, 0.2, 0.9)]
        [[], [0], [], [], [], [0]]
        >>> det = Detector(keywords=[0], threshold=0.8, refractory=3, smooth=2)
        >>> [det.update([p, 1 - p]) for p in (0.5, 0.9, 0.95, 0.9, 0.2, 0.9)]
        [[], [], [0], [], [], []]
    """

    def __init__(self, keywords: Sequence[int], threshold: float, refractory: int,
                 smooth: int = 1) -> None:
        self.keywords = [int(k) for k in keywords]
        self.threshold, self.refractory = float(threshold), int(refractory)
        self.smooth = int(smooth)
        if self.smooth < 1:
            raise ValueError(f"smooth must be at least 1 hop, got {smooth}")
        self.reset()

    def reset(self) -> None:
        """Forget the stream: no history, every keyword armed."""
        self.last = {k: -10 ** 9 for k in self.keywords}
        self.armed = {k: True for k in self.keywords}
        self.history: list[list[float]] = []
        self.score: dict[int, float] = {}  # each keyword's score at the last hop
        self.t = 0

    def update(self, probs: Tensor | Sequence[float]) -> list[int]:
        """Posteriors of one hop ``(n_classes,)`` (a tensor or a sequence of floats); returns
        the keywords detected at this hop."""
        row = [float(probs[k]) for k in self.keywords]
        self.history = [*self.history[1 - self.smooth:], row] if self.smooth > 1 else [row]
        n = len(self.history)
        self.score = {k: sum(h[i] for h in self.history) / n if n > 1 else row[i]
                      for i, k in enumerate(self.keywords)}
        fired = []
        for k, score in self.score.items():
            if score < self.threshold:
                self.armed[k] = True
            elif self.armed[k] and self.t - self.last[k] > self.refractory:
                fired.append(k)
                self.last[k] = self.t
                self.armed[k] = False
        self.t += 1
        return fired

    def scores(self, probs: Tensor) -> Tensor:
        """The smoothed scores ``(T, len(keywords))`` of posteriors ``(T, n_classes)`` of a
        whole stream (what :meth:`update` compares with the threshold, hop by hop).

        Example:
            >>> import torch
            >>> from costream.audio import Detector
            >>> Detector([0], 0.5, 10, smooth=2).scores(torch.tensor([[0.2], [0.6], [1.0]]))
            tensor([[0.2000],
                    [0.4000],
                    [0.8000]], dtype=torch.float64)
        """
        p = torch.as_tensor(probs, dtype=torch.float64)[:, self.keywords]
        if self.smooth == 1:
            return p
        c = torch.cat([p.new_zeros(1, p.shape[1]), p.cumsum(0)])
        n = torch.arange(1, p.shape[0] + 1, dtype=p.dtype).clamp(max=self.smooth)[:, None]
        lo = (torch.arange(1, p.shape[0] + 1) - self.smooth).clamp(min=0)
        return (c[1:] - c[lo]) / n

    def scan(self, probs: Tensor) -> list[tuple[int, int]]:
        """Detections ``(hop, keyword)`` over posteriors ``(T, n_classes)`` of a whole stream,
        as :meth:`update` would make them hop by hop from a fresh detector (vectorised: cheap
        enough to sweep thresholds over hours of audio). The detector's state is not used.

        Example:
            >>> import torch
            >>> from costream.audio import Detector
            >>> p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.9, 0.1], [0.95, 0.05]])
            >>> Detector([0], 0.8, refractory=2).scan(p)
            [(1, 0), (4, 0)]
        """
        import numpy as np

        above = (self.scores(probs) >= self.threshold).numpy()
        found = []
        for i, k in enumerate(self.keywords):
            a = np.concatenate([[False], above[:, i], [False]])
            starts = np.flatnonzero(a[1:] & ~a[:-1])
            ends = np.flatnonzero(~a[1:] & a[:-1])  # runs [start, end) above the threshold
            last = -10 ** 9
            for s, e in zip(starts.tolist(), ends.tolist()):
                t = max(s, last + self.refractory + 1)
                if t < e:
                    found.append((t, k))
                    last = t
        return sorted(found)

"""Whether a network forgets: can the last frames, replayed from a fresh state, rebuild a
stream? True for convolutions, pooling and windowed attention (finite receptive field); false
for recurrent layers, which declare a receptive field of 1 but remember every frame."""

from __future__ import annotations

import copy

import torch

from ..core._module import CoModule
from ..runtime import StreamEngine


def replay_length(module: CoModule) -> tuple[int, int]:
    """``(fewest frames to replay, log cap)``: ``max(receptive_field, warm_up + 1)`` and that
    plus ``stride - 1`` (a stream rebuilt from ``k`` frames must be at its phase)."""
    t = module.temporal
    least = max(t.receptive_field, module._total_delay() + 1)
    return least, least + t.stride - 1


def replay_rebuilds(module: CoModule, frame_shape: tuple[int, ...], *, extra: int = 8,
                    check: int = 4, seed: int = 0) -> bool:
    """Check on random frames (float64 copy of ``module``) that a stream rebuilt from its
    last frames (:func:`replay_length`) continues with the outputs of the stream itself.

    Example:
        >>> import costream as cs
        >>> from torch import nn
        >>> from costream.serve._memory import replay_rebuilds
        >>> replay_rebuilds(cs.Conv1d(2, 3, 3), (2,))
        True
        >>> replay_rebuilds(cs.continual(nn.GRU(2, 3)), (2,))
        False
    """
    net = copy.deepcopy(module).double().eval()
    _, cap = replay_length(net)
    stride = net.temporal.stride
    n = cap + extra
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randn(n + check * stride, *frame_shape, dtype=torch.float64, generator=gen)
    engine = StreamEngine(net, capacity=2, frame_shape=frame_shape, dtype=torch.float64)
    a, b = engine.open(), engine.open()
    k = cap - (cap - n) % stride
    with torch.inference_mode():
        for f in frames[:n]:
            engine.step({a: f})
        for f in frames[n - k: n]:
            engine.step({b: f})
        for f in frames[n:]:
            ya, yb = engine.step({a: f})[a], engine.step({b: f})[b]
            if (ya is None) != (yb is None):
                return False
            if ya is not None and not torch.allclose(ya, yb, rtol=1e-9, atol=1e-9):
                return False
    return True


def choose_capped_log(module: CoModule, frame_shape: tuple[int, ...], capped_log: bool | None,
                      snapshot_every_s: float | None) -> bool:
    """Whether a served stream's log is capped (see ``ServeConfig.capped_log``); refuses
    settings under which a replica's death would lose streams.

    Example:
        >>> import costream as cs
        >>> from torch import nn
        >>> from costream.serve._memory import choose_capped_log
        >>> choose_capped_log(cs.continual(nn.GRU(2, 3)), (2,), None, 1.0)
        False
        >>> choose_capped_log(cs.continual(nn.GRU(2, 3)), (2,), None, None)
        Traceback (most recent call last):
        ...
        ValueError: snapshot_every_s=None needs a capped log: nothing would rebuild ...
    """
    capped = capped_log
    if capped is not False:
        rebuilds = replay_rebuilds(module, frame_shape)
        if capped and not rebuilds:
            raise ValueError("capped_log: replaying the last receptive_field frames does not "
                             "rebuild this network's streams (it remembers more, e.g. a "
                             "recurrent layer)")
        capped = rebuilds
    if not capped and snapshot_every_s is None:
        raise ValueError("snapshot_every_s=None needs a capped log: nothing would rebuild a "
                         "stream after a replica dies")
    return bool(capped)

"""The registry of module cases: every continual layer meets the streaming contract.

Each case is a factory ``fn(dtype) -> (module, x, reference)``: the continual module, a clip
``(B, C, T, ...)`` (or a tuple of clips) with batch >= 2, and the offline computation that
``module.forward`` must equal (a callable built from ``torch`` only, or a tensor).
Every case runs through :func:`costream.testing.assert_streaming_equivalent` in float64 and
float32.

To add a layer, write a factory and decorate it::

    @case("my_layer")
    def _my_layer(dtype):
        src = torch.nn.MyLayer(...).to(dtype)
        return costream.continual(src), randn(2, 4, 12, dtype=dtype), src
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import costream as cs
from costream.testing import assert_streaming_equivalent, tolerances

Case = tuple[nn.Module, Any, Any]
Factory = Callable[[torch.dtype], Case]
CASES: dict[str, Factory] = {}


def case(name: str) -> Callable[[Factory], Factory]:
    """Register a factory under ``name`` (names are unique)."""

    def register(fn: Factory) -> Factory:
        if name in CASES:
            raise ValueError(f"duplicate registry case {name!r}")
        CASES[name] = fn
        return fn

    return register


def randn(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(*shape, dtype=dtype)


def converted(src: nn.Module, dtype: torch.dtype, **options: Any) -> tuple[nn.Module, nn.Module]:
    """``(continual(src), src)`` in ``dtype``, after checking the parameters are shared."""
    src = src.to(dtype)
    co = cs.continual(src, **options)
    for (name, p), (co_name, q) in zip(src.named_parameters(), co.named_parameters(), strict=True):
        assert name == co_name
        assert p is q, f"parameter {name} is not shared with the torch module"
    return co, src


def channels_last(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A reference applying ``fn`` over the channel dim (dim 1) of a clip."""
    return lambda x: fn(x.movedim(1, -1)).movedim(-1, 1)


# ---------------------------------------------------------------------------- convolutions
@case("conv1d")
def _conv1d(dtype: torch.dtype) -> Case:
    co, src = converted(nn.Conv1d(4, 6, 3, padding=1), dtype)
    return co, randn(3, 4, 13, dtype=dtype), src


@case("conv1d_unpadded_no_bias")
def _conv1d_unpadded(dtype: torch.dtype) -> Case:
    co, src = converted(nn.Conv1d(4, 5, 4, bias=False), dtype)
    return co, randn(2, 4, 12, dtype=dtype), src


@case("conv1d_strided_dilated_groups")
def _conv1d_sdg(dtype: torch.dtype) -> Case:
    co, src = converted(nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=3, groups=2), dtype)
    return co, randn(3, 4, 17, dtype=dtype), src


@case("conv1d_replicate")
def _conv1d_replicate(dtype: torch.dtype) -> Case:
    co, src = converted(nn.Conv1d(3, 4, 5, padding=2, padding_mode="replicate"), dtype)
    return co, randn(2, 3, 11, dtype=dtype), src


@case("conv1d_kernel1")
def _conv1d_k1(dtype: torch.dtype) -> Case:
    co, src = converted(nn.Conv1d(3, 4, 1), dtype)
    return co, randn(2, 3, 7, dtype=dtype), src


@case("conv2d")
def _conv2d(dtype: torch.dtype) -> Case:
    co, src = converted(nn.Conv2d(3, 4, (3, 3), padding=(1, 1)), dtype)
    return co, randn(2, 3, 10, 6, dtype=dtype), src


@case("conv2d_strided_replicate")
def _conv2d_sr(dtype: torch.dtype) -> Case:
    src = nn.Conv2d(4, 6, (3, 2), stride=(3, 2), padding=(2, 1), dilation=(2, 1), groups=2,
                    padding_mode="replicate")
    co, src = converted(src, dtype)
    return co, randn(3, 4, 19, 7, dtype=dtype), src


@case("conv3d")
def _conv3d(dtype: torch.dtype) -> Case:
    co, src = converted(nn.Conv3d(2, 4, 3, padding=(1, 1, 1)), dtype)
    return co, randn(2, 2, 8, 5, 5, dtype=dtype), src


@case("conv3d_strided_dilated")
def _conv3d_sd(dtype: torch.dtype) -> Case:
    src = nn.Conv3d(2, 4, (2, 3, 1), stride=(2, 1, 2), dilation=(3, 1, 1), padding=(2, 0, 1))
    co, src = converted(src, dtype)
    return co, randn(2, 2, 15, 5, 4, dtype=dtype), src


@case("conv3d_replicate_asymmetric_spatial")
def _conv3d_rep(dtype: torch.dtype) -> Case:
    src = nn.Conv3d(2, 3, (3, 2, 3), padding=(1, 1, 1), padding_mode="replicate")
    co, src = converted(src, dtype)
    return co, randn(2, 2, 9, 4, 5, dtype=dtype), src


# ---------------------------------------------------------------------------- pooling
@case("avgpool1d")
def _avgpool1d(dtype: torch.dtype) -> Case:
    co, src = converted(nn.AvgPool1d(3, stride=2, padding=1), dtype)
    return co, randn(2, 3, 14, dtype=dtype), src


@case("avgpool2d")
def _avgpool2d(dtype: torch.dtype) -> Case:
    co, src = converted(nn.AvgPool2d((4, 2), stride=(1, 2), padding=(2, 1)), dtype)
    return co, randn(2, 3, 11, 6, dtype=dtype), src


@case("avgpool3d_default_stride")
def _avgpool3d(dtype: torch.dtype) -> Case:
    co, src = converted(nn.AvgPool3d((2, 2, 2)), dtype)
    return co, randn(2, 3, 12, 4, 4, dtype=dtype), src


@case("maxpool1d_dilated")
def _maxpool1d(dtype: torch.dtype) -> Case:
    co, src = converted(nn.MaxPool1d(3, stride=2, padding=1, dilation=2), dtype)
    return co, randn(2, 3, 15, dtype=dtype), src


@case("maxpool2d")
def _maxpool2d(dtype: torch.dtype) -> Case:
    co, src = converted(nn.MaxPool2d((3, 3), stride=(1, 2), padding=(1, 1)), dtype)
    return co, randn(2, 3, 10, 7, dtype=dtype), src


@case("maxpool3d")
def _maxpool3d(dtype: torch.dtype) -> Case:
    co, src = converted(nn.MaxPool3d((3, 2, 2), stride=(3, 2, 1), padding=(1, 0, 1)), dtype)
    return co, randn(2, 2, 16, 4, 5, dtype=dtype), src


def _adaptive(kind: str, n: int, size: tuple[int, ...], spatial: tuple[int, ...], window: int):
    def factory(dtype: torch.dtype) -> Case:
        co, src = converted(getattr(nn, f"Adaptive{kind}Pool{n}d")(size), dtype,
                            temporal_window=window)
        assert type(co) is getattr(cs, f"Adaptive{kind}Pool{n}d")
        x = randn(2, 3, 9, *spatial, dtype=dtype)
        # offline: torch's adaptive pool over every window of `window` frames
        ref = lambda v: torch.cat(  # noqa: E731
            [src(v[:, :, i: i + window]) for i in range(v.shape[2] - window + 1)], 2)
        return co, x, ref

    return factory


for _kind in ("Avg", "Max"):
    case(f"adaptive_{_kind.lower()}pool1d")(_adaptive(_kind, 1, (1,), (), 4))
    case(f"adaptive_{_kind.lower()}pool2d")(_adaptive(_kind, 2, (1, 2), (5,), 3))
    case(f"adaptive_{_kind.lower()}pool3d")(_adaptive(_kind, 3, (1, 2, 2), (5, 4), 4))


# ---------------------------------------------------------------------------- per-frame maps
@case("linear")
def _linear(dtype: torch.dtype) -> Case:
    co, src = converted(nn.Linear(4, 3), dtype)
    return co, randn(2, 4, 7, dtype=dtype), channels_last(src)


@case("linear_spatial")
def _linear_spatial(dtype: torch.dtype) -> Case:
    co, src = converted(nn.Linear(4, 3), dtype)
    return co, randn(2, 4, 7, 3, 2, dtype=dtype), channels_last(src)


@case("reshape")
def _reshape(dtype: torch.dtype) -> Case:
    def ref(x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        return x.movedim(2, 1).reshape(b, t, c * h, w).movedim(1, 2)

    return cs.Reshape(-1, 4), randn(2, 3, 6, 2, 4, dtype=dtype), ref


@case("lambda")
def _lambda(dtype: torch.dtype) -> Case:
    return cs.Lambda(torch.tanh), randn(2, 3, 6, 4, dtype=dtype), torch.tanh


@case("reduce_sum")
def _reduce_sum(dtype: torch.dtype) -> Case:
    x = (randn(2, 3, 6, dtype=dtype), randn(2, 3, 6, dtype=dtype))
    return cs.Reduce("sum"), x, lambda v: v[0] + v[1]


@case("reduce_mul")
def _reduce_mul(dtype: torch.dtype) -> Case:
    x = (randn(2, 3, 6, 2, dtype=dtype), randn(2, 3, 6, 2, dtype=dtype))
    return cs.Reduce("mul"), x, lambda v: v[0] * v[1]


@case("reduce_max")
def _reduce_max(dtype: torch.dtype) -> Case:
    x = tuple(randn(2, 3, 6, dtype=dtype) for _ in range(3))
    return cs.Reduce("max"), x, lambda v: torch.maximum(torch.maximum(v[0], v[1]), v[2])


@case("reduce_concat")
def _reduce_concat(dtype: torch.dtype) -> Case:
    x = (randn(2, 3, 6, dtype=dtype), randn(2, 5, 6, dtype=dtype))
    return cs.Reduce("concat"), x, lambda v: torch.cat(v, 1)


# ---------------------------------------------------------------------------- time shifts
@case("delay")
def _delay(dtype: torch.dtype) -> Case:
    return cs.Delay(3), randn(2, 3, 9, dtype=dtype), lambda x: x


@case("delay_zero")
def _delay0(dtype: torch.dtype) -> Case:
    return cs.Delay(0), randn(2, 3, 5, 2, dtype=dtype), lambda x: x


@case("skip_after_padded_conv")
def _skip(dtype: torch.dtype) -> Case:
    src = nn.Conv1d(3, 3, 3, padding=2).to(dtype)
    co = cs.Sequential(cs.continual(src), cs.Skip(2))
    return co, randn(2, 3, 10, dtype=dtype), lambda x: src(x)[:, :, 2:]


@case("skip")
def _skip_only(dtype: torch.dtype) -> Case:
    return cs.Skip(2), randn(2, 3, 8, dtype=dtype), lambda x: x[:, :, 2:]


# ---------------------------------------------------------------------------- containers
@case("sequential_pointwise")
def _sequential_pointwise(dtype: torch.dtype) -> Case:
    bn = nn.BatchNorm1d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    src = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), bn, nn.ReLU(), nn.Dropout(0.5),
                        nn.Conv1d(6, 5, 3), nn.GELU()).eval()
    co, src = converted(src, dtype)
    assert [type(m) for m in co] == [cs.Conv1d, nn.BatchNorm1d, nn.ReLU, nn.Dropout, cs.Conv1d,
                                     nn.GELU]
    return co, randn(3, 4, 12, dtype=dtype), src


@case("sequential_batchnorm2d_3d")
def _sequential_bn(dtype: torch.dtype) -> Case:
    bn2, bn3 = nn.BatchNorm2d(4), nn.BatchNorm3d(3)
    for bn in (bn2, bn3):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    seq2 = nn.Sequential(nn.Conv2d(3, 4, (3, 3), padding=1), bn2, nn.SiLU()).eval()
    co2, seq2 = converted(seq2, dtype)
    seq3 = nn.Sequential(bn3, nn.Conv3d(3, 2, 2), nn.Dropout3d(0.3)).eval()
    co3, seq3 = converted(seq3, dtype)
    # one case, two networks: a 2D stream and a 3D stream side by side in a Parallel
    x = (randn(2, 3, 8, 5, dtype=dtype), randn(2, 3, 8, 4, 4, dtype=dtype))
    par = cs.Parallel(co2, co3)

    def ref(v: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        a, b = seq2(v[0]), seq3(v[1])  # lengths 8 and 7: the longer is cropped, centred
        return a[:, :, :7], b

    return par, x, ref


@case("sequential_nested")
def _sequential_nested(dtype: torch.dtype) -> Case:
    src = nn.Sequential(
        nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.MaxPool1d(2, stride=1), nn.Sequential(nn.Conv1d(4, 4, 3, stride=2))),
        nn.AvgPool1d(2, stride=1),
    )
    co, src = converted(src, dtype)
    assert isinstance(co[1][1], cs.Sequential)
    return co, randn(2, 3, 17, dtype=dtype), src


@case("residual_centre")
def _residual_centre(dtype: torch.dtype) -> Case:
    co, conv = converted(nn.Conv1d(4, 4, 3), dtype)
    return cs.Residual(co), randn(3, 4, 12, dtype=dtype), lambda x: conv(x) + x[:, :, 1:-1]


@case("residual_end")
def _residual_end(dtype: torch.dtype) -> Case:
    co, conv = converted(nn.Conv1d(4, 4, 3), dtype)
    return (cs.Residual(co, align="end"), randn(3, 4, 12, dtype=dtype),
            lambda x: conv(x) + x[:, :, 2:])


@case("residual_centre_odd_crop")
def _residual_odd(dtype: torch.dtype) -> Case:
    co, conv = converted(nn.Conv2d(3, 3, (4, 1)), dtype)
    # 3 frames lost: the centred crop drops 1 at the start and 2 at the end
    return cs.Residual(co), randn(2, 3, 11, 4, dtype=dtype), lambda x: conv(x) + x[:, :, 1:-2]


@case("residual_strided_shortcut")
def _residual_strided(dtype: torch.dtype) -> Case:
    co, conv = converted(nn.Conv1d(4, 6, 3, stride=2, padding=1), dtype)
    co_s, short = converted(nn.Conv1d(4, 6, 1, stride=2), dtype)
    return cs.Residual(co, co_s), randn(3, 4, 13, dtype=dtype), lambda x: conv(x) + short(x)


@case("residual_strided_3d")
def _residual_strided_3d(dtype: torch.dtype) -> Case:
    body = nn.Sequential(nn.Conv3d(2, 4, 3, stride=(2, 1, 1), padding=1), nn.ReLU(),
                         nn.Conv3d(4, 4, 3, padding=1))
    co, body = converted(body, dtype)
    co_s, short = converted(nn.Conv3d(2, 4, 1, stride=(2, 1, 1)), dtype)
    return (cs.Residual(co, co_s), randn(2, 2, 12, 4, 4, dtype=dtype),
            lambda x: body(x) + short(x))


def _concat3(dtype: torch.dtype) -> tuple[list[nn.Module], list[nn.Module]]:
    pairs = [converted(nn.Conv1d(4, 2, 1), dtype), converted(nn.Conv1d(4, 3, 3), dtype),
             converted(nn.Conv1d(4, 2, 5, padding=1), dtype)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@case("broadcast_reduce_concat_three_delays")
def _concat_three(dtype: torch.dtype) -> Case:
    cos, (b0, b1, b2) = _concat3(dtype)
    mod = cs.BroadcastReduce(*cos, reduce="concat")
    return (mod, randn(3, 4, 13, dtype=dtype),
            lambda x: torch.cat([b0(x)[:, :, 1:-1], b1(x), b2(x)], 1))


@case("broadcast_reduce_concat_end")
def _concat_end(dtype: torch.dtype) -> Case:
    cos, (b0, b1, b2) = _concat3(dtype)
    mod = cs.BroadcastReduce(*cos, reduce="concat", align="end")
    return (mod, randn(2, 4, 13, dtype=dtype),
            lambda x: torch.cat([b0(x)[:, :, 2:], b1(x), b2(x)], 1))


def _reduce_case(op: str, combine: Callable[[Tensor, Tensor], Tensor]) -> Factory:
    def factory(dtype: torch.dtype) -> Case:
        (c0, t0), (c1, t1) = (converted(nn.Conv1d(3, 4, 3, padding=1), dtype),
                              converted(nn.Conv1d(3, 4, 5), dtype))
        mod = cs.BroadcastReduce(c0, c1, reduce=op)
        # 12 and 8 frames out: the longer branch loses 2 frames at each end
        return mod, randn(2, 3, 12, dtype=dtype), lambda x: combine(t0(x)[:, :, 2:-2], t1(x))

    return factory


case("broadcast_reduce_sum")(_reduce_case("sum", torch.add))
case("broadcast_reduce_mul")(_reduce_case("mul", torch.mul))
case("broadcast_reduce_max")(_reduce_case("max", torch.maximum))


@case("parallel_tuple")
def _parallel(dtype: torch.dtype) -> Case:
    (c0, t0), (c1, t1) = (converted(nn.Conv1d(3, 4, 3), dtype),
                          converted(nn.Conv1d(2, 5, 1), dtype))
    x = (randn(2, 3, 10, dtype=dtype), randn(2, 2, 10, dtype=dtype))
    return cs.Parallel(c0, c1), x, lambda v: (t0(v[0]), t1(v[1])[:, :, 1:-1])


@case("parallel_then_reduce")
def _parallel_reduce(dtype: torch.dtype) -> Case:
    (c0, t0), (c1, t1) = (converted(nn.Conv1d(3, 4, 3, padding=1), dtype),
                          converted(nn.Conv1d(2, 4, 3, padding=1), dtype))
    mod = cs.Sequential(cs.Parallel(c0, c1), cs.Reduce("sum"), nn.ReLU())
    x = (randn(2, 3, 10, dtype=dtype), randn(2, 2, 10, dtype=dtype))
    return mod, x, lambda v: torch.relu(t0(v[0]) + t1(v[1]))


@case("broadcast_parallel")
def _broadcast(dtype: torch.dtype) -> Case:
    (c0, t0), (c1, t1) = (converted(nn.Conv1d(3, 4, 3, padding=1), dtype),
                          converted(nn.Conv1d(3, 4, 1), dtype))
    mod = cs.Sequential(cs.Broadcast(2), cs.Parallel(c0, c1), cs.Reduce("mul"))
    return mod, randn(2, 3, 9, dtype=dtype), lambda x: t0(x) * t1(x)


def _conditional(training: bool) -> Factory:
    def factory(dtype: torch.dtype) -> Case:
        (c0, t0), (c1, t1) = (converted(nn.Conv1d(3, 3, 5, padding=2), dtype),
                              converted(nn.Conv1d(3, 3, 3, padding=1), dtype))
        mod = cs.Conditional(lambda m, x: not m.training, c0, c1).train(training)
        return mod, randn(2, 3, 11, dtype=dtype), t1 if training else t0

    return factory


case("conditional_true")(_conditional(False))
case("conditional_false")(_conditional(True))


@case("conditional_identity")
def _conditional_identity(dtype: torch.dtype) -> Case:
    co, _ = converted(nn.Conv1d(3, 3, 3, padding=1), dtype)
    mod = cs.Conditional(lambda m, x: False, co)
    return mod, randn(2, 3, 8, dtype=dtype), lambda x: x


@case("network_2d")
def _network_2d(dtype: torch.dtype) -> Case:
    src = nn.Sequential(nn.Conv2d(3, 8, (3, 3), padding=(1, 1)), nn.ReLU(),
                        nn.MaxPool2d((2, 2), stride=(1, 2)), nn.Conv2d(8, 4, (3, 1), stride=(2, 1)),
                        nn.AvgPool2d((2, 1), stride=1))
    co, src = converted(src, dtype)
    return co, randn(2, 3, 18, 6, dtype=dtype), src


# ---------------------------------------------------------------------------- the tests
def test_registry_is_populated() -> None:
    expected = {"Conv1d", "Conv2d", "Conv3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "MaxPool1d",
                "MaxPool2d", "MaxPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
                "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d",
                "AdaptiveMaxPool3d", "Linear", "Reshape", "Lambda", "Reduce", "Delay", "Skip",
                "Sequential", "Residual", "BroadcastReduce", "Parallel", "Broadcast",
                "Conditional"}
    covered = set()
    for factory in CASES.values():
        module = factory(torch.float64)[0]
        covered |= {type(m).__name__ for m in module.modules()}
    assert expected <= covered, f"no registry case for {sorted(expected - covered)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_equivalent(name: str, dtype: torch.dtype) -> None:
    module, x, reference = CASES[name](dtype)
    assert_streaming_equivalent(module, x, reference)


def _cat(parts: list) -> Any:
    parts = [p for p in parts if p is not None]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts], 2) for i in range(len(parts[0])))
    return torch.cat(parts, 2)


def _unsqueeze(y: Any) -> Any:
    return tuple(v.unsqueeze(2) for v in y) if isinstance(y, tuple) else y.unsqueeze(2)


@pytest.mark.parametrize("name", sorted(CASES))
def test_uneven_chunks_then_end_padding(name: str, dtype: torch.dtype) -> None:
    """Single steps, then chunks of 0, 1, 3 and the rest frames with end padding: ``forward``."""
    module, x, _ = CASES[name](dtype)
    t = (x[0] if isinstance(x, tuple) else x).shape[2]

    def part(a: int, b: int) -> Any:
        return tuple(v[:, :, a:b] for v in x) if isinstance(x, tuple) else x[:, :, a:b]

    def frame(i: int) -> Any:
        return tuple(v[:, :, i] for v in x) if isinstance(x, tuple) else x[:, :, i]

    bounds = [min(b, t) for b in (2, 2, 3, 6)] + [t]
    module.reset_state()
    with torch.no_grad():
        expected = module(x)
        outs = [module.forward_step(frame(i)) for i in range(bounds[0])]
        parts = [_unsqueeze(y) for y in outs if y is not None]
        chunks = list(itertools.pairwise(bounds))
        for i, (a, b) in enumerate(chunks):
            parts.append(module.forward_steps(part(a, b), pad_end=i == len(chunks) - 1))
    module.reset_state()
    got = _cat(parts)
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **tolerances(dtype))

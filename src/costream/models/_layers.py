"""Building blocks shared by the zoo's 3D CNNs: convolutions with a temporal fill, residual blocks.

The temporal fill decides what the start (and, offline, the end) of a stream is padded with in
every temporally padded convolution: ``"zeros"`` (torch's default) or ``"replicate"`` (copies of
the edge frame, an option of Co3D, arXiv 2106.00050). Spatial padding always stays zeros,
so both fills keep the spatial computation of the published networks.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import costream as cs
from costream.modules._onednn import linear

from ..core._module import CoModule
from ..modules._cache import DerivedCache
from ..modules._fusion import FUSABLE_CONVS

TemporalFill = Literal["zeros", "replicate"]
FILLS = ("zeros", "replicate")


class Network(cs.Sequential):
    """Base of the zoo networks: a :class:`costream.Sequential` whose slices are plain ones."""

    def __getitem__(self, idx):  # torch would rebuild a slice with this class's constructor
        if isinstance(idx, slice):
            return cs.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


def _triple(v: int | tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)  # type: ignore[return-value]


class ReplicateConv3d(cs.Conv3d):
    """A continual 3D convolution whose temporal padding replicates the edge frames.

    Spatial padding stays zeros (``torch.nn.Conv3d(padding_mode="replicate")`` would replicate
    the spatial borders too). Parameters and ``state_dict`` keys are those of
    :class:`costream.Conv3d`.

    Args:
        in_channels, out_channels, kernel_size, stride, groups, bias: as for ``Conv3d``.
        padding: ``(time, height, width)`` padding; time is replicated, space zero-filled.

    Shape:
        clip ``(B, C_in, T, H, W)`` -> ``(B, C_out, T_out, H_out, W_out)``; frame ``(B, C, H, W)``.

    Example:
        >>> import torch
        >>> from costream.models._layers import ReplicateConv3d
        >>> conv = ReplicateConv3d(2, 4, 3, padding=1).double()
        >>> x = torch.randn(1, 2, 6, 5, 5, dtype=torch.double)
        >>> torch.allclose(conv.forward_steps(x, pad_end=True), conv(x))
        True
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...],
                 stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] = 0,
                 groups: int = 1, bias: bool = True) -> None:
        pt, ph, pw = _triple(padding)
        super().__init__(in_channels, out_channels, _triple(kernel_size), stride=_triple(stride),
                         padding=(pt, 0, 0), groups=groups, bias=bias, padding_mode="replicate")
        self.spatial_padding = (ph, pw)
        self._zero_pad = (pw, pw, ph, ph) if ph or pw else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, spatial_padding={self.spatial_padding} (zeros)"

    def _pad(self, x: Tensor) -> Tensor:
        return x if self._zero_pad is None else F.pad(x, self._zero_pad)

    def _contributions(self, x: Tensor, kernel=None) -> Tensor:
        return super()._contributions(self._pad(x), kernel)

    def _out_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        ph, pw = self.spatial_padding
        return super()._out_spatial((spatial[0] + 2 * ph, spatial[1] + 2 * pw))

    def _clip(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 5:
            return super()._clip(x)  # raises the shape error
        return super()._clip(self._pad(x))


class GemmConv3d(cs.Conv3d):
    """A continual 3D convolution with a 1x1 spatial kernel, stepped as one matrix product.

    Each step multiplies the frame's pixels ``(H * W, C_in)`` by the kernel's ``k`` temporal
    taps stacked as ``(C_in, k * C_out)`` in a single GEMM (channels-last frames need no copy),
    instead of a per-frame 1x1 convolution; ``forward`` on a clip is torch's ``Conv3d``.

    Shape:
        clip ``(B, C_in, T, H, W)`` -> ``(B, C_out, T_out, H_out, W_out)``; frame ``(B, C, H, W)``.

    Example:
        >>> import torch
        >>> from costream.models._layers import GemmConv3d
        >>> conv = GemmConv3d(8, 4, (3, 1, 1), stride=(1, 2, 2), padding=(1, 0, 0)).double()
        >>> x = torch.randn(1, 8, 6, 5, 5, dtype=torch.double)
        >>> torch.allclose(conv.forward_steps(x, pad_end=True), conv(x))
        True
    """

    def _validate(self) -> None:
        super()._validate()
        if self.kernel_size[1:] != (1, 1) or self.groups != 1 or any(self.padding[1:]):
            raise ValueError("GemmConv3d needs a 1x1 spatial kernel, groups=1 and no spatial "
                             "padding")
        # its one-GEMM step with partial sums, not the buffered frames of Conv3d: on CoSlow's
        # k x 1 x 1 layers the buffered 3D conv ran 0.64-1.17x as fast (A/B in one process,
        # 1 and 2 threads, 1 and 8 streams), no steady gain
        self._buffered = False

    def _step(self, x: Tensor, state: dict, age, phase: int, epilogue=None):
        if self._span or self.stride[0] != 1 or x.dim() != 4:
            return super()._step(x, state, age, phase, epilogue)
        # a 1x1x1 kernel has no temporal state and no delay: the frame maps straight through
        params = self._parameters
        sh, sw = self.stride[1], self.stride[2]
        if sh != 1 or sw != 1:
            x = x[:, :, ::sh, ::sw]
        w = params["weight"]
        y = linear(x.permute(0, 2, 3, 1), w.view(w.shape[0], w.shape[1]), params["bias"])
        y = y.permute(0, 3, 1, 2)
        return (y if epilogue is None else epilogue(y)), state, age, phase

    def _contributions(self, x: Tensor, kernel=None) -> Tensor:
        if kernel is not None or x.dim() != 4:
            return super()._contributions(x, kernel)
        params = self._parameters
        w_all, b_all = self._cache.get(params["weight"], params["bias"])
        sh, sw = self.stride[1], self.stride[2]
        if sh != 1 or sw != 1:
            x = x[:, :, ::sh, ::sw]
        y = linear(x.permute(0, 2, 3, 1), w_all.view(w_all.shape[0], -1), b_all)
        n, h, w, kc = y.shape
        # (N, H, W, k * C_out) -> (N, groups=1, k, C_out, H, W), a view with channels innermost
        return y.permute(0, 3, 1, 2).view(n, 1, kc // self.out_channels, self.out_channels, h, w)


FUSABLE_CONVS.add(GemmConv3d)  # its step is the convolution: fused with a following norm

#: Pixels per call (frames x height x width; one 20 x 20 frame) up to which DepthwiseConv3d
#: makes one call for all taps. The call repeats the input once per tap, which pays while
#: per-call overhead dominates (a stream's small maps); over a batch of streams the split taps
#: win (64 CoX3D-XS streams in blocks of 16: 465 -> 431 ms per step, A/B in one process).
_SMALL_MAP = 400


class DepthwiseConv3d(cs.Conv3d):
    """A continual depthwise 3D convolution stepped with one depthwise 2D conv per tap.

    CPU depthwise kernels handle one output per channel far faster than the ``k`` outputs per
    channel of the stacked-tap frame kernel; a 1x1 spatial kernel is a per-channel scale.
    ``forward`` on a clip is torch's ``Conv3d``.

    Shape:
        clip ``(B, C, T, H, W)`` -> ``(B, C, T_out, H_out, W_out)``; frame ``(B, C, H, W)``.

    Example:
        >>> import torch
        >>> from costream.models._layers import DepthwiseConv3d
        >>> conv = DepthwiseConv3d(6, 6, 3, stride=(1, 2, 2), padding=1, groups=6).double()
        >>> x = torch.randn(1, 6, 7, 9, 9, dtype=torch.double)
        >>> torch.allclose(conv.forward_steps(x, pad_end=True), conv(x))
        True
    """

    def _validate(self) -> None:
        super()._validate()
        if not self.groups == self.in_channels == self.out_channels:
            raise ValueError("DepthwiseConv3d needs groups == in_channels == out_channels")
        self._tap_cache = DerivedCache(self._tap_weights)
        self._stacked_cache = DerivedCache(self._stacked_weights)
        # a purely temporal kernel (k x 1 x 1) is a per-channel filter over the last frames:
        # keeping those frames reads k frames and writes one per step, where partial sums
        # write all k taps of every pixel and add k - 1 of them
        stepwise = self.stride[0] == 1 and self.padding_mode == "zeros" and self._span > 0
        self._fir = stepwise and self.kernel_size[1:] == (1, 1) and not any(self._spad)
        # other kernels keep one partial-sum tensor per future output (a tuple): each tap's
        # output adds into the one it is due in, with no stacked copy of all taps and no
        # copy of the due output out of it
        self._sums = stepwise and not self._fir
        self._fir_cache = DerivedCache(self._fir_weights)

    def _fir_weights(self) -> tuple[Tensor, ...]:
        """Each temporal tap's per-channel weights, shaped ``(1, C, 1, 1)``."""
        w = self.weight
        return tuple(w[:, 0, i].reshape(1, -1, 1, 1).contiguous() for i in range(w.shape[2]))

    # ------------------------------------------------------------------ per-frame state steps
    def _init(self, batch: int, shape: tuple, device: torch.device, dtype: torch.dtype):
        if not (self._fir or self._sums):
            return super()._init(batch, shape, device, dtype)
        spatial = self._out_spatial(tuple(shape[1:]))
        frames = tuple(torch.zeros(batch, self.out_channels, *spatial, device=device, dtype=dtype)
                       for _ in range(self._span))
        return {"frames" if self._fir else "sums": frames}, (self.out_channels, *spatial)

    def _step(self, x: Tensor, state: dict, age, phase: int):
        if not (self._fir or self._sums):
            return super()._step(x, state, age, phase)
        x = self._zero_fillers(x, age)
        y, state = self._filter(x, state) if self._fir else self._add_taps(x, state)
        return self._emit(y, state, age, phase)

    def _filter(self, x: Tensor, state: dict) -> tuple[Tensor, dict]:
        """The k x 1 x 1 kernel as a filter over the frames the state keeps."""
        given = x
        sh, sw = self.stride[1], self.stride[2]
        if sh != 1 or sw != 1:
            fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                   and not x.is_contiguous() else torch.contiguous_format)
            x = x[:, :, ::sh, ::sw].contiguous(memory_format=fmt)
        frames = state["frames"]
        params = self._parameters
        taps = self._fir_cache.get(params["weight"])
        bias = params["bias"]
        k, d, span = self._k, self._d, self._span
        y = x * taps[-1] if bias is None else torch.addcmul(bias.view(1, -1, 1, 1), x, taps[-1])
        for i in range(k - 1):
            y.addcmul_(frames[span - (k - 1 - i) * d], taps[i])
        # the state keeps its own copy of the frame: the caller may refill its tensor
        keep = x.clone() if x is given else x
        return y, {"frames": (*frames[1:], keep)}

    def _add_taps(self, x: Tensor, state: dict) -> tuple[Tensor, dict]:
        """Tap outputs into the partial sums: ``sums[j]`` is the sum, so far, of the output due
        ``j`` steps from now; tap ``i`` of this frame belongs to the one due ``(k-1-i) * d``."""
        taps = self._tap_outputs(x)
        sums = state["sums"]
        k, d, span = self._k, self._d, self._span
        y = sums[0] + taps[k - 1]
        new = []
        for m in range(1, span + 1):  # due m steps from now: entry m - 1 after this step
            i = k - 1 - m // d if m % d == 0 else None
            if m == span:
                new.append(taps[0])  # the first contribution to the farthest output
            elif i is None:
                new.append(sums[m])
            else:
                new.append(sums[m] + taps[i])
        return y, {"sums": tuple(new)}

    def _tap_outputs(self, x: Tensor) -> list[Tensor]:
        """Each temporal tap's output ``(N, C, H_out, W_out)`` for frames ``x``, the bias on the
        last (the tap due now)."""
        if (x.device.type == "cpu" and x.dtype != torch.float64
                and x.shape[0] * x.shape[2] * x.shape[3] > _SMALL_MAP
                and self.kernel_size[1:] != (1, 1)):
            return self._split_taps(x)
        z = self._contributions(x)  # (N, C, k, 1, H, W)
        return [z[:, :, i, 0] for i in range(self._k)]

    def _split_taps(self, x: Tensor) -> list[Tensor]:
        """One depthwise 2D conv per temporal tap (channels-last on the CPU), the bias on the
        last tap's output."""
        params = self._parameters
        weights = self._tap_cache.get(params["weight"])
        bias = params["bias"]
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        last = len(weights) - 1
        return [F.conv2d(x, w, bias if t == last else None, self.stride[1:], self.padding[1:],
                         self.dilation[1:], self.groups) for t, w in enumerate(weights)]

    def _steps(self, x: Tensor, state: dict, age, phase: int):
        if not (self._fir or self._sums):
            return super()._steps(x, state, age, phase)
        return CoModule._steps(self, x, state, age, phase)

    def _flush(self, state: dict, age, phase: int):
        if not (self._fir or self._sums):
            return super()._flush(state, age, phase)
        pad = self._tpad[1]
        if pad <= 0:
            return None, state, None, 0
        last = (state["frames"] if self._fir else state["sums"])[-1]
        # zero end frames, sized to give frames of the state's size after the spatial kernel
        size = [(last.shape[2 + dim] - 1) * self.stride[1 + dim]
                + self.dilation[1 + dim] * (self.kernel_size[1 + dim] - 1) + 1
                - self._spad[2 - 2 * dim] - self._spad[3 - 2 * dim] for dim in (0, 1)]
        zeros = last.new_zeros(last.shape[0], last.shape[1], pad, *size)
        return self._steps(zeros, state, age, phase)

    def _stacked_weights(self) -> tuple[Tensor, Tensor | None]:
        """Weights ``(k * C, 1, kh, kw)`` (tap-major) and the bias on the last tap's channels."""
        w, k = self.weight, self.kernel_size[0]
        wk = w.permute(2, 0, 1, 3, 4).reshape(k * w.shape[0], 1, *w.shape[3:]).contiguous()
        bk = None
        if self.bias is not None:
            bk = torch.zeros(k, w.shape[0], dtype=w.dtype, device=w.device)
            bk[-1] = self.bias
            bk = bk.view(-1)
        return wk, bk

    def _tap_weights(self) -> tuple[Tensor, ...]:
        w = self.weight
        if self.kernel_size[1:] == (1, 1):
            return (w.view(1, w.shape[0], w.shape[2], 1, 1),)
        return tuple(w[:, :, t].contiguous() for t in range(w.shape[2]))

    def _contributions(self, x: Tensor, kernel=None) -> Tensor:
        if kernel is not None or x.dim() != 4:
            return super()._contributions(x, kernel)
        params = self._parameters
        taps = self._tap_cache.get(params["weight"])
        bias = params["bias"]  # added to the last tap, the one due now
        sh, sw = self.stride[1], self.stride[2]
        if self.kernel_size[1:] == (1, 1) and not any(self.padding[1:]):
            # a per-channel scale: in NCHW order the broadcast runs over whole rows of pixels,
            # several times faster than over the 1-channel-wide rows of a channels-last frame
            z = x[:, :, ::sh, ::sw].contiguous().unsqueeze(2) * taps[0]  # (N, C, k, H, W)
            if bias is not None:
                z[:, :, -1] += bias.view(-1, 1, 1)
        elif x.dtype == torch.float64 and x.device.type == "cpu":
            # no fast float64 depthwise kernel on CPU: im2col and one batched matmul
            n, c = x.shape[:2]
            kh, kw = self.kernel_size[1:]
            cols = F.unfold(x, (kh, kw), self.dilation[1:], self.padding[1:], (sh, sw))
            w = params["weight"].view(1, c, -1, kh * kw).expand(n, -1, -1, -1)
            z = torch.matmul(w, cols.view(n, c, kh * kw, -1))  # (N, C, k, H_out * W_out)
            if bias is not None:
                z[:, :, -1] += bias.view(-1, 1)
            h_out = (x.shape[2] + 2 * self.padding[1] - self.dilation[1] * (kh - 1) - 1) // sh + 1
            z = z.view(n, c, z.shape[2], h_out, -1)
        elif x.shape[0] * x.shape[2] * x.shape[3] <= _SMALL_MAP and x.device.type == "cpu":
            # small maps: per-call overhead dominates; one depthwise conv over the input
            # repeated once per tap (channels-last, tap-major, so each tap's channels stay
            # adjacent in memory for the partial-sum updates) yields (k, C) channels directly
            n, c, h, w = x.shape
            k = len(taps)
            xr = x.permute(0, 2, 3, 1).unsqueeze(3).expand(n, h, w, k, c)
            xr = xr.reshape(n, h, w, k * c).permute(0, 3, 1, 2)
            wk, bk = self._stacked_cache.get(params["weight"], bias)
            y = F.conv2d(xr, wk, bk, (sh, sw), self.padding[1:], self.dilation[1:], c * k)
            z = y.view(n, k, c, *y.shape[2:]).transpose(1, 2)
        else:
            z = torch.stack(self._split_taps(x), 2)
        return z.unsqueeze(3)  # (N, groups=C, k, C_out / groups = 1, H, W)


class ReplicateDepthwiseConv3d(ReplicateConv3d, DepthwiseConv3d):
    """:class:`DepthwiseConv3d` with the temporal fill of :class:`ReplicateConv3d`."""


def conv3d(in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...], *,
           stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] = 0, groups: int = 1,
           bias: bool = False, fill: TemporalFill = "zeros") -> cs.Conv3d:
    """A continual ``Conv3d`` whose temporal padding is filled with ``fill``."""
    if fill not in FILLS:
        raise ValueError(f"temporal_fill must be one of {FILLS}, got {fill!r}")
    pad = _triple(padding)
    kernel = _triple(kernel_size)
    if kernel[1:] == (1, 1) and groups == 1 and pad[1:] == (0, 0):
        mode = "replicate" if fill == "replicate" and pad[0] > 0 else "zeros"
        return GemmConv3d(in_channels, out_channels, kernel, stride=stride, padding=pad,
                          bias=bias, padding_mode=mode)
    depthwise = groups == in_channels == out_channels
    if fill == "replicate" and pad[0] > 0:
        if pad[1] or pad[2]:
            cls = ReplicateDepthwiseConv3d if depthwise else ReplicateConv3d
            return cls(in_channels, out_channels, kernel_size, stride, pad, groups, bias)
        if depthwise:
            return DepthwiseConv3d(in_channels, out_channels, kernel_size, stride=stride,
                                   padding=pad, groups=groups, bias=False,
                                   padding_mode="replicate")
        return cs.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=pad,
                         groups=groups, bias=bias, padding_mode="replicate")
    cls = DepthwiseConv3d if depthwise else cs.Conv3d
    return cls(in_channels, out_channels, kernel_size, stride=stride, padding=pad, groups=groups,
               bias=bias)


def batch_norm(channels: int) -> nn.BatchNorm3d:
    """Batch norm with the defaults of PyTorchVideo and PySlowFast (eps 1e-5, momentum 0.1)."""
    return nn.BatchNorm3d(channels, eps=1e-5, momentum=0.1)


def residual_block(main: nn.Module, shortcut: nn.Module | None = None) -> cs.Sequential:
    """``relu(main(x) + shortcut(x))``; the shortcut (identity if ``None``) is aligned in time.

    Children are named ``branches.main``, ``branches.shortcut`` and ``act``.
    """
    branches = cs.BroadcastReduce(
        OrderedDict(main=main, shortcut=shortcut if shortcut is not None else nn.Identity()),
        reduce="sum")
    return cs.Sequential(OrderedDict(branches=branches, act=nn.ReLU(inplace=True)))


def projection(in_channels: int, out_channels: int, spatial_stride: int,
               bn: bool = True) -> cs.Sequential:
    """The projection shortcut of a stage's first block: 1x1x1 conv (spatial stride), BN."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv", conv3d(in_channels, out_channels, 1, stride=(1, spatial_stride, spatial_stride)))]
    if bn:
        layers.append(("bn", batch_norm(out_channels)))
    return cs.Sequential(OrderedDict(layers))


def classifier(in_channels: int, num_classes: int, dropout: float,
               activation: str | None) -> list[tuple[str, nn.Module]]:
    """Dropout, linear projection over channels, optional activation, and flattening."""
    layers: list[tuple[str, nn.Module]] = [
        ("dropout", nn.Dropout(dropout)),
        ("proj", cs.Linear(in_channels, num_classes)),
    ]
    if activation == "softmax":
        layers.append(("activation", nn.Softmax(dim=1)))
    elif activation == "sigmoid":
        layers.append(("activation", nn.Sigmoid()))
    elif activation is not None:
        raise ValueError(
            f"head_activation must be 'softmax', 'sigmoid' or None, got {activation!r}")
    layers.append(("flatten", cs.Reshape(-1)))
    return layers


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every eval-mode batch norm folded into the convolution before it.

    ``conv -> bn`` pairs inside :class:`costream.Sequential` containers become one convolution
    with scaled weights and a bias (exact, padding included); the batch norms are removed. An
    inference-only transform: the copy has different ``state_dict`` keys and no batch norms to
    train.

    Example:
        >>> import torch
        >>> from costream.models import create_model, fold_batch_norm
        >>> net = create_model("cox3d_xs", num_classes=3, head_pool=1).double()
        >>> for m in net.modules():  # non-trivial statistics
        ...     if isinstance(m, torch.nn.BatchNorm3d):
        ...         _ = m.running_var.uniform_(0.5, 2.0), m.running_mean.normal_()
        >>> folded = fold_batch_norm(net)
        >>> x = torch.randn(1, 3, 4, 32, 32, dtype=torch.double)
        >>> torch.allclose(folded(x), net(x))
        True
    """
    model = copy.deepcopy(model)
    for seq in [m for m in model.modules() if isinstance(m, cs.Sequential)]:
        names = list(seq._modules)
        for prev, name in itertools.pairwise(names):
            conv, bn = seq._modules.get(prev), seq._modules.get(name)
            if not (isinstance(conv, cs.Conv3d) and isinstance(bn, nn.BatchNorm3d)):
                continue
            if bn.training or bn.running_mean is None:
                raise ValueError("fold_batch_norm needs eval-mode batch norms with statistics")
            with torch.no_grad():
                scale = bn.running_var.add(bn.eps).rsqrt()
                if bn.weight is not None:
                    scale = scale * bn.weight
                bias = -bn.running_mean * scale
                if bn.bias is not None:
                    bias = bias + bn.bias
                if conv.bias is not None:
                    bias = bias + conv.bias * scale
                conv.weight.mul_(scale.view(-1, *(1,) * (conv.weight.dim() - 1)))
                conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            del seq._modules[name]
    for m in model.modules():
        if isinstance(m, cs.CoModule):
            m._prepare()
    return model


def check_positive(name: str, value: int) -> int:
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)

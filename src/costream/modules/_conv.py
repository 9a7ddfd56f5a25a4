"""Continual convolutions (Co3D, arXiv 2106.00050, section 3).

Each step convolves only the new frame, with all ``k`` temporal taps stacked as output channels of
one spatial convolution, and adds the results into ``(k - 1) * dilation`` running partial sums: the
MACs executed per step equal those of one output frame of the offline convolution. A ``Conv3d``
with temporal taps and zero padding instead keeps its last ``(k - 1) * dilation`` input frames
and convolves them with the new one, the whole kernel at once (:meth:`_CoConvNd._buffer_step`):
the same MACs, in one 3D convolution that oneDNN runs faster than the 2D one plus the sums.
With 3-5 taps and stride and dilation 1 in time it steps in pairs (:mod:`._pairs`): two
outputs from ``k + 1`` frame convolutions instead of ``2 k`` (:meth:`_CoConvNd._pair_step`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core._module import Age, CoModule, advance, chunk_emissions, crop_warm_up, emits
from ..core._temporal import Temporal, as_ints
from ._cache import DerivedCache, Scratch
from ._onednn import (
    ONEDNN_CONV,
    PackedConvKernels,
    onednn_conv,
    onednn_conv_add,
    onednn_inference,
    onednn_linear,
    onednn_usable,
    prefers_onednn,
)
from ._pairs import PAIRED_KERNELS, combine, pair_transforms, pairs_pay

if TYPE_CHECKING:
    from ._fusion import Epilogue

_FRAME_CONV = {1: F.conv1d, 2: F.conv2d}
_ONEDNN = hasattr(torch, "mkldnn_convolution") and torch.backends.mkldnn.is_available()
_ONEDNN_PACKED = _ONEDNN and ONEDNN_CONV is not None
_PAIRS = [True]  # paired steps on (switched off only to measure them against the direct step)
# a paired conv's state "due": no pair open (0), its carry as the conv computes it, or in the
# scale of the batch norm its fused steps fold into the kernels
_CARRY, _FOLDED_CARRY = 1, 2
_FOLD = [True]  # fused paired steps fold their norm (switched off only to measure it)
#: the frame combinations of a pair's first step, shared by every layer (written and read
#: within one call: the memory the previous layer wrote, still in the caches)
_SCRATCH = Scratch()
#: ``entry = (x, conv)``: a container hands the paired ``conv`` its input ``x`` as its own (an
#: intermediate of the step that nothing else reads or writes), which the conv then keeps as a
#: frame of its state without a copy (see costream.Sequential._step)
HANDED = threading.local()


def _stack_frames(frames) -> Tensor:
    """Frames ``(B, C, H, W)`` stacked on a new time dim 2 (channels-last on the CPU)."""
    return torch.stack(frames, 2)


def _scratch_ok() -> bool:
    """Whether a step may write into :data:`_SCRATCH`: not under autograd (which records no
    writes into a given tensor), not while compiling or exporting (a traced graph would hold
    the buffer)."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.compiler.is_exporting())


def _scratch_like(x: Tensor, shape: tuple) -> Tensor:
    """A channels-last scratch frame tensor ``(B, C, H, W)`` of ``shape`` in ``x``'s dtype
    (paired steps run on the CPU only)."""
    return _SCRATCH.get(shape, x.dtype, x.device, torch.channels_last)


class _CoConvNd(CoModule):
    """Shared implementation of :class:`Conv1d`, :class:`Conv2d` and :class:`Conv3d`."""

    _torch_base: type[nn.modules.conv._ConvNd]
    _ndim: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # numpy integers (PyTorchVideo builds its strides with numpy) become Python ints
        for name in ("kernel_size", "stride", "padding", "dilation", "output_padding",
                     "_reversed_padding_repeated_twice"):
            setattr(self, name, as_ints(getattr(self, name)))
        self._validate()

    @classmethod
    def from_torch(cls, conv: nn.modules.conv._ConvNd) -> _CoConvNd:
        """A continual conv sharing ``conv``'s parameters (same names, same tensors)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def _validate(self) -> None:
        if self.padding_mode not in ("zeros", "replicate"):
            raise ValueError(
                f"continual {type(self).__name__} supports padding_mode 'zeros' and 'replicate', "
                f"not {self.padding_mode!r} (it would need future or wrapped-around frames)"
            )
        if getattr(self, "output_padding", (0,))[0] != 0 or self.transposed:
            raise ValueError("transposed convolutions are not supported")
        pad = self._reversed_padding_repeated_twice
        self._tpad = (pad[-2], pad[-1])
        self._spad = list(pad[:-2])
        k, d = self.kernel_size[0], self.dilation[0]
        if self._tpad[0] > (k - 1) * d:
            raise ValueError(
                f"temporal padding {self._tpad[0]} exceeds (kernel_size - 1) * dilation = "
                f"{(k - 1) * d}: outputs would depend on padding only"
            )
        self._span = (k - 1) * d
        self._k, self._d = k, d
        self._lean = (self._ndim == 1 and self.groups == 1 and d == 1 and k > 1
                      and self.stride[0] == 1)
        sp = self._spad
        symmetric = self._ndim == 3 and sp[0] == sp[1] and sp[2] == sp[3]
        # a 3D conv with temporal taps keeps its last input frames and convolves them with the
        # whole kernel at each step (see _buffer_step); a subclass keeping other state
        # overrides _init and _step for it (DepthwiseConv3d's filters and per-output sums)
        self._buffered = symmetric and self._span > 0 and self.padding_mode == "zeros"
        # ... and with stride and dilation 1 in time, steps in pairs: k + 1 frame convolutions
        # per two outputs instead of 2k (see _pairs and _pair_step)
        self._paired = self._buffered and d == 1 and self.stride[0] == 1 and k in PAIRED_KERNELS
        self._pair_tr = pair_transforms(k) if self._paired else None
        # steady-state steps of a stateless (1 x kh x kw) 3D conv straight into oneDNN
        self._lean_frames = (symmetric and _ONEDNN_PACKED and self.groups == 1 and k == 1
                             and self.stride[0] == 1 and self.padding_mode == "zeros")
        self._frame_pad = (sp[2], sp[0]) if self._ndim == 3 else None
        self._buffer_cache = DerivedCache(self._buffer_kernel)
        self._pair_cache = DerivedCache(self._pair_kernel)
        self._last_cache = DerivedCache(self._last_kernel)
        self._taps: dict[int, tuple] = {}
        self._cache = DerivedCache(self._frame_kernel)
        self._linear_cache = DerivedCache(self._linear_kernel)  # oneDNN's (rows, C_in) layout
        self._packed = PackedConvKernels() if self._ndim == 3 else None  # oneDNN's blocked one

    def _wb(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias (direct lookups: nn.Module.__getattr__ is slow per step)."""
        params = self._parameters
        return params["weight"], params["bias"]

    # ------------------------------------------------------------------ geometry
    def _temporal(self) -> Temporal:
        return Temporal(self._span + 1, self.stride[0], self._tpad[0], self._tpad[1])

    def _input_spec(self) -> tuple[int | None, int | None]:
        return self._ndim + 1, self.in_channels

    def _out_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        out = []
        for i, s in enumerate(spatial):
            k, st, d = self.kernel_size[i + 1], self.stride[i + 1], self.dilation[i + 1]
            lo, hi = self._spad[2 * (len(spatial) - 1 - i)], self._spad[2 * (len(spatial) - 1 - i)
                                                                         + 1]
            out.append((s + lo + hi - d * (k - 1) - 1) // st + 1)
        return tuple(out)

    # ------------------------------------------------------------------ kernels
    # Tap contributions of a frame are laid out as (N, groups, k, C_out / groups, *S): taps on
    # dim 2, and for groups=1 the due output frame is contiguous.
    def _frame_kernel(self) -> tuple[Tensor, Tensor | None]:
        return self._gemm_layout(*self._stacked_kernel())

    def _gemm_layout(self, w_all: Tensor, b_all: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Conv1d without groups steps as ``addmm(bias, x, W)``: keep ``W`` as ``(C_in, rows)``."""
        if self._ndim == 1 and self.groups == 1:
            w_all = w_all.reshape(w_all.shape[0], -1).t().contiguous()
        elif self._ndim == 3 and w_all.device.type == "cpu":
            # channels-last frames meet a channels-last kernel: no per-step kernel re-layout
            w_all = w_all.contiguous(memory_format=torch.channels_last)
        return w_all, b_all

    def _linear_kernel(self) -> tuple[Tensor, Tensor | None]:
        """The lean Conv1d kernel as a linear layer's ``(k * C_out, C_in)`` weight."""
        w_all, b_all = self._stacked_kernel()
        return w_all.reshape(w_all.shape[0], -1).contiguous(), b_all

    def _stacked_kernel(self) -> tuple[Tensor, Tensor | None]:
        w = self.weight
        g, k = self.groups, self.kernel_size[0]
        cg = w.shape[0] // g
        w_all = w.view(g, cg, w.shape[1], k, *w.shape[3:]).transpose(2, 3).transpose(1, 2)
        w_all = w_all.reshape(g * k * cg, w.shape[1], *w.shape[3:])
        b_all = None
        if self.bias is not None:
            b_all = torch.zeros(g, k, cg, dtype=w.dtype, device=w.device)
            b_all[:, k - 1] = self.bias.view(g, cg)
            b_all = b_all.view(-1)
        return w_all, b_all

    def _tap_kernel(self, taps: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
        """The frame kernel restricted to ``taps`` (for strided convolutions)."""
        w_all, b_all = self._stacked_kernel()
        g, k = self.groups, self.kernel_size[0]
        w = w_all.reshape(g, k, -1, *w_all.shape[1:])[:, list(taps)]
        w = w.reshape(-1, *w_all.shape[1:])
        b = None if b_all is None else b_all.view(g, k, -1)[:, list(taps)].reshape(-1)
        return self._gemm_layout(w, b)

    def _phase_taps(self, phase: int) -> tuple[tuple[int, ...], DerivedCache, Tensor | None]:
        """Taps of an input at ``phase`` that reach an output this strided conv will emit."""
        key = phase % self.stride[0]
        hit = self._taps.get(key)
        if hit is None:
            k, d, s = self._k, self._d, self.stride[0]
            delay = self._span - self._tpad[0]
            taps = tuple(i for i in range(k) if (phase + (k - 1 - i) * d - delay) % s == 0)
            hit = (taps, DerivedCache(lambda: self._tap_kernel(taps)), None)
            self._taps[key] = hit
        return hit

    def _contributions(self, x: Tensor, kernel: DerivedCache | None = None) -> Tensor:
        """Tap contributions of frames ``x`` ``(N, C_in, *S)``: ``(N, g, k, C_out / g, *S_out)``.

        With ``kernel`` (from :meth:`_phase_taps`) only the taps it holds are computed.
        """
        cache = kernel or self._cache
        w_all, b_all = cache.get(*self._wb())
        n, g = x.shape[0], self.groups
        if self._ndim == 1:
            if g == 1:  # w_all is (C_in, taps * C_out)
                z = torch.mm(x, w_all) if b_all is None else torch.addmm(b_all, x, w_all)
                return z.view(n, 1, w_all.shape[1] // self.out_channels, -1)
            else:
                z = F.conv1d(x.unsqueeze(-1), w_all.unsqueeze(-1), b_all, groups=g)
            return z.view(n, g, w_all.shape[0] // self.out_channels, -1)
        taps = w_all.shape[0] // self.out_channels
        conv = _FRAME_CONV[self._ndim - 1]
        sp = self._spad
        if self.padding_mode == "replicate" and any(sp):
            x = F.pad(x, sp, mode="replicate")
            padding: Any = 0
        elif all(sp[i] == sp[i + 1] for i in range(0, len(sp), 2)):
            padding = tuple(sp[::2][::-1])
        else:
            x = F.pad(x, sp)
            padding = 0
        if self._ndim == 3 and x.device.type == "cpu":
            # oneDNN's channels-last kernels are several times faster for per-frame 2D convs;
            # torch's heuristic sends small batch-1 frames to a slower path, so ask for oneDNN
            x = x.contiguous(memory_format=torch.channels_last)
            if _ONEDNN and onednn_inference(x):
                pad = (padding,) * 2 if isinstance(padding, int) else padding
                z = self._onednn_conv(x, cache, w_all, b_all, pad, self.stride[1:],
                                      self.dilation[1:], g)
                return z.view(n, g, taps, -1, *z.shape[2:])
        z = conv(x, w_all, b_all, self.stride[1:], padding, self.dilation[1:], g)
        return z.view(n, g, taps, -1, *z.shape[2:])

    def _update(self, z: Tensor, psum: Tensor | None,
                epilogue: Epilogue | None = None) -> tuple[Tensor, Tensor | None]:
        """Add tap contributions ``z`` into the partial sums: (due output, new partial sums)."""
        k, d = self._k, self._d
        if psum is None:
            return self._frame_out(z.select(2, 0), epilogue), None
        if d == 1:
            z.narrow(2, 1, k - 1).add_(psum)
            return self._frame_out(z.select(2, k - 1), epilogue), z.narrow(2, 0, k - 1)
        full = torch.cat((z.narrow(2, 0, 1), psum), dim=2)
        full[:, :, d::d].add_(z[:, :, 1:])  # in place on the view: no write-back copy
        return (self._frame_out(full.select(2, self._span), epilogue),
                full.narrow(2, 0, self._span))

    def _frame_out(self, y: Tensor, epilogue: Epilogue | None = None) -> Tensor:
        """``(B, g, C_out / g, *S)`` -> ``(B, C_out, *S)``, through ``epilogue`` if given (the
        batch norm and activation after this conv, written as a new dense tensor)."""
        y = y.reshape(y.shape[0], self.out_channels, *y.shape[3:])
        if epilogue is not None:
            return epilogue(y)
        if self._ndim == 3 and y.device.type == "cpu":
            # the due tap is strided inside the channels-last contributions: make it dense
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def _lean_step(self, x: Tensor, state: dict, phase: int, epilogue: Epilogue | None = None):
        """Steady-state step of a Conv1d (no groups, dilation or stride) on flat 2D views:
        ``z = x W + b`` holds the k taps side by side; the partial sums add into taps 1..k-1."""
        wb = self._wb()
        n, c, span = x.shape[0], self.out_channels, self._span
        if prefers_onednn(n, x.shape[1], (span + 1) * c) and onednn_usable(x):
            z = onednn_linear(x, *self._linear_cache.get(*wb))
        else:
            w, b = self._cache.get(*wb)
            z = torch.mm(x, w) if b is None else torch.addmm(b, x, w)
        # each view below costs a dispatcher call, which at this size is a tenth of the product
        z.narrow(1, c, span * c).add_(state["psum"].view(n, span * c))
        head, y = z.split_with_sizes((span * c, c), 1)
        new = {"psum": head.view(n, 1, span, c)}
        if self.padding_mode == "replicate":
            new["last"] = x
        if epilogue is not None:
            y = epilogue(y)
        return y, new, None, phase - span + self._tpad[0]

    def _lean_frame_step(self, x: Tensor, state: dict, phase: int,
                         epilogue: Epilogue | None):
        """Steady-state step of a stateless (1 x kh x kw) 3D conv, no groups, zero padding, on
        float32 CPU inference: the packed oneDNN convolution of the frame, then the epilogue.
        The general path's steps less its per-step decisions, which weigh on small frames."""
        cache = self._cache
        w, b = cache.get(*self._wb())
        x = x.contiguous(memory_format=torch.channels_last)
        y = self._onednn_conv(x, cache, w, b, self._frame_pad, self.stride[1:],
                              self.dilation[1:], 1)
        if epilogue is not None:
            y = epilogue(y, fresh=True)  # the conv's own output
        return y, state, None, phase

    # ------------------------------------------------------------------ buffered 3D steps
    # A 3D conv with temporal taps keeps its last (k - 1) * dilation input frames and at each
    # step convolves them and the new frame with the whole kernel: one output frame, the MACs
    # of one output frame of the offline conv, as with partial sums. oneDNN runs this one 3D
    # convolution (its reduction over k * C_in * kh * kw) markedly faster than the per-frame
    # 2D convolution into k * C_out tap channels plus the partial-sum additions: 1.15-1.6x on
    # one thread, 1.25-2.6x on two, 1.1-1.8x for 16 streams, on layers of the sweep
    # benchmark's 3D CNNs (torch 2.13, AVX-512 EPYC, A/B in one process); and its output is
    # complete, so a following batch norm folds into the kernel and the activation runs as
    # oneDNN's post-op.
    def _onednn_conv(self, x: Tensor, cache: DerivedCache, w: Tensor, b: Tensor | None, pad,
                     stride, dilation, groups: int, attr: str = "none") -> Tensor:
        """oneDNN's convolution with ``cache``'s kernel ``w``, packed (once where the cache
        holds it; at every step for a kernel derived at every step, from inference-tensor
        parameters: the plain kernel computed other bits for grouped convs, and a copy made
        under inference mode must resume a stream bit for bit)."""
        return onednn_conv(x, w, b, pad, stride, dilation, groups, self._packed, id(cache),
                           attr)

    def _buffer_kernel(self) -> tuple[Tensor, Tensor | None]:
        w, b = self._wb()
        return w.contiguous(), b

    def _buffer_step(self, x: Tensor, state: dict, age: Age, phase: int,
                     epilogue: Epilogue | None):
        given = x
        x = self._zero_fillers(x, age)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        if self._paired:
            # the state keeps its own copy of the frame (the caller may refill its tensor),
            # unless the container handed the frame over as this conv's own
            entry = getattr(HANDED, "entry", None)
            own = x is not given or (entry is not None and entry[1] is self
                                     and entry[0] is given)
            return self._pair_step(x, x if own else x.clone(), state, age, phase, epilogue)
        frames = torch.cat((state["frames"], x.unsqueeze(2)), dim=2)
        new = {"frames": frames[:, :, 1:]}  # a view: the frames are this step's own copy
        if not emits(phase, self._span - self._tpad[0], self.stride[0]):
            return None, new, None, 0  # no output at this phase: only keep the frame
        return self._emit(self._buffer_conv(frames, epilogue), new, age, phase)

    def _buffer_steps(self, x: Tensor, state: dict, age: Age, phase: int):
        """A chunk ``x`` ``(B, C_in, T, H, W)`` in one convolution over the kept frames and the
        chunk, with the conv's temporal stride (streams of one age: no filler frames)."""
        t = x.shape[2]
        kept = state["frames"]
        if self._paired:  # frames kept one by one; the chunk's last output leaves no pair open
            kept = _stack_frames(kept)
        frames = torch.cat((kept, x), dim=2)
        new = {"frames": frames[:, :, t:]}
        if self._paired:
            new = {"frames": new["frames"].unbind(2), "carry": state["carry"],
                   "due": torch.zeros_like(state["due"])}
        span, st = self._span, self.stride[0]
        first, n = chunk_emissions(t, phase, span - self._tpad[0], st)
        if n == 0:
            return None, new, None, 0
        out_age, out_phase = advance(None if age is None else age + first, phase + first,
                                     span - self._tpad[0], st)
        # the output at chunk frame i convolves frames[i : i + span + 1]
        sub = frames[:, :, first: first + (n - 1) * st + span + 1]
        y = F.conv3d(sub, self.weight, self.bias, (st, *self.stride[1:]),
                     (0, *self._frame_pad), self.dilation, self.groups)
        y, out_age, out_phase = crop_warm_up(y, out_age, out_phase)
        return y, new, out_age, out_phase

    def _buffer_conv(self, frames: Tensor, epilogue: Epilogue | None) -> Tensor:
        """The output frame of ``frames`` ``(B, C_in, span + 1, H, W)``, through ``epilogue``."""
        pad = (0, *self._frame_pad)
        stride = (1, *self.stride[1:])
        if _ONEDNN_PACKED and onednn_inference(frames):
            cache, sources, attr = self._buffer_cache, self._wb(), "none"
            if epilogue is not None:
                cache, sources = epilogue.kernel_cache(self)
                attr = epilogue.attr
            w, b = cache.get(*sources)
            y = self._onednn_conv(frames, cache, w, b, pad, stride, self.dilation, self.groups,
                                  attr)
            return y.squeeze(2)
        w, b = self._wb()
        if b is None and torch.compiler.is_exporting():
            # the ONNX exporter writes a bias-less conv3d with an input onnxruntime refuses
            b = w.new_zeros(w.shape[0])
        y = F.conv3d(frames, w, b, stride, pad, self.dilation, self.groups).squeeze(2)
        return y if epilogue is None else epilogue(y)

    # ------------------------------------------------------------------ paired 3D steps
    # With stride and dilation 1 in time, a buffered conv steps in pairs (Toom-Cook F(2, k) in
    # time, see _pairs): a step that opens a pair convolves k combinations of its k frames,
    # each with a combination of the taps (one grouped convolution), and emits their sum; it
    # keeps the part of the next output they already hold (state "carry", "due" = 1, or 2
    # where a fused float32 step folds the batch norm that follows into the pair kernels and
    # holds the carry in its scale; a step of the other kind takes the direct step). The
    # next step closes the pair with one convolution of a combination of frames with the last
    # tap, added to the carry. On average (k + 1) / 2 frame convolutions per step instead of
    # k, never more than k. Streams of one batch whose pairs disagree (a stream joining an
    # engine's block), chunks, and compiled or exported steps take the direct step, which
    # leaves no pair open (due = 0).
    def _pair_kernel(self, w: Tensor | None = None,
                     b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The k product kernels of a pair's first step, stacked for one grouped conv, and
        the bias on the first product's channels only (its plain sum is the output); of the
        conv's own weight and bias, or of ``w`` and ``b`` (a norm folded in)."""
        if w is None:
            w, b = self._wb()
        k = self._k
        taps = w.to(torch.float64).unbind(2)
        # sums of scaled taps (no matrix product, which a step's MAC count would include when
        # it derives the kernels)
        u = torch.cat([sum(c * t for c, t in zip(row, taps) if c) for row in
                       self._pair_tr.kernels]).to(w.dtype)
        if b is not None:
            b = torch.cat((b, b.new_zeros((k - 1) * b.shape[0])))
        return u.contiguous(), b

    def _last_kernel(self, w: Tensor | None = None,
                     b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if w is None:
            w, b = self._wb()
        return w.select(2, self._k - 1).contiguous(), b

    def _pair_kernels(self, epilogue: Epilogue | None, folded: bool):
        """The caches of the pair kernels (a pair's first step, its last product) and the
        tensors they derive from: the conv's own, or with the epilogue's norm folded in."""
        if folded:
            return epilogue.pair_caches(self)
        sources = self._wb()
        return self._pair_cache, self._last_cache, sources

    def _pair_step(self, x: Tensor, keep: Tensor, state: dict, age: Age, phase: int,
                   epilogue: Epilogue | None):
        """The step of a paired conv on frame ``x`` (``keep``: what the state keeps, a copy or
        the frame itself where the container handed it over). Its state keeps the last
        ``k - 1`` frames one by one: the transforms read them one by one, and a step copies no
        frame but the new one."""
        kept, carry, due = state["frames"], state["carry"], state["due"]
        parts = [*kept, x]  # the step's k frames: a pair's first k, or its last k
        new = {"frames": (*kept[1:], keep)}
        fast = _ONEDNN_PACKED and onednn_inference(x)
        # float32 inference folds the norm of the epilogue into the pair kernels: the carry is
        # then held in the norm's scale, which "due" records (2 instead of 1)
        folded = _FOLD[0] and fast and epilogue is not None and epilogue.bn is not None
        kind = _FOLDED_CARRY if folded else _CARRY
        if not self._pairs_now(x, age, fast):
            pending = -1
        else:
            if due.shape[0] == 1:
                lo = hi = int(due.item())
            else:
                lo, hi = (int(v) for v in torch.aminmax(due))
            # streams out of step (a stream joining an engine's block), or a carry held in
            # another scale than this step's: a direct step brings them in step
            pending = lo if lo == hi and lo in (0, kind) else -1
        if pending < 0:
            y = self._buffer_conv(_stack_frames(parts), epilogue)
            new["carry"], new["due"] = carry, torch.zeros_like(due)
        elif pending:
            y = self._close_pair(parts, carry, epilogue, fast, folded)
            new["carry"], new["due"] = carry, torch.zeros_like(due)
        else:
            y, new["carry"] = self._open_pair(parts, epilogue, fast, folded)
            new["due"] = torch.full_like(due, kind)
        return self._emit(y, new, age, phase)

    def _pairs_now(self, x: Tensor, age: Age, fast: bool) -> bool:
        """Whether this step may open or close a pair: eager CPU steps of streams of one age,
        and on float32 inference where pairs pay (:func:`pairs_pay`). Other devices take the
        direct step: reading the streams' ``due`` there would wait for the device at every
        layer, and pairs were not measured there."""
        if (isinstance(age, Tensor) or not _PAIRS[0] or x.device.type != "cpu"
                or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return False
        if not fast:  # float32 CPU inference through oneDNN decides by measurement
            return True
        g = self.groups
        return pairs_pay(self._k, self.in_channels // g, self.out_channels // g,
                         torch.get_num_threads())

    def _close_pair(self, parts: list[Tensor], carry: Tensor, epilogue: Epilogue | None,
                    fast: bool, folded: bool) -> Tensor:
        """The pair's second output: the carry plus the last product (through oneDNN if
        ``fast``, the activation as its post-op where nothing else of the epilogue is left:
        no norm, or a norm ``folded`` into the kernels)."""
        _, cache, sources = self._pair_kernels(epilogue, folded)
        w, b = cache.get(*sources)
        x = parts[-1]
        v = combine(self._pair_tr.last, parts,
                    _scratch_like(x, x.shape) if _scratch_ok() else None)
        pad, stride, dil = self._frame_pad, self.stride[1:], self.dilation[1:]
        post = None if epilogue is None or not fast else (epilogue.attr if folded else
                                                             epilogue.post_op)
        if fast:
            y = onednn_conv_add(v, carry, w, b, pad, stride, dil, self.groups, self._packed,
                                id(cache), post or "none")
        else:
            y = F.conv2d(v, w, b, stride, pad, dil, self.groups).add_(carry)
        if epilogue is None or post:
            return y
        return epilogue.activate(y) if folded else epilogue(y, fresh=True)

    def _open_pair(self, parts: list[Tensor], epilogue: Epilogue | None,
                   fast: bool, folded: bool) -> tuple[Tensor, Tensor]:
        """The pair's first output and the carry: the k products as one grouped conv of the
        k frame combinations (through oneDNN if ``fast``; a norm of the epilogue ``folded``
        into the kernels leaves its activation, and the carry in the norm's scale)."""
        k, tr, x = self._k, self._pair_tr, parts[0]
        c_in, c_out = x.shape[1], self.out_channels
        if not _scratch_ok():
            buf = torch.cat([combine(terms, parts) for terms in tr.inputs], 1)
        else:  # written and read within this step only: kept from step to step
            buf = _scratch_like(x, (x.shape[0], k * c_in, *x.shape[2:]))
            for terms, out in zip(tr.inputs, buf.split(c_in, 1)):
                combine(terms, parts, out)
        cache, _, sources = self._pair_kernels(epilogue, folded)
        w, b = cache.get(*sources)
        pad, stride, dil = self._frame_pad, self.stride[1:], self.dilation[1:]
        if fast:
            m = self._onednn_conv(buf, cache, w, b, pad, stride, dil, k * self.groups)
        else:
            m = F.conv2d(buf, w, b, stride, pad, dil, k * self.groups)
        products = m.split(c_out, 1)
        # the output as a chain of additions: a reduction over the products' dim runs slower
        # (it zero-fills its output first, then accumulates)
        y = torch.add(products[0], products[1])
        for p in products[2:]:
            y.add_(p)
        carry = combine(tr.carry, products)
        if folded:
            return epilogue.activate(y), carry
        return (y if epilogue is None else epilogue(y, fresh=True)), carry

    def _strided_update(self, x: Tensor, psum: Tensor | None, phase: int,
                        epilogue: Epilogue | None = None):
        """Like :meth:`_update`, computing only the taps that reach an emitted output."""
        taps, kernel, _ = self._phase_taps(phase)
        z = self._contributions(x, kernel) if taps else None
        if psum is None:
            return (None if z is None else self._frame_out(z.select(2, 0), epilogue)), None
        shape = list(psum.shape)
        shape[2] = 1
        full = torch.cat((psum.new_zeros(shape), psum), dim=2)
        if z is not None:
            d = self._d
            for j, i in enumerate(taps):
                full.select(2, i * d).add_(z.select(2, j))
        return (self._frame_out(full.select(2, self._span), epilogue),
                full.narrow(2, 0, self._span))

    def _replicate_start(self, z: Tensor) -> Tensor | None:
        """Partial sums after the start padding, replicated from the frame with taps ``z``."""
        shape = list(z.shape)
        shape[2] = self._span
        psum = z.new_zeros(shape)
        for _ in range(self._tpad[0]):
            _, psum = self._update(z.clone(), psum)
        return psum

    # ------------------------------------------------------------------ state and steps
    def _init(self, batch: int, shape: tuple, device: torch.device, dtype: torch.dtype):
        spatial = self._out_spatial(tuple(shape[1:]))
        if self._buffered:
            frames = torch.zeros(batch, shape[0], self._span, *shape[1:], device=device,
                                 dtype=dtype)
            if frames.device.type == "cpu":
                frames = frames.contiguous(memory_format=torch.channels_last_3d)
            if not self._paired:
                return {"frames": frames}, (self.out_channels, *spatial)
            fmt = torch.channels_last if frames.device.type == "cpu" else torch.contiguous_format
            state = {"frames": tuple(frames.select(2, j).contiguous(memory_format=fmt)
                                     for j in range(self._span)),
                     "carry": torch.zeros(batch, self.out_channels, *spatial, device=device,
                                          dtype=dtype).contiguous(memory_format=fmt),
                     "due": torch.zeros(batch, device=device, dtype=dtype)}
            return state, (self.out_channels, *spatial)
        g = self.groups
        state = {"psum": torch.zeros(batch, g, self._span, self.out_channels // g, *spatial,
                                     device=device, dtype=dtype) if self._span else None}
        if self.padding_mode == "replicate":
            state["last"] = torch.zeros(batch, *shape, device=device, dtype=dtype)
        return state, (self.out_channels, *spatial)

    def _step(self, x: Tensor, state: dict, age: Age, phase: int,
              epilogue: Epilogue | None = None):
        """One step; ``epilogue`` (from a fused :class:`costream.Sequential`) writes the output
        through the batch norm and activation that follow this conv."""
        if self._buffered:
            return self._buffer_step(x, state, age, phase, epilogue)
        if age is None:
            if self._lean:
                return self._lean_step(x, state, phase, epilogue)
            if self._lean_frames and onednn_inference(x) and x.dim() == 4:
                return self._lean_frame_step(x, state, phase, epilogue)
        replicate = self.padding_mode == "replicate"
        x = self._zero_fillers(x, age)
        psum = state["psum"]
        if self.stride[0] > 1 and not isinstance(age, Tensor) and not (
                replicate and self._tpad[0] and age == 0):
            y, new = self._strided_update(x, psum, phase, epilogue)
        else:
            z = self._contributions(x)
            if age is not None and replicate and self._tpad[0]:
                if isinstance(age, int):
                    if age == 0:
                        psum = self._replicate_start(z)
                else:
                    start = (age == 0).view(-1, *(1,) * (psum.dim() - 1))
                    psum = torch.where(start, self._replicate_start(z), psum)
            y, new = self._update(z, psum, epilogue)
        state = {"psum": new, "last": x} if replicate else {"psum": new}
        return self._emit(y, state, age, phase)

    def _zero_fillers(self, x: Tensor, age: Age) -> Tensor:
        """Filler frames before a stream's first frame (``age < 0``) as zeros: they must leave
        the start padding intact (a zero frame only adds the bias to the discarded output)."""
        if isinstance(age, Tensor) and self._tpad[0]:
            return torch.where((age >= 0).view(-1, *(1,) * (x.dim() - 1)), x, 0.0)
        return x

    def _emit(self, y: Tensor | None, state: dict, age: Age, phase: int):
        """A step's return: ``y`` if the conv emits at ``phase``, with the output's age and
        phase (nothing while the outputs still depend on padding only)."""
        delay, t = self._span - self._tpad[0], self.stride[0]
        if not emits(phase, delay, t):
            return None, state, None, 0
        if age is None:
            return y, state, None, (phase - delay) // t
        out_age, out_phase = advance(age, phase, delay, t)
        if isinstance(out_age, int) and out_age < 0:
            return None, state, None, 0
        return y, state, out_age, out_phase

    def _steps(self, x: Tensor, state: dict, age: Age, phase: int):
        if isinstance(age, Tensor):
            return super()._steps(x, state, age, phase)
        if self._buffered:
            return self._buffer_steps(x, state, age, phase)
        b, c, t = x.shape[:3]
        if t == 0:
            return None, state, None, 0
        frames = x.transpose(1, 2).reshape(b * t, c, *x.shape[3:])
        z = self._contributions(frames)  # (B*T, g, k, cg, *S)
        g, k, cg = z.shape[1:4]
        sp = z.shape[4:]
        z = z.view(b, t, g, k, cg, *sp).permute(0, 2, 3, 1, 4, *range(5, 5 + len(sp)))
        psum = state["psum"]
        if self.padding_mode == "replicate" and self._tpad[0] and age == 0:
            psum = self._replicate_start(z.select(3, 0).contiguous())
        d, span = self.dilation[0], self._span
        buf = z.new_zeros(b, g, t + span, cg, *sp)
        if span:
            buf[:, :, :span] = psum.flip(2)
        for i in range(k):
            off = (k - 1 - i) * d
            buf[:, :, off: off + t] += z[:, :, i]
        new = buf[:, :, t:].flip(2) if span else None
        state = {"psum": new}
        if self.padding_mode == "replicate":
            state["last"] = x[:, :, -1]
        delay, st = span - self._tpad[0], self.stride[0]
        first, n = chunk_emissions(t, phase, delay, st)
        if n == 0:
            return None, state, None, 0
        out_age, out_phase = advance(None if age is None else age + first, phase + first, delay, st)
        y = buf[:, :, first: first + (n - 1) * st + 1: st].transpose(2, 3)
        y = y.reshape(b, self.out_channels, n, *sp)
        y, out_age, out_phase = crop_warm_up(y, out_age, out_phase)
        return y, state, out_age, out_phase

    def _flush(self, state: dict, age: Age, phase: int):
        pad = self._tpad[1]
        if pad <= 0:
            return None, state, None, 0
        if self._buffered:
            last = state["frames"][-1] if self._paired else state["frames"].select(2, -1)
            zeros = last.new_zeros(*last.shape[:2], pad, *last.shape[2:])
            return self._steps(zeros, state, age, phase)
        if self.padding_mode == "replicate":
            last = state["last"]
            frames = last.unsqueeze(2).expand(-1, -1, pad, *last.shape[2:])
            return self._steps(frames, state, age, phase)
        return self._flush_zeros(state, age, phase, pad)

    def _flush_zeros(self, state: dict, age: Age, phase: int, pad: int):
        """End padding with zero frames: their tap contributions are only the bias."""
        psum = state["psum"]
        _, b_all = self._cache.get(self.weight, self.bias)
        shape = list(psum.shape)
        shape[2] = self.kernel_size[0]
        bias = psum.new_zeros(shape)
        if b_all is not None:
            bias += b_all.view(1, *shape[1:4], *(1,) * (psum.dim() - 4))
        frames = []
        out_age0: Age = None
        out_phase0 = 0
        delay, st = self._span - self._tpad[0], self.stride[0]
        for i in range(pad):
            y, psum = self._update(bias.clone(), psum)
            if emits(phase + i, delay, st):
                oa, op = advance(None if age is None else age + i, phase + i, delay, st)
                if isinstance(oa, int) and oa < 0:
                    continue
                if not frames:
                    out_age0, out_phase0 = oa, op
                frames.append(y)
        state = {"psum": psum}
        if not frames:
            return None, state, None, 0
        return torch.stack(frames, 2), state, out_age0, out_phase0

    # ------------------------------------------------------------------ offline
    def _clip(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != self._ndim + 2:
            raise ValueError(
                f"{type(self).__name__}.forward expects a clip with {self._ndim + 2} dims "
                f"(B, C, T, ...), got {tuple(x.shape) if isinstance(x, Tensor) else type(x)}"
            )
        return self._torch_base.forward(self, x)


class Conv1d(_CoConvNd, nn.Conv1d):
    """Continual 1D convolution over time: clips ``(B, C, T)``, frames ``(B, C)``.

    Same constructor and parameters as :class:`torch.nn.Conv1d`; ``padding_mode`` is
    ``"zeros"`` or ``"replicate"``.

    Shape:
        clip ``(B, C_in, T)`` -> ``(B, C_out, T_out)``; frame ``(B, C_in)`` -> ``(B, C_out)``.

    Example:
        >>> import torch, costream as cs
        >>> conv = cs.Conv1d(2, 4, kernel_size=3, padding=1).double()
        >>> x = torch.randn(1, 2, 10, dtype=torch.double)
        >>> steps = conv.forward_steps(x, pad_end=True)
        >>> torch.allclose(steps, conv(x))
        True
    """

    _torch_base = nn.Conv1d
    _ndim = 1


class Conv2d(_CoConvNd, nn.Conv2d):
    """Continual 2D convolution; the first kernel dimension is time: clips ``(B, C, T, S)``.

    Shape:
        clip ``(B, C_in, T, S)`` -> ``(B, C_out, T_out, S_out)``; frame ``(B, C_in, S)``.

    Example:
        >>> import torch, costream as cs
        >>> conv = cs.Conv2d(3, 8, kernel_size=(3, 5), padding=(1, 2))
        >>> conv.forward_step(torch.randn(2, 3, 25)) is None
        True
    """

    _torch_base = nn.Conv2d
    _ndim = 2


class Conv3d(_CoConvNd, nn.Conv3d):
    """Continual 3D convolution; the first kernel dimension is time: clips ``(B, C, T, H, W)``.

    Shape:
        clip ``(B, C_in, T, H, W)`` -> ``(B, C_out, T_out, H_out, W_out)``; frame ``(B, C, H, W)``.

    Example:
        >>> import torch, costream as cs
        >>> conv = cs.Conv3d(3, 8, kernel_size=3, padding=(0, 1, 1))
        >>> x = torch.randn(1, 3, 5, 16, 16)
        >>> conv.forward_steps(x).shape  # receptive field 3: outputs due after 3 frames
        torch.Size([1, 8, 3, 16, 16])
    """

    _torch_base = nn.Conv3d
    _ndim = 3

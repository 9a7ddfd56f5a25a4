"""Recycling positional encoding (Continual Transformers, ICLR 2023, arXiv 2201.06268, sec. 3.5).

A continual Transformer sees an unbounded stream, so absolute positions cannot grow forever: the
token at stream step ``t`` gets the encoding of position ``(t + offset) mod K``. During training
on clips the positions are ``(offset + arange(T)) mod K``; during stepping a per-stream position
counter in the state continues that sequence, so stepping and offline agree.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..core._module import Age, CoModule
from ..core._temporal import Temporal


def sinusoid_table(num_positions: int, embed_dim: int) -> Tensor:
    """The fixed sine/cosine encodings of "Attention is all you need": ``(K, d)``."""
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, embed_dim, 2, dtype=torch.float64)
                     * (-math.log(10000.0) / embed_dim))
    table = torch.zeros(num_positions, embed_dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: embed_dim // 2])
    return table


class RecyclingPositionalEncoding(CoModule):
    """Add the encoding of position ``(t + offset) mod num_positions`` to the token at step ``t``.

    Args:
        embed_dim: ``d``, the token width (channel dim of clips and frames).
        num_positions: ``K``, the number of positions before they recycle.
        learned: a learned table (a parameter ``weight`` ``(K, d)``, initialised from
            ``N(0, 0.02^2)``) or the fixed sinusoidal one (a buffer, not saved in the
            ``state_dict``).
        offset: position of the first token of a stream.

    Shape:
        clip ``(B, d, T, *S)`` -> same shape; frame ``(B, d, *S)`` -> same shape. The state holds
        each stream's next position (``int64`` ``(B,)``), reset with the stream.

    Example:
        >>> import torch, costream as cs
        >>> pe = cs.RecyclingPositionalEncoding(8, 4, learned=False)
        >>> x = torch.zeros(1, 8, 6)
        >>> torch.equal(pe(x)[:, :, 4], pe(x)[:, :, 0])  # position 4 recycles to 0
        True
        >>> torch.equal(pe.forward_steps(x), pe(x))
        True
    """

    def __init__(self, embed_dim: int, num_positions: int, learned: bool = True,
                 offset: int = 0, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if int(num_positions) < 1:
            raise ValueError(f"num_positions must be >= 1, got {num_positions}")
        self.embed_dim, self.num_positions = int(embed_dim), int(num_positions)
        self.learned, self.offset = bool(learned), int(offset)
        kw = {"device": device, "dtype": dtype}
        if self.learned:
            self.weight = nn.Parameter(torch.empty(self.num_positions, self.embed_dim, **kw))
            nn.init.normal_(self.weight, std=0.02)
        else:
            table = sinusoid_table(self.num_positions, self.embed_dim)
            self.register_buffer("weight", table.to(dtype or torch.get_default_dtype())
                                 .to(device), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> RecyclingPositionalEncoding:
        super()._apply(fn, recurse)
        if not self.learned:  # recompute the fixed table in the new dtype (no double rounding)
            w = self.weight
            self.weight = sinusoid_table(self.num_positions, self.embed_dim).to(w.device, w.dtype)
        return self

    def extra_repr(self) -> str:
        return (f"{self.embed_dim}, num_positions={self.num_positions}, "
                f"learned={self.learned}, offset={self.offset}")

    def _lookup(self, pos: Tensor) -> Tensor:
        """Encodings of stream positions ``pos`` (any shape ``P``): ``(*P, d)``."""
        return self.weight[(pos + self.offset) % self.num_positions]

    # ------------------------------------------------------------------ CoModule
    def _temporal(self) -> Temporal:
        return Temporal()

    def _input_spec(self) -> tuple[int | None, int | None]:
        return None, self.embed_dim

    def _init(self, batch: int, shape: Any, device: torch.device, dtype: torch.dtype):
        if shape[0] != self.embed_dim:
            raise ValueError(f"RecyclingPositionalEncoding expects {self.embed_dim} channels, "
                             f"got frames of shape {tuple(shape)}")
        return {"pos": torch.zeros(batch, dtype=torch.long, device=device)}, tuple(shape)

    def _step(self, x: Tensor, state: dict, age: Age, phase: int):
        if isinstance(age, int) and age < 0:
            return None, state, None, 0
        pos = state["pos"]
        y = x + self._lookup(pos).view(*pos.shape, -1, *(1,) * (x.dim() - 2))
        nxt = (pos + 1) % self.num_positions
        if isinstance(age, Tensor):  # filler frames before a stream's start do not count
            nxt = torch.where(age >= 0, nxt, pos)
        return y, {"pos": nxt}, age, phase

    def _steps(self, x: Tensor, state: dict, age: Age, phase: int):
        if isinstance(age, Tensor):
            return super()._steps(x, state, age, phase)
        t = x.shape[2]
        skip = 0 if age is None else min(t, max(0, -age))
        if skip == t:
            return None, state, None, 0
        x = x[:, :, skip:]
        pos = state["pos"].unsqueeze(1) + torch.arange(t - skip, device=x.device)  # (B, T')
        y = x + self._lookup(pos).transpose(1, 2).reshape(*x.shape[:3], *(1,) * (x.dim() - 3))
        nxt = (pos[:, -1] + 1) % self.num_positions
        return y, {"pos": nxt}, None if age is None else age + skip, phase + skip

    def _clip(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 3 or x.shape[1] != self.embed_dim:
            raise ValueError(f"RecyclingPositionalEncoding.forward expects a clip "
                             f"(B, {self.embed_dim}, T, ...), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        pos = torch.arange(x.shape[2], device=x.device)
        return x + self._lookup(pos).t().reshape(*x.shape[1:3], *(1,) * (x.dim() - 3))

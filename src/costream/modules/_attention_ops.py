"""Pure attention kernels of continual Transformers (Continual Transformers, ICLR 2023,
arXiv 2201.06268, section 3).

Tokens are ``(B, d)`` frames; a window of ``n`` tokens is ``(B, n, d)``, oldest first. Keys and
values of a window are kept per head as one tensor ``(B, 2, h, n, d_h)``.

* **Single-output attention** attends one query to the ``n`` keys of the window: ``2 n d_h``
  multiply-accumulates per head and step.
* **Retroactive attention** updates the outputs of all ``n`` queries of the window. By default
  (``running=False`` in :func:`retro_init`) it recomputes them from the cached queries, keys and
  values: regular attention over the window, ``2 n^2 d_h`` per head, exact at any score and
  non-finite exactly where the window computation is. The paper's update (``running=True``)
  keeps, per query, a running numerator ``sum_j exp(s_ij - m_i) v_j``, denominator
  ``sum_j exp(s_ij - m_i)`` and reference ``m_i`` (the largest score it has seen, so no
  exponential overflows); a step adds the new key's term, removes the term of the key that left
  the window, and computes the new query's sums from scratch: ``O(n d_h)`` per head. A query's
  sums live only while it is in the window (``n`` steps), so rounding errors do not accumulate
  over the stream; but removing a term is a subtraction, which cancels catastrophically (down to
  ``0 / 0``) when the leaving key held nearly all of a query's weight, and a non-finite key
  stays in the sums of the queries that saw it until they leave the window.

Keys whose token lies before the stream start (age ``< 0``) never enter a running sum (masks
``keep``/``valid`` below), so warm-up filler cannot disturb later outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._onednn import linear

_NEG_INF = float("-inf")


class Parts(NamedTuple):
    """What a kernel needs of an attention block.

    ``mha`` holds the projections; ``pre`` maps tokens to the attention input (e.g. the pre-norm)
    and ``post(x, sa)`` combines the tokens ``x`` with the projected attention output ``sa``
    (residual, norms, feed-forward). ``None`` stands for the identity and for ``sa`` alone.
    """

    mha: nn.MultiheadAttention
    pre: Callable[[Tensor], Tensor] | None = None
    post: Callable[[Tensor, Tensor], Tensor] | None = None


def _pre(p: Parts, x: Tensor) -> Tensor:
    return x if p.pre is None else p.pre(x)


def _post(p: Parts, x: Tensor, sa: Tensor) -> Tensor:
    return sa if p.post is None else p.post(x, sa)


def _proj(p: Parts, a: Tensor, lo: int, hi: int) -> Tensor:
    """Rows ``lo:hi`` of the packed input projection (q: ``0:d``, k: ``d:2d``, v: ``2d:3d``)."""
    w, b = p.mha.in_proj_weight, p.mha.in_proj_bias
    if lo == 0 and hi == w.shape[0]:
        return linear(a, w, b)
    return linear(a, w[lo:hi], None if b is None else b[lo:hi])


def _out(p: Parts, o: Tensor) -> Tensor:
    return linear(o, p.mha.out_proj.weight, p.mha.out_proj.bias)


def _split(t: Tensor, h: int) -> Tensor:
    """``(..., L, d)`` -> ``(..., h, L, d_h)``."""
    return t.unflatten(-1, (h, -1)).transpose(-3, -2)


def _merge(t: Tensor) -> Tensor:
    """``(..., h, L, d_h)`` -> ``(..., L, d)``."""
    return t.transpose(-3, -2).flatten(-2)


def _kv(p: Parts, a: Tensor) -> Tensor:
    """Keys and values of tokens ``a`` ``(B, L, d)``: ``(B, 2, h, L, d_h)``."""
    d, h = p.mha.embed_dim, p.mha.num_heads
    kv = _proj(p, a, d, 3 * d).unflatten(-1, (2, h, -1))  # (B, L, 2, h, dh)
    return kv.permute(0, 2, 3, 1, 4)


# ---------------------------------------------------------------------- whole windows
def window_all(p: Parts, x: Tensor) -> Tensor:
    """Regular attention block over windows ``x`` ``(N, n, d)``: all ``n`` outputs."""
    qkv = _split(_proj(p, _pre(p, x), 0, 3 * p.mha.embed_dim), 3 * p.mha.num_heads)
    q, k, v = qkv.chunk(3, -3)
    return _post(p, x, _out(p, _merge(F.scaled_dot_product_attention(q, k, v))))


def window_one(p: Parts, x: Tensor, i: int) -> Tensor:
    """Single-output attention block over windows ``x`` ``(N, n, d)``, query ``i``: ``(N, d)``."""
    d, h = p.mha.embed_dim, p.mha.num_heads
    a = _pre(p, x)
    kv = _kv(p, a)
    q = _proj(p, a[:, i], 0, d).view(x.shape[0], h, 1, -1)
    o = F.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1])
    return _post(p, x[:, i], _out(p, o.reshape(x.shape[0], d)))


# ---------------------------------------------------------------------- single output
def single_init(p: Parts, batch: int, n: int, keep_x: bool, device: torch.device,
                dtype: torch.dtype) -> dict[str, Tensor]:
    """Fresh single-output state: keys/values (and tokens) of the previous ``n - 1`` tokens."""
    d, h = p.mha.embed_dim, p.mha.num_heads
    state = {"kv": torch.zeros(batch, 2, h, n - 1, d // h, device=device, dtype=dtype)}
    if keep_x:
        state["x"] = torch.zeros(batch, n - 1, d, device=device, dtype=dtype)
    return state


def single_step(p: Parts, x: Tensor, state: dict[str, Tensor], n: int, i: int):
    """One token ``x`` ``(B, d)``: the output of window position ``i`` ``(B, d)`` and new state."""
    d, h = p.mha.embed_dim, p.mha.num_heads
    b = x.shape[0]
    a = _pre(p, x)
    if i == n - 1:
        qkv = _proj(p, a, 0, 3 * d)
        q, kv, xq = qkv[:, :d], qkv[:, d:], x
    else:
        kv = _proj(p, a, d, 3 * d)
        xq = state["x"][:, i]
        q = _proj(p, _pre(p, xq), 0, d)
    win = torch.cat((state["kv"], kv.view(b, 2, h, 1, -1)), 3)
    o = F.scaled_dot_product_attention(q.view(b, h, 1, -1), win[:, 0], win[:, 1])
    y = _post(p, xq, _out(p, o.view(b, d)))
    new = {"kv": win[:, :, :, 1:]}
    if "x" in state:
        new["x"] = torch.cat((state["x"], x.unsqueeze(1)), 1)[:, 1:]
    return y, new


def single_chunk(p: Parts, x: Tensor, state: dict[str, Tensor], n: int, i: int, first: int):
    """Tokens ``x`` ``(B, T, d)``: outputs of the windows ending at ``first..T-1`` as
    ``(B * T', d)`` (or ``None``) and the new state."""
    b, t, d = x.shape
    h = p.mha.num_heads
    kv = torch.cat((state["kv"], _kv(p, _pre(p, x))), 3)  # (B, 2, h, n - 1 + T, dh)
    new = {"kv": kv[:, :, :, t:].contiguous()}
    seq = torch.cat((state["x"], x), 1) if "x" in state else None
    if seq is not None:
        new["x"] = seq[:, t:].contiguous()
    if first >= t:
        return None, new
    tp = t - first
    win = kv[:, :, :, first:].unfold(3, n, 1)  # (B, 2, h, T', dh, n)
    win = win.permute(0, 3, 1, 2, 5, 4).reshape(b * tp, 2, h, n, -1)
    xq = (x[:, first:] if i == n - 1 else seq[:, first + i: t + i]).reshape(b * tp, d)
    q = _proj(p, _pre(p, xq), 0, d).view(b * tp, h, 1, -1)
    o = F.scaled_dot_product_attention(q, win[:, 0], win[:, 1])
    return _post(p, xq, _out(p, o.view(b * tp, d))), new


# ---------------------------------------------------------------------- retroactive
def retro_init(p: Parts, batch: int, n: int, keep_x: bool, device: torch.device,
               dtype: torch.dtype, running: bool = False) -> dict[str, Tensor]:
    """Fresh retroactive state (see :func:`retro_step`); with the running softmax sums only for
    the paper's running-sum update (``running=True``)."""
    d, h = p.mha.embed_dim, p.mha.num_heads
    z = {"device": device, "dtype": dtype}
    state = {"q": torch.zeros(batch, h, n - 1, d // h, **z),
             "kv": torch.zeros(batch, 2, h, n, d // h, **z)}
    if running:
        state["num"] = torch.zeros(batch, h, n - 1, d // h, **z)
        state["den"] = torch.ones(batch, h, n - 1, **z)
        state["ref"] = torch.zeros(batch, h, n - 1, **z)
    if keep_x:
        state["x"] = torch.zeros(batch, n - 1, d, **z)
    return state


def retro_masks(age: int | Tensor | None, n: int, device: torch.device):
    """``(drop, valid)`` for a step at ``age``: ``drop`` ``(B|1, 1, 1, 2)`` marks the leaving
    and the new key as outside the stream, ``valid`` ``(B|1, 1, n)`` the keys the new query may
    see (its own key always). ``(None, None)`` once every key belongs to the stream."""
    if age is None or (isinstance(age, int) and age >= n):
        return None, None
    if isinstance(age, int):
        age = torch.tensor([age], device=device)
    drop = torch.stack((age < n, age < 0), -1).view(-1, 1, 1, 2)
    ages = age.view(-1, 1) + torch.arange(1 - n, 1, device=device)
    valid = ages >= 0
    valid[:, -1] = True
    return drop, valid.unsqueeze(1)


def retro_step(p: Parts, x: Tensor, state: dict[str, Tensor], n: int,
               masks: tuple[Tensor | None, Tensor | None]):
    """One token ``x`` ``(B, d)``: the updated outputs of all ``n`` window tokens ``(B, n, d)``.

    State (``h`` heads of width ``d_h``): ``q`` ``(B, h, n-1, d_h)`` scaled queries of the newest
    ``n - 1`` tokens, ``kv`` ``(B, 2, h, n, d_h)`` keys/values of the last ``n`` tokens, ``num``
    ``(B, h, n-1, d_h)``, ``den`` and ``ref`` ``(B, h, n-1)`` the running sums of those queries
    over ``kv`` (running-sum update only), and ``x`` ``(B, n-1, d)`` the tokens (when ``post``
    needs them). Without ``num`` in the state (the default), the outputs are recomputed over the
    window (regular attention of the ``n`` cached queries: exact whatever the scores,
    ``2 n^2 d_h`` per head); with it, they are updated from the running sums (``O(n d_h)``,
    inexact for sharply peaked attention: see the module docstring).
    """
    d, h = p.mha.embed_dim, p.mha.num_heads
    b = x.shape[0]
    qkv = _proj(p, _pre(p, x), 0, 3 * d).view(b, 3, h, -1)
    q = qkv[:, 0] * (d // h) ** -0.5
    kv_prev = state["kv"]
    win = torch.cat((kv_prev[:, :, :, 1:], qkv[:, 1:].unsqueeze(3)), 3)
    qs = torch.cat((state["q"], q.unsqueeze(2)), 2)  # (B, h, n, dh)
    new = {"q": qs[:, :, 1:], "kv": win}
    if "num" in state:
        o = _retro_update(state, new, kv_prev[:, :, :, 0], qkv[:, 2], q, win, masks)
    else:
        o = F.scaled_dot_product_attention(qs, win[:, 0], win[:, 1], scale=1.0)
    out = _out(p, _merge(o))  # (B, n, d)
    tokens = x.unsqueeze(1)
    if "x" in state:
        tokens = torch.cat((state["x"], tokens), 1)
        new["x"] = tokens[:, 1:]
    return _post(p, tokens, out), new


def _retro_update(state: dict[str, Tensor], new: dict[str, Tensor], old: Tensor, v: Tensor,
                  q: Tensor, win: Tensor, masks: tuple[Tensor | None, Tensor | None]) -> Tensor:
    """The running-sum update of :func:`retro_step`: fills ``new``, returns ``(B, h, n, d_h)``."""
    drop, valid = masks
    # retained queries: remove the leaving key (``old``), add the new one
    s = state["q"] @ torch.stack((old[:, 0], win[:, 0, :, -1]), -1)  # (B, h, n-1, 2)
    if drop is not None:
        s = s.masked_fill(drop, _NEG_INF)
    ref = torch.maximum(state["ref"], s[..., 1])
    e = torch.exp(s - ref.unsqueeze(-1))
    rescale = torch.exp(state["ref"] - ref)
    e_old, e_new = e.unbind(-1)
    num = torch.addcmul(e_new.unsqueeze(-1) * v.unsqueeze(2), state["num"], rescale.unsqueeze(-1))
    num = num - e_old.unsqueeze(-1) * old[:, 1].unsqueeze(2)
    den = state["den"] * rescale + e_new - e_old
    # the new query against the whole window
    sq = (win[:, 0] @ q.unsqueeze(-1)).squeeze(-1)  # (B, h, n)
    if valid is not None:
        sq = sq.masked_fill(~valid, _NEG_INF)
    mq = sq.amax(-1, keepdim=True)
    eq = torch.exp(sq - mq)
    num = torch.cat((num, eq.unsqueeze(2) @ win[:, 1]), 2)
    den = torch.cat((den, eq.sum(-1, keepdim=True)), 2)
    new["num"], new["den"] = num[:, :, 1:], den[:, :, 1:]
    new["ref"] = torch.cat((ref, mq), 2)[:, :, 1:]
    return num / den.unsqueeze(-1)


def retro_chunk(p: Parts, x: Tensor, state: dict[str, Tensor], n: int, first: int,
                valid: Tensor | None):
    """Tokens ``x`` ``(B, T, d)``: all outputs of the windows ending at ``first..T-1``
    ``(B * T', n, d)`` (or ``None``) and the state after the chunk, its sums rebuilt exactly.

    ``valid`` ``(B|1, n)`` marks which of the last ``n`` tokens belong to the stream
    (``None``: all).
    """
    b, t, d = x.shape
    h = p.mha.num_heads
    qkv = _split(_proj(p, _pre(p, x), 0, 3 * d), 3 * h).unflatten(1, (3, h))  # (B,3,h,T,dh)
    qs = torch.cat((state["q"], qkv[:, 0] * (d // h) ** -0.5), 2)  # (B, h, n - 1 + T, dh)
    kvs = torch.cat((state["kv"][:, :, :, 1:], qkv[:, 1:]), 3)  # (B, 2, h, n - 1 + T, dh)
    q, kv = qs[:, :, t:].contiguous(), kvs[:, :, :, t - 1:].contiguous()
    new = {"q": q, "kv": kv}
    if "num" in state:
        s = q @ kv[:, 0].transpose(-1, -2)  # (B, h, n-1, n)
        if valid is not None:
            own = torch.eye(n, dtype=torch.bool, device=x.device)[1:]
            s = s.masked_fill(~(valid.view(-1, 1, 1, n) | own), _NEG_INF)
        ref = s.amax(-1)
        e = torch.exp(s - ref.unsqueeze(-1))
        new.update(num=e @ kv[:, 1], den=e.sum(-1), ref=ref)
    seq = None
    if "x" in state:
        seq = torch.cat((state["x"], x), 1)
        new["x"] = seq[:, t:].contiguous()
    if first >= t:
        return None, new
    tp = t - first
    qw = qs.unfold(2, n, 1)[:, :, first:].permute(0, 2, 1, 4, 3).reshape(b * tp, h, n, -1)
    kvw = kvs.unfold(3, n, 1)[:, :, :, first:].permute(0, 3, 1, 2, 5, 4)
    kvw = kvw.reshape(b * tp, 2, h, n, -1)
    o = _out(p, _merge(F.scaled_dot_product_attention(qw, kvw[:, 0], kvw[:, 1], scale=1.0)))
    toks = None
    if seq is not None:
        toks = seq[:, first:].unfold(1, n, 1).transpose(-1, -2).reshape(b * tp, n, d)
    return _post(p, toks, o), new

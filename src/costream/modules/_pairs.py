"""Two steps of a temporal convolution with ``k + 1`` frame convolutions instead of ``2 k``.

A temporal conv with ``k`` taps (stride and dilation 1 in time) emits
``y_n = sum_j W_j * x_{n-k+1+j}``, where each ``W_j * x`` is a spatial convolution. Two
consecutive outputs share ``k - 1`` input frames, and the minimal filtering algorithm F(2, k)
(Toom-Cook; Winograd's minimal filtering, used in space by Lavin and Gray, arXiv 1509.09308)
computes both with ``k + 1`` products instead of ``2 k``, each product a spatial convolution of a
combination of frames with a combination of taps. Evaluated at the points 0, 1, -1, 1/2, -1/2
and infinity, the ``k`` products of the finite points read only the pair's first ``k`` frames,
and the first output is their plain sum; the product at infinity reads frames 1 to ``k`` and
completes the second output. A continual step therefore computes ``k`` products when a pair
starts (its output, and a carry: the part of the next output those products already hold) and
one product when the pair ends: ``(k + 1) / 2`` spatial convolutions per step on average
instead of ``k``, and never more than ``k`` in one step. The combinations use small exact
coefficients (integers after scaling the kernels), so the results stay as close to the offline
conv as the direct step's (tested in float64 and float32).

This module holds the transforms; :class:`costream.modules.Conv3d` runs the steps
(``_CoConvNd._pair_step``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from math import gcd, lcm

import torch
from torch import Tensor

#: Temporal kernel sizes stepped in pairs: longer kernels need points such as 2 or 1/3, whose
#: transforms grow the rounding error; they keep the direct step. Two taps save too little
#: (3 frame convolutions per two outputs instead of 4) to pay for the combinations.
PAIRED_KERNELS = (3, 4, 5)

Terms = tuple[tuple[int, float], ...]  # (index, coefficient) of a linear combination


def pairs_pay(k: int, in_channels: int, out_channels: int, threads: int) -> bool:
    """Whether a conv with ``k`` temporal taps and these channels per group steps in pairs on
    ``threads`` threads (float32 CPU inference through oneDNN; the other CPU paths pair
    wherever they can, other devices never).

    A pair saves ``(k - 1) / 2`` frame convolutions per step and costs the frame
    combinations, the sum of the products and the carry: memory passes that weigh more than
    the MACs saved on an RGB stem, and on narrow layers once two threads halve the convolutions'
    time. Measured with torch 2.13 on an AVX-512 EPYC (float32, a 3D conv and ReLU stepped
    inside a network, pairs against direct steps interleaved in one process, 8-128 px,
    strides 1 and 2): on one thread, k = 3 gained 1.04-1.45x from 16 input channels on
    (24 x 32 to 256 x 256) and lost 37 % with 3; k = 5 gained 1.08-1.5x from 24 input
    channels on and lost 22 % with 3. On two threads, k = 3 lost 3-11 % on layers of 48 x 64
    channels and fewer and gained 1.05-1.13x from 48 x 96 on; k = 5 gained 1.0-1.3x from 24
    input channels on. k = 2 lost up to 18 % (3 frame convolutions per pair instead of 4).
    """
    if k not in PAIRED_KERNELS or in_channels < 16:
        return False
    return threads == 1 or k > 3 or in_channels * out_channels >= 4096


@dataclass(frozen=True)
class PairTransforms:
    """F(2, k) in the form the steps use.

    * ``inputs[i]``: the frames (indices ``0..k-1`` of the pair's first ``k``) combined into
      the input of product ``i`` (``i < k``), integer coefficients;
    * ``kernels``: ``(k, k)``, product ``i``'s kernel is ``sum_j kernels[i, j] * W_j``;
    * ``carry``: the products (indices ``0..k-1``) combined into the carry;
    * ``last``: the frames (indices ``0..k-1`` for frames ``1..k`` of the pair) combined into
      the input of the last product, whose kernel is ``W_{k-1}``; the new frame's coefficient
      is 1.

    The pair's first output is the plain sum of the first ``k`` products; its second is the
    carry plus the last product.
    """

    inputs: tuple[Terms, ...]
    kernels: tuple[tuple[float, ...], ...]
    carry: Terms
    last: Terms


def _points(k: int) -> list[Fraction]:
    pts = [Fraction(0)]
    for p in (Fraction(1), Fraction(-1), Fraction(1, 2), Fraction(-1, 2)):
        if len(pts) < k:
            pts.append(p)
    if len(pts) < k:
        raise ValueError(f"paired steps take temporal kernels of {PAIRED_KERNELS}, not {k}")
    return pts


def _inverse(m: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact Gauss-Jordan inverse of a small nonsingular matrix."""
    n = len(m)
    a = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(m)]
    for c in range(n):
        p = next(r for r in range(c, n) if a[r][c] != 0)
        a[c], a[p] = a[p], a[c]
        pivot = a[c][c]
        a[c] = [v / pivot for v in a[c]]
        for r in range(n):
            if r != c and a[r][c] != 0:
                f = a[r][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c])]
    return [row[n:] for row in a]


def _ordered(terms: list[tuple[int, Fraction]]) -> Terms:
    """Nonzero terms, a term with coefficient 1 first where there is one (one fewer multiply)."""
    terms = [(i, c) for i, c in terms if c != 0]
    terms.sort(key=lambda t: t[1] != 1)
    return tuple((i, float(c)) for i, c in terms)


@cache
def pair_transforms(k: int) -> PairTransforms:
    """The transforms of F(2, ``k``) (see the module docstring)."""
    pts = _points(k)
    n = k + 1
    # evaluation of a degree n - 1 polynomial at the finite points, and its leading coefficient
    v = [[p ** j for j in range(n)] for p in pts] + [[Fraction(int(j == n - 1)) for j in range(n)]]
    vinv = _inverse(v)
    data = [[vinv[j][i] for j in range(n)] for i in range(n)]  # input transform, row per product
    taps = [[p ** j for j in range(k)] for p in pts]  # kernel transform of the finite points
    inputs, kernels = [], []
    for row, tap in zip(data[:k], taps):
        assert row[k] == 0  # the finite products never read the pair's last frame
        nz = [c for c in row if c != 0]
        scale = Fraction(lcm(*(c.denominator for c in nz)), gcd(*(c.numerator for c in nz)))
        if next(c for c in row if c != 0) < 0:
            scale = -scale
        inputs.append(_ordered([(j, c * scale) for j, c in enumerate(row[:k])]))
        kernels.append(tuple(float(c / scale) for c in tap))
    last = data[k]
    assert last[0] == 0 and last[k] == 1  # frames 1..k, the new one as is
    return PairTransforms(inputs=tuple(inputs), kernels=tuple(kernels),
                          carry=_ordered([(i, p) for i, p in enumerate(pts)]),
                          last=_ordered([(j - 1, c) for j, c in enumerate(last) if j]))


def combine(terms: Terms, parts: list[Tensor], out: Tensor | None = None) -> Tensor:
    """``sum(c * parts[i] for i, c in terms)``, written into ``out`` if given."""
    (i0, c0), rest = terms[0], terms[1:]
    if not rest:
        if out is None:
            return parts[i0] * c0 if c0 != 1 else parts[i0].clone()
        return torch.mul(parts[i0], c0, out=out) if c0 != 1 else out.copy_(parts[i0])
    i1, c1 = rest[0]
    if c0 == 1:
        out = torch.add(parts[i0], parts[i1], alpha=c1, out=out)
    else:
        out = torch.mul(parts[i0], c0, out=out)
        out.add_(parts[i1], alpha=c1)
    for i, c in rest[1:]:
        out.add_(parts[i], alpha=c)
    return out


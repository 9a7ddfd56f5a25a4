"""How close a pruned embedder stays to the original: cosine, rank correlation, KL divergence."""

from __future__ import annotations

import torch
from torch import Tensor


def ranks(x: Tensor) -> Tensor:
    """Ranks ``1..n`` of a 1-D tensor, ties sharing their average rank (float64).

    Example:
        >>> import torch
        >>> ranks(torch.tensor([3.0, 1.0, 3.0, 2.0]))
        tensor([3.5000, 1.0000, 3.5000, 2.0000], dtype=torch.float64)
    """
    x = x.detach().double().flatten().cpu()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    out = torch.empty_like(x)
    # runs of equal values share the mean of the positions they span
    _, counts = torch.unique_consecutive(sorted_x, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    out[order] = torch.repeat_interleave(mean_rank, counts)
    return out


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (Pearson correlation of their ranks).

    Example:
        >>> import torch
        >>> spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 40.0]))
        1.0
    """
    if a.shape != b.shape or a.dim() != 1 or len(a) < 2:
        raise ValueError(f"expected two 1-D tensors of the same length >= 2, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def compare_embeddings(reference: Tensor, other: Tensor) -> dict[str, float]:
    """Mean cosine of matching rows, and Spearman of the pairwise similarity matrices.

    ``reference`` and ``other`` are embeddings ``(N, D)`` of the same ``N`` sentences by the
    original and the pruned model. ``cosine`` is the mean over sentences of the cosine
    similarity of their two embeddings; ``spearman`` the rank correlation of the ``N (N - 1) / 2``
    pairwise cosine similarities (upper triangles) of each model: whether the pruned model
    still orders sentence pairs by similarity as the original does.

    Example:
        >>> import torch
        >>> from costream.prune.hf import compare_embeddings
        >>> e = torch.randn(6, 8)
        >>> {k: round(v, 6) for k, v in compare_embeddings(e, 2 * e).items()}
        {'cosine': 1.0, 'spearman': 1.0}
    """
    if reference.dim() != 2 or other.dim() != 2 or reference.shape != other.shape:
        raise ValueError(f"expected two (N, D) embedding matrices of one shape, got "
                         f"{tuple(reference.shape)} and {tuple(other.shape)}")
    if len(reference) < 3:
        raise ValueError("compare_embeddings needs at least 3 sentences")
    a = torch.nn.functional.normalize(reference.detach().double(), dim=1)
    b = torch.nn.functional.normalize(other.detach().double().to(a.device), dim=1)
    cosine = float((a * b).sum(1).mean())
    iu = torch.triu_indices(len(a), len(a), offset=1, device=a.device)
    sim_a, sim_b = (a @ a.T)[iu[0], iu[1]], (b @ b.T)[iu[0], iu[1]]
    return {"cosine": cosine, "spearman": spearman(sim_a, sim_b)}


def similarity_kl(reference: Tensor, other: Tensor, temperature: float = 0.05) -> float:
    """KL divergence of the sentence-similarity distributions of two sets of embeddings.

    For each sentence ``i``, ``p_i`` is the softmax over the other sentences ``j != i`` of the
    cosine similarities ``<e_i, e_j> / temperature`` under ``reference``, ``q_i`` the same under
    ``other``; the result is the mean over ``i`` of ``KL(p_i || q_i)``. ``reference`` and
    ``other`` embed the same ``N >= 2`` sentences (rows; they are normalised here). The
    temperature 0.05 is the scale 20 of the multiple-negatives ranking loss sentence embedders
    are trained with. :func:`select_calibration` ranks candidate calibration sets by it.

    Example:
        >>> import torch
        >>> from costream.prune.hf import similarity_kl
        >>> e = torch.randn(5, 8)
        >>> similarity_kl(e, e)
        0.0
        >>> similarity_kl(e, e + 0.5 * torch.randn(5, 8)) > 0
        True
    """
    if reference.dim() != 2 or other.dim() != 2 or len(reference) != len(other):
        raise ValueError(f"expected two (N, D) embedding matrices of the same N, got "
                         f"{tuple(reference.shape)} and {tuple(other.shape)}")
    if len(reference) < 2:
        raise ValueError("the similarity distributions need at least 2 sentences")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    off = ~torch.eye(len(reference), dtype=torch.bool, device=reference.device)

    def log_p(e: Tensor) -> Tensor:
        e = torch.nn.functional.normalize(e.detach().double(), dim=1)
        logits = (e @ e.T / temperature)[off].view(len(e), -1)
        return torch.log_softmax(logits, dim=1)

    lp, lq = log_p(reference), log_p(other.to(reference.device))
    return float((lp.exp() * (lp - lq)).sum(1).mean())

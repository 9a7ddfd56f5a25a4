"""Calibration selection: keep the calibration set whose pruned model stays closest.

Data-driven criteria depend on the calibration sentences, and NIRVANA (Ai et al., arXiv
2509.14230) keeps, among several candidate calibration sets, the one whose pruned model has the
lowest KL divergence to the original model. An embedder has no output distribution over a
vocabulary, so the distribution compared here is the one sentence embedders are trained on: for
each reference sentence ``i``, the softmax over the other reference sentences ``j != i`` of the
cosine similarities divided by a temperature (``0.05``: the scale 20 of the multiple-negatives
ranking loss). :func:`similarity_kl` is ``KL(original || pruned)`` of these distributions,
averaged over ``i``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import BertModel

from ._allocate import PruningPlan, allocate, apply_plan
from ._metrics import similarity_kl
from ._model import PrunedBertModel, check_bert, embed
from ._scores import Loss, score

Batches = Sequence[Mapping[str, Tensor]]


@torch.no_grad()
def embed_all(model: BertModel, batches: Iterable[Mapping[str, Tensor]]) -> Tensor:
    """:func:`embed` over every batch, concatenated (eval mode, no gradients)."""
    training = model.training
    model.eval()
    try:
        out = [embed(model, b) for b in batches]
    finally:
        model.train(training)
    if not out:
        raise ValueError("no batches given")
    return torch.cat(out)


@dataclass
class CalibrationChoice:
    """The outcome of :func:`select_calibration`.

    ``index`` is the chosen candidate, ``kl[i]`` the KL divergence of candidate ``i``'s pruned
    model, ``model`` and ``plan`` those of the chosen candidate.

    Example:
        >>> from costream.prune.hf import CalibrationChoice
        >>> CalibrationChoice(index=1, kl=[0.3, 0.1]).kl[1]
        0.1
    """

    index: int
    kl: list[float]
    model: Any = field(default=None, repr=False)
    plan: PruningPlan | None = field(default=None, repr=False)


def select_calibration(model: BertModel, candidates: Sequence[Batches], reference: Batches,
                       sparsity: float, criterion: str = "nirvana", gamma: float = 3.0,
                       multiple_of: int = 8, temperature: float = 0.05,
                       loss: Loss | None = None) -> CalibrationChoice:
    """Prune with each candidate calibration set; keep the lowest ``KL(original || pruned)``.

    Each candidate (a list of tokenized batches) scores ``model`` with ``criterion``; the
    scores are allocated (:func:`allocate`) and applied; the pruned model's KL divergence to
    ``model`` (:func:`similarity_kl`) is measured on the ``reference`` batches, which should be
    sentences of neither the candidates nor the final evaluation.

    Args:
        model: the ``BertModel`` to prune (not changed).
        candidates: candidate calibration sets, each a list of tokenized batches.
        reference: tokenized batches on which the KL divergence is measured.
        sparsity, gamma, multiple_of: as for :func:`allocate`.
        criterion: as for :func:`score` (NIRVANA's saliency by default).
        temperature: of the similarity distributions.
        loss: as for :func:`score` (``taylor`` only).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from costream.prune.hf import select_calibration
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
        ...                             num_attention_heads=4, intermediate_size=64)).eval()
        >>> def batch():
        ...     return [{"input_ids": torch.randint(0, 50, (4, 6))}]
        >>> choice = select_calibration(bert, [batch(), batch()], batch(), sparsity=0.3)
        >>> choice.index == min(range(2), key=choice.kl.__getitem__)
        True
    """
    check_bert(model)
    if not candidates:
        raise ValueError("select_calibration needs at least one candidate calibration set")
    reference = list(reference)
    base = embed_all(model, reference)

    def prune(batches: Batches) -> tuple[PrunedBertModel, PruningPlan]:
        plan = allocate(model, score(model, criterion, list(batches), loss=loss), sparsity,
                        gamma, multiple_of)
        return apply_plan(model, plan), plan

    return keep_closest(candidates, prune, lambda pruned: similarity_kl(
        base, embed_all(pruned, reference), temperature))


def keep_closest(candidates: Sequence[Any], prune: Callable[[Any], tuple[Any, PruningPlan]],
                 divergence: Callable[[Any], float]) -> CalibrationChoice:
    """Prune with each candidate; keep the pruned model of the lowest ``divergence``."""
    best: CalibrationChoice | None = None
    kls: list[float] = []
    for i, batches in enumerate(candidates):
        pruned, plan = prune(batches)
        kls.append(float(divergence(pruned)))
        if best is None or kls[-1] < kls[best.index]:
            best = CalibrationChoice(i, kls, pruned, plan)
    if best is None:
        raise ValueError("calibration selection needs at least one candidate calibration set")
    return best

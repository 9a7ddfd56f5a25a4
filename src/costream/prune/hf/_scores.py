"""Importance of attention heads and MLP neurons of a BERT encoder.

A head owns the rows of the query, key and value projections that compute it and the columns
of the attention output projection that read it; a neuron owns its row of
``intermediate.dense`` and its column of ``output.dense``. Every criterion computes an
element-wise saliency of those weight matrices (biases are not scored) and sums it over what a
structure owns:

* ``magnitude``: ``|w|`` (no data needed);
* ``taylor``: ``|w * g|`` with ``g`` the gradient of a loss summed over the calibration batches
  (first-order Taylor estimate of the loss change when the weight goes). An embedder has no
  labels, and a distillation loss toward its own outputs has zero gradient at the unpruned
  model, so the default loss is the unsupervised contrastive loss of SimCSE (Gao et al., EMNLP
  2021): every sentence is encoded twice with dropout active, the other encoding of the same
  sentence is the positive and the rest of the batch the negatives, at scale 20 (the
  multiple-negatives ranking scale sentence embedders such as all-MiniLM-L6-v2 are trained
  with). The model runs in training mode (dropout on) for this criterion;
* ``nirvana``: ``|w * df/dw|`` with ``f`` the model output itself, not a loss: the batch mean of
  the max over the sequence (tokens the attention mask keeps) of the last hidden state,
  averaged over features (NIRVANA, Ai et al., arXiv 2509.14230). The model runs in eval mode.

Gradients are taken with ``torch.autograd.grad``: the model's ``.grad`` fields and
``requires_grad`` flags are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import BertModel

from ._model import check_batch, check_bert, embed, head_size, hidden_states

CRITERIA = ("magnitude", "taylor", "nirvana")
CONTRASTIVE_SCALE = 20.0
Loss = Callable[[BertModel, Mapping[str, Tensor]], Tensor]


@dataclass
class Scores:
    """Importance of every head and neuron: one float64 tensor per layer for each.

    ``heads[i]`` has one entry per attention head of layer ``i``, ``neurons[i]`` one per MLP
    neuron; larger means more important.

    Example:
        >>> import torch
        >>> from costream.prune.hf import Scores
        >>> s = Scores("magnitude", heads=[torch.ones(4)], neurons=[torch.ones(32)])
        >>> s.num_heads, s.num_neurons
        (4, 32)
    """

    criterion: str
    heads: list[Tensor]
    neurons: list[Tensor]

    @property
    def num_heads(self) -> int:
        """Heads over all layers."""
        return sum(len(h) for h in self.heads)

    @property
    def num_neurons(self) -> int:
        """Neurons over all layers."""
        return sum(len(n) for n in self.neurons)


def layer_weights(model: BertModel) -> list[dict[str, nn.Parameter]]:
    """The weight matrices of each layer that heads and neurons own, by role."""
    out = []
    for layer in model.encoder.layer:
        attn = layer.attention.self
        out.append({"query": attn.query.weight, "key": attn.key.weight,
                    "value": attn.value.weight, "attn_out": layer.attention.output.dense.weight,
                    "up": layer.intermediate.dense.weight, "down": layer.output.dense.weight})
    return out


def aggregate(saliency: dict[str, Tensor], d: int) -> tuple[Tensor, Tensor]:
    """Sum an element-wise saliency of one layer's weights per head (size ``d``) and neuron."""
    n_rows = saliency["query"].shape[0]
    if n_rows % d:
        raise ValueError(f"attention width {n_rows} is not a multiple of the head size {d}")
    h = n_rows // d
    heads = sum(saliency[k].reshape(h, -1).sum(1) for k in ("query", "key", "value"))
    out = saliency["attn_out"]
    heads = heads + out.reshape(out.shape[0], h, d).sum((0, 2))
    neurons = saliency["up"].sum(1) + saliency["down"].sum(0)
    return heads.double().cpu(), neurons.double().cpu()


def contrastive_loss(model: BertModel, batch: Mapping[str, Tensor]) -> Tensor:
    """SimCSE's unsupervised loss: two dropout views of each sentence, in-batch negatives.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                             num_attention_heads=2, intermediate_size=32)).train()
        >>> batch = {"input_ids": torch.randint(0, 50, (4, 6))}
        >>> contrastive_loss(bert, batch).dim()
        0
    """
    a, b = embed(model, batch), embed(model, batch)
    if a.shape[0] < 2:
        raise ValueError("the contrastive loss needs batches of at least 2 sentences")
    logits = CONTRASTIVE_SCALE * a @ b.T
    return nn.functional.cross_entropy(logits, torch.arange(len(a), device=a.device))


def nirvana_output(model: BertModel, batch: Mapping[str, Tensor]) -> Tensor:
    """NIRVANA's ``f``: batch and feature mean of the max over kept tokens of the output."""
    hidden = hidden_states(model, batch)
    mask = batch.get("attention_mask")
    if mask is not None:
        keep = mask.to(device=hidden.device, dtype=torch.bool).unsqueeze(-1)
        hidden = hidden.masked_fill(~keep, torch.finfo(hidden.dtype).min)
    return hidden.max(dim=1).values.mean()


def _gradients(model: BertModel, objective: Loss, batches: Iterable[Mapping[str, Tensor]],
               params: list[nn.Parameter]) -> list[Tensor]:
    flags = [p.requires_grad for p in params]
    totals: list[Tensor] | None = None
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            check_batch(batch)
            grads = torch.autograd.grad(objective(model, batch), params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            totals = grads if totals is None else [t + g for t, g in zip(totals, grads)]
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if totals is None:
        raise ValueError("gradient criteria need at least one calibration batch")
    return totals


def score(model: BertModel, criterion: str, batches: Iterable[Mapping[str, Tensor]] | None = None,
          loss: Loss | None = None) -> Scores:
    """Score every attention head and MLP neuron of ``model`` with ``criterion``.

    Args:
        model: a ``BertModel`` (pruned or not).
        criterion: ``"magnitude"``, ``"taylor"`` or ``"nirvana"`` (module docstring).
        batches: tokenized calibration batches (not needed for ``magnitude``).
        loss: ``taylor`` only: ``loss(model, batch) -> scalar`` instead of the contrastive loss.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from costream.prune.hf import score
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...                             num_attention_heads=4, intermediate_size=32)).eval()
        >>> batches = [{"input_ids": torch.randint(0, 50, (4, 6))}]
        >>> s = score(bert, "nirvana", batches)
        >>> [tuple(h.shape) for h in s.heads], [tuple(n.shape) for n in s.neurons]
        ([(4,), (4,)], [(32,), (32,)])
    """
    check_bert(model)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {list(CRITERIA)}")
    if loss is not None and criterion != "taylor":
        raise ValueError(f"a loss only applies to the 'taylor' criterion, not {criterion!r}")
    weights = layer_weights(model)
    d = head_size(model.config)
    if criterion == "magnitude":
        saliency = [{k: w.detach().abs() for k, w in layer.items()} for layer in weights]
    else:
        if batches is None:
            raise ValueError(f"criterion {criterion!r} needs calibration batches")
        params = [w for layer in weights for w in layer.values()]
        training = model.training
        model.train(criterion == "taylor")
        objective = (loss or contrastive_loss) if criterion == "taylor" else nirvana_output
        try:
            grads = iter(_gradients(model, objective, batches, params))
        finally:
            model.train(training)
        saliency = [{k: (w.detach() * next(grads)).abs() for k, w in layer.items()}
                    for layer in weights]
    heads, neurons = zip(*(aggregate(s, d) for s in saliency))
    return Scores(criterion, list(heads), list(neurons))

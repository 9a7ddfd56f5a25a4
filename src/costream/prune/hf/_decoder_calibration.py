"""Perplexity, next-token KL divergence and calibration selection for decoder LLMs.

NIRVANA (Ai et al., arXiv 2509.14230) prunes with several candidate calibration sets and keeps
the one whose pruned model has the lowest KL divergence to the original. For a decoder the
distributions compared are the next-token distributions: :func:`next_token_kl` is
``KL(original || pruned)`` averaged over the tokens the attention mask keeps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from ._calibration import CalibrationChoice, keep_closest
from ._decoder import (
    MIN_CALIBRATION_TOKENS,
    allocate_decoder,
    apply_decoder_plan,
    score_decoder,
)
from ._decoder_models import check_decoder
from ._model import check_batch

Batches = Sequence[Mapping[str, Tensor]]


def _forward(model: PreTrainedModel, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Logits ``(B, T, V)`` and the float mask ``(B, T)`` of the tokens kept."""
    check_batch(batch)
    ids = batch["input_ids"].to(model.device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(ids.device)
    return model(input_ids=ids, attention_mask=mask).logits, mask


@torch.no_grad()
def perplexity(model: PreTrainedModel, batches: Iterable[Mapping[str, Tensor]]) -> float:
    """``exp`` of the mean next-token cross-entropy over every predicted token (float64 sums).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from costream.prune.hf import perplexity
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).eval()
        >>> 1.0 < perplexity(llama, [{"input_ids": torch.randint(0, 50, (2, 9))}]) < 200
        True
    """
    check_decoder(model)
    training = model.training
    model.eval()
    nll, count = 0.0, 0.0
    try:
        for batch in batches:
            logits, mask = _forward(model, batch)
            ids = batch["input_ids"].to(logits.device)
            keep = (mask[:, 1:] * mask[:, :-1]).double()
            logp = torch.log_softmax(logits[:, :-1].double(), -1)
            token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            nll -= float((token * keep).sum())
            count += float(keep.sum())
    finally:
        model.train(training)
    if count == 0:
        raise ValueError("perplexity needs batches with at least 2 tokens per sequence")
    return math.exp(nll / count)


@torch.no_grad()
def next_token_kl(original: PreTrainedModel, pruned: PreTrainedModel,
                  batches: Iterable[Mapping[str, Tensor]]) -> float:
    """``KL(original || pruned)`` of the next-token distributions, mean over kept tokens.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from costream.prune.hf import next_token_kl
        >>> gpt = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1,
        ...                                  n_head=2)).eval()
        >>> next_token_kl(gpt, gpt, [{"input_ids": torch.randint(0, 50, (2, 6))}])
        0.0
    """
    total, count = 0.0, 0.0
    for model in (original, pruned):
        check_decoder(model).eval()
    for batch in batches:
        p_logits, mask = _forward(original, batch)
        q_logits, _ = _forward(pruned, batch)
        lp = torch.log_softmax(p_logits.double(), -1)
        lq = torch.log_softmax(q_logits.double().to(lp.device), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        total += float((kl * mask).sum())
        count += float(mask.sum())
    if count == 0:
        raise ValueError("next_token_kl needs at least one token")
    return total / count


def select_decoder_calibration(model: PreTrainedModel, candidates: Sequence[Batches],
                               reference: Batches, sparsity: float, criterion: str = "nirvana",
                               gamma: float = 3.0, multiple_of: int = 8,
                               min_tokens: int = MIN_CALIBRATION_TOKENS) -> CalibrationChoice:
    """Prune with each candidate calibration set; keep the lowest next-token KL divergence.

    Each candidate (a list of tokenized batches) scores ``model`` with ``criterion``
    (:func:`score_decoder`), is allocated (:func:`allocate_decoder`) and applied; the pruned
    model's :func:`next_token_kl` to ``model`` is measured on ``reference`` batches (text of
    neither the candidates nor the evaluation).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from costream.prune.hf import select_decoder_calibration
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ...     intermediate_size=64)).eval()
        >>> def text():
        ...     return [{"input_ids": torch.randint(0, 50, (4, 12))}]
        >>> choice = select_decoder_calibration(llama, [text(), text()], text(), 0.3)
        >>> choice.index == min(range(2), key=choice.kl.__getitem__)
        True
    """
    check_decoder(model)
    if not candidates:
        raise ValueError("select_decoder_calibration needs at least one candidate set")
    reference = list(reference)

    def prune(batches: Batches) -> tuple[Any, Any]:
        scores = score_decoder(model, criterion, list(batches), min_tokens=min_tokens)
        plan = allocate_decoder(model, scores, sparsity, gamma, multiple_of)
        return apply_decoder_plan(model, plan), plan

    return keep_closest(candidates, prune, lambda pruned: next_token_kl(model, pruned,
                                                                        reference))

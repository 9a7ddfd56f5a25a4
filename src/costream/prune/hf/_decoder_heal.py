"""Healing a pruned decoder with LoRA, distilled toward the original, then merged.

Every pruned projection (attention and MLP, ``nn.Linear`` or GPT-2's ``Conv1D``) gets a rank-``r``
update ``B A`` of its weight as a ``torch.nn.utils.parametrize`` parametrization (``B`` starts at
zero, so healing starts from the pruned model); everything else stays frozen. The updates learn
to bring the pruned model's next-token distributions back to the original's (loss
``KL(original || pruned)`` over the tokens the attention mask keeps, Adam, eval mode), then are
merged into the weights: the healed model has the pruned model's classes, shapes and speed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from ._decoder import _modules
from ._decoder_calibration import _forward
from ._decoder_models import check_decoder


class LowRankUpdate(nn.Module):
    """``weight -> weight + B A`` with ``B`` ``(out, r)`` zero and ``A`` ``(r, in)`` small.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(4, 3)
        >>> LowRankUpdate(lin.weight, rank=2)(lin.weight).equal(lin.weight)
        True
    """

    def __init__(self, weight: Tensor, rank: int) -> None:
        super().__init__()
        rows, cols = weight.shape
        self.a = nn.Parameter(torch.randn(rank, cols, dtype=weight.dtype,
                                          device=weight.device) / cols ** 0.5)
        self.b = nn.Parameter(torch.zeros(rows, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.b @ self.a


def heal_decoder(pruned: PreTrainedModel, original: PreTrainedModel,
                 batches: Sequence[Mapping[str, Tensor]], rank: int = 8, epochs: int = 1,
                 lr: float = 1e-3) -> PreTrainedModel:
    """Distil ``original``'s next-token distributions into ``pruned`` (in place) with LoRA.

    Args:
        pruned: the pruned causal LM; changed in place (updates merged) and returned.
        original: the model to imitate (not changed).
        batches: tokenized healing text (not the evaluation text).
        rank: rank of the updates.
        epochs: passes over ``batches``, one Adam step per batch.
        lr: Adam learning rate.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from costream.prune.hf import heal_decoder, next_token_kl, prune_decoder
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        ...     intermediate_size=32, initializer_range=0.3)).eval()
        >>> text = [{"input_ids": torch.randint(0, 50, (4, 8))}]
        >>> small = prune_decoder(llama, "magnitude", 0.3)
        >>> before = next_token_kl(llama, small, text)
        >>> healed = heal_decoder(small, llama, text, rank=4, epochs=5, lr=1e-2)
        >>> next_token_kl(llama, healed, text) < before
        True
    """
    check_decoder(pruned)
    check_decoder(original)
    if not batches:
        raise ValueError("heal_decoder needs at least one batch of healing text")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    original.eval()
    with torch.no_grad():
        targets = [torch.log_softmax(_forward(original, b)[0].double(), -1) for b in batches]
    flags = {p: p.requires_grad for p in pruned.parameters()}
    modules = _modules(pruned)
    weight_flags = [m.weight.requires_grad for m in modules]
    for p in pruned.parameters():
        p.requires_grad_(False)
    updates = []
    for m in modules:
        update = LowRankUpdate(m.weight, rank)
        parametrize.register_parametrization(m, "weight", update)
        updates.append(update)
    params = [p for u in updates for p in u.parameters()]
    optimiser = torch.optim.Adam(params, lr=lr)
    training = pruned.training
    pruned.eval()
    try:
        for _ in range(epochs):
            for batch, lp in zip(batches, targets):
                logits, mask = _forward(pruned, batch)
                lq = torch.log_softmax(logits.double(), -1)
                kl = (lp.exp() * (lp - lq.to(lp.device))).sum(-1)
                loss = (kl * mask).sum() / mask.sum()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    finally:
        pruned.train(training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        with torch.no_grad():
            for m, flag in zip(modules, weight_flags):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
                m.weight.requires_grad_(flag)
    return pruned

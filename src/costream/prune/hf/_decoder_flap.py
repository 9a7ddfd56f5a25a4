"""FLAP's fluctuation criterion for decoders: how much what a unit writes varies over tokens.

FLAP (An et al., AAAI 2024) scores an input channel ``j`` of an output projection (``o_proj``
for attention, ``down_proj`` for the MLP; GPT-2: the two ``c_proj``) by the variance of its
input over the calibration tokens times the squared norm of its weight column,
``Var(x_j) * ||W[:, j]||^2``: a channel whose input hardly fluctuates can be replaced by its
mean (FLAP folds that mean into the bias; this criterion only scores, it does not compensate).
A key/value group sums the score over the channels of its query heads. The statistics are
gathered with forward hooks in float64, over the tokens the attention mask keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from ._decoder_models import attention_parts, decoder_layers, mlp_parts


@torch.no_grad()
def fluctuation_saliency(model: PreTrainedModel, modules: Sequence[nn.Module],
                         oriented: dict[int, Tensor],
                         batches: Sequence[Mapping[str, Tensor]]) -> dict[int, Tensor]:
    """Element-wise saliency ``(out, in)`` of every module: ``Var(x_j) w_ij^2`` for the output
    projections, zero for the others (what a unit owns there is not scored by FLAP)."""
    readers = {id(p.module) for i in range(len(decoder_layers(model)))
               for p in attention_parts(model, i) + mlp_parts(model, i) if p.side == "in"}
    stats: dict[int, list[Tensor]] = {}
    mask_now: list[Tensor | None] = [None]

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])
        m = mask_now[0]
        w = x.new_ones(len(x)) if m is None else m.reshape(-1).to(x)
        s = stats.setdefault(id(module), [x.new_zeros(()), x.new_zeros(x.shape[1]),
                                          x.new_zeros(x.shape[1])])
        s[0] += w.sum()
        s[1] += (w[:, None] * x).sum(0)
        s[2] += (w[:, None] * x * x).sum(0)

    handles = [m.register_forward_pre_hook(hook) for m in modules if id(m) in readers]
    training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(model.device)
            mask = batch.get("attention_mask")
            mask_now[0] = None if mask is None else mask.to(ids.device)
            model(input_ids=ids, attention_mask=mask_now[0])
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    out = {}
    for m in modules:
        w = oriented[id(m)].detach()
        if id(m) in readers:
            n, s1, s2 = stats[id(m)]
            var = (s2 / n - (s1 / n) ** 2).clamp(min=0)
            out[id(m)] = var.to(w.dtype)[None, :] * w.double().square().to(w.dtype)
        else:
            out[id(m)] = torch.zeros_like(w)
    return out

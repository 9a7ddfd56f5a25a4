"""Healing a pruned BERT with SPLoRA adapters, distilled toward the original model.

Every linear layer of the encoder gets a SPLoRA adapter (:mod:`costream.prune.adapters`,
Hedegaard et al., arXiv 2211.10155): a rank-``r`` update ``B A`` of the pruned weight, plus the
layer's bias; everything else stays frozen. The adapters learn to bring the pruned model's
sentence embeddings back to the original model's (loss ``1 - cos``, original embeddings
computed once, eval mode, Adam), then merge into plain ``nn.Linear`` layers of the pruned
shapes, so the healed model has the pruned model's size and speed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from transformers import BertModel

from ..adapters import SPLoRAConfig, add_adapters, merge_adapters
from ._calibration import embed_all
from ._model import check_batch, check_bert, embed

ENCODER_LINEARS = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output" \
                  r"\.dense|intermediate\.dense|output\.dense)"


def heal_with_splora(pruned: BertModel, original: BertModel,
                     batches: Sequence[Mapping[str, Tensor]], rank: int = 8, epochs: int = 4,
                     lr: float = 1e-3, merge: bool = True) -> BertModel:
    """Distil ``original``'s embeddings into ``pruned`` (in place) through SPLoRA adapters.

    Args:
        pruned: the pruned ``BertModel``; changed in place and returned.
        original: the model to imitate (not changed).
        batches: tokenized training batches (calibration sentences, not the evaluation ones).
        rank: adapter rank.
        epochs: passes over ``batches``, one Adam step per batch.
        lr: Adam learning rate.
        merge: merge the adapters into the pruned layers (``True``), or leave them in place
            (to count or save them, e.g. :func:`costream.prune.task_storage`; merge later with
            :func:`costream.prune.adapters.merge_adapters`).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from costream.prune.hf import heal_with_splora, prune_heads_and_neurons, score
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
        ...                             num_attention_heads=4, intermediate_size=64)).eval()
        >>> batches = [{"input_ids": torch.randint(0, 50, (8, 6))}]
        >>> small = prune_heads_and_neurons(bert, score(bert, "magnitude"), 0.5)
        >>> healed = heal_with_splora(small, bert, batches, rank=2, epochs=2)
        >>> type(healed.encoder.layer[0].intermediate.dense).__name__
        'Linear'
    """
    check_bert(pruned)
    check_bert(original)
    batches = [check_batch(b) for b in batches]
    if not batches:
        raise ValueError("heal_with_splora needs at least one training batch")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    targets = [embed_all(original, [b]) for b in batches]
    flags = {p: p.requires_grad for p in pruned.parameters()}
    add_adapters(pruned, SPLoRAConfig(rank=rank, target_modules=ENCODER_LINEARS))
    params = [p for p in pruned.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=lr)
    training = pruned.training
    pruned.eval()
    try:
        for _ in range(epochs):
            for batch, target in zip(batches, targets):
                cos = (embed(pruned, batch) * target.to(params[0].device)).sum(1)
                loss = (1.0 - cos).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    finally:
        pruned.train(training)
        optimiser.zero_grad(set_to_none=True)
    if merge:
        merge_adapters(pruned)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return pruned


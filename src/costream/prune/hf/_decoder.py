"""Structured pruning of decoder LLMs: key/value groups and MLP neurons, scored and removed.

The attention unit is a key/value head together with the query heads that read it (grouped
query attention; one head for GPT-2), so no query head ever loses its key/value head. It owns
its rows of the query, key and value projections (GPT-2: its three slices of the fused
``c_attn``) and the columns of the output projection reading its query heads. The MLP unit is a
neuron: its rows of ``gate_proj`` and ``up_proj`` and its column of ``down_proj`` (GPT-2:
``c_fc`` row, ``c_proj`` column). Criteria, as for BERT (:func:`score`), are element-wise
saliencies of those weights summed per unit (biases are not scored):

* ``magnitude``: ``|w|``;
* ``taylor``: ``|w * g|``, ``g`` the gradient of the next-token cross-entropy summed over the
  calibration batches (first-order Taylor, as LLM-Pruner);
* ``nirvana``: ``|w * df/dw|``, ``f`` the mean over the tokens the attention mask keeps of the
  largest logit (NIRVANA's output objective, Ai et al., arXiv 2509.14230);
* ``fluctuation``: FLAP's ``Var(x_j) ||W[:, j]||^2`` of the output projections' input channels
  (:mod:`costream.prune.hf._decoder_flap`; no bias compensation).

Gradients are taken in eval mode with ``torch.autograd.grad``. :func:`allocate_decoder` ranks
groups and neurons globally with the attention/MLP ratio ``gamma`` (the search of
:func:`allocate`), keeps widths multiples of ``multiple_of`` and at least one key/value group per
layer, and counts the parameters of the attention and MLP projections (:func:`decoder_parameters`;
embeddings, norms and the LM head are not pruned). :func:`apply_decoder_plan` builds the smaller
model (:mod:`costream.prune.hf._decoder_models`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ._allocate import (
    PruningPlan,
    check_targets,
    derived_config,
    plan_from_widths,
    search_widths,
)
from ._decoder_flap import fluctuation_saliency
from ._decoder_models import (
    Part,
    attention_parts,
    check_decoder,
    decoder_layers,
    family,
    group_size,
    head_dim,
    mlp_parts,
)
from ._model import check_batch
from ._scores import CRITERIA, Scores, _gradients

MIN_CALIBRATION_TOKENS = 32
DECODER_CRITERIA = (*CRITERIA, "fluctuation")


def _oriented(module: nn.Module) -> Tensor:
    """The weight as ``(out, in)``."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def unit_counts(model: PreTrainedModel) -> tuple[list[int], list[int]]:
    """``(key/value groups, MLP neurons)`` each layer of ``model`` has now."""
    n = len(decoder_layers(model))
    groups = [_oriented(attention_parts(model, i)[-1].module).shape[1]
              // attention_parts(model, i)[-1].width for i in range(n)]
    neurons = [_oriented(mlp_parts(model, i)[-1].module).shape[1] for i in range(n)]
    return groups, neurons


def _features(part: Part, units: Iterable[int], device: Any = None) -> Tensor:
    idx = [part.offset + u * part.width + k for u in units for k in range(part.width)]
    return torch.tensor(idx, dtype=torch.long, device=device)


def _per_unit(parts: Sequence[Part], n_units: int, saliency: dict[int, Tensor]) -> Tensor:
    """Sum an element-wise ``(out, in)`` saliency over what each of ``n_units`` units owns."""
    total = torch.zeros(n_units, dtype=torch.float64)
    for p in parts:
        s = saliency[id(p.module)]
        per_feature = s.sum(1) if p.side == "out" else s.sum(0)
        block = per_feature[p.offset:p.offset + n_units * p.width]
        total += block.reshape(n_units, p.width).sum(1).double().cpu()
    return total


def _unit_cost(parts: Sequence[Part]) -> int:
    """Parameters (weights and biases) that one unit owns."""
    cost = 0
    for p in parts:
        out_dim, in_dim = _oriented(p.module).shape
        if p.side == "out":
            cost += p.width * in_dim + (p.width if p.module.bias is not None else 0)
        else:
            cost += p.width * out_dim
    return cost


def _modules(model: PreTrainedModel) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for i in range(len(decoder_layers(model))):
        for p in attention_parts(model, i) + mlp_parts(model, i):
            seen.setdefault(id(p.module), p.module)
    return list(seen.values())


def decoder_parameters(model: PreTrainedModel) -> int:
    """Parameters of the attention and MLP projections: what decoder pruning shrinks.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from costream.prune.hf import decoder_parameters
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        ...     intermediate_size=32))
        >>> decoder_parameters(llama)  # q, o: 16 x 16; k, v: 8 x 16; 3 x 16 x 32
        2304
    """
    check_decoder(model)
    return sum(p.numel() for m in _modules(model) for p in m.parameters(recurse=False))


def _check_tokens(batches: list[Mapping[str, Tensor]], min_tokens: int) -> None:
    for b in batches:
        check_batch(b)
    tokens = sum(int(b["attention_mask"].sum()) if b.get("attention_mask") is not None
                 else b["input_ids"].numel() for b in batches)
    if tokens < min_tokens or any(b["input_ids"].shape[1] < 2 for b in batches):
        raise ValueError(f"the calibration set is too short: {tokens} tokens in {len(batches)} "
                         f"batches; at least {min_tokens} tokens, in sequences of 2 or more, "
                         f"are needed")


def lm_loss(model: PreTrainedModel, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy of ``model`` on ``batch`` (padding ignored)."""
    ids = batch["input_ids"].to(model.device)
    mask = batch.get("attention_mask")
    labels = ids if mask is None else ids.masked_fill(mask.to(ids.device) == 0, -100)
    mask = None if mask is None else mask.to(ids.device)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def max_logit(model: PreTrainedModel, batch: Mapping[str, Tensor]) -> Tensor:
    """NIRVANA's ``f``: the mean over kept tokens of the largest logit."""
    ids = batch["input_ids"].to(model.device)
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.to(ids.device)
    top = model(input_ids=ids, attention_mask=mask).logits.max(-1).values
    if mask is None:
        return top.mean()
    keep = mask.to(top.dtype)
    return (top * keep).sum() / keep.sum()


def score_decoder(model: PreTrainedModel, criterion: str,
                  batches: Iterable[Mapping[str, Tensor]] | None = None,
                  min_tokens: int = MIN_CALIBRATION_TOKENS) -> Scores:
    """Score every key/value group and MLP neuron of a decoder with ``criterion``.

    ``Scores.heads[i]`` holds one entry per key/value group of layer ``i`` (GPT-2: per head).

    Args:
        model: a supported causal LM (Llama, Mistral, Qwen2, GPT-2; pruned or not).
        criterion: ``"magnitude"``, ``"taylor"``, ``"nirvana"`` or ``"fluctuation"`` (module
            docstring).
        batches: tokenized calibration batches (``input_ids``, optional ``attention_mask``;
            not needed for ``magnitude``).
        min_tokens: fewer calibration tokens than this is an error.

    Example:
        >>> import torch
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> from costream.prune.hf import score_decoder
        >>> qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ...     intermediate_size=64)).eval()
        >>> s = score_decoder(qwen, "nirvana", [{"input_ids": torch.randint(0, 50, (4, 8))}])
        >>> [len(h) for h in s.heads], [len(n) for n in s.neurons]
        ([2, 2], [64, 64])
    """
    check_decoder(model)
    if criterion not in DECODER_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from "
                         f"{list(DECODER_CRITERIA)}")
    modules = _modules(model)
    if criterion == "magnitude":
        saliency = {id(m): _oriented(m).detach().abs() for m in modules}
    elif criterion == "fluctuation":
        if batches is None:
            raise ValueError("criterion 'fluctuation' needs calibration batches")
        batches = list(batches)
        _check_tokens(batches, min_tokens)
        saliency = fluctuation_saliency(model, modules, {id(m): _oriented(m) for m in modules},
                                        batches)
    else:
        if batches is None:
            raise ValueError(f"criterion {criterion!r} needs calibration batches")
        batches = list(batches)
        _check_tokens(batches, min_tokens)
        params = [m.weight for m in modules]
        training = model.training
        model.eval()
        objective = lm_loss if criterion == "taylor" else max_logit
        try:
            grads = _gradients(model, objective, batches, params)
        finally:
            model.train(training)
        saliency = {id(m): (_oriented(m).detach() * (g.T if isinstance(m, Conv1D) else g)).abs()
                    for m, g in zip(modules, grads)}
    groups, neurons = unit_counts(model)
    n = len(groups)
    heads = [_per_unit(attention_parts(model, i), groups[i], saliency) for i in range(n)]
    mlp = [_per_unit(mlp_parts(model, i), neurons[i], saliency) for i in range(n)]
    return Scores(criterion, heads, mlp)


def allocate_decoder(model: PreTrainedModel, scores: Scores, sparsity: float,
                     gamma: float = 1.0, multiple_of: int = 8) -> PruningPlan:
    """Plan the removal of ``sparsity`` of the attention and MLP parameters of a decoder.

    Global ranking with the attention/MLP ratio ``gamma`` as :func:`allocate`; the attention
    width (query heads x head size) and the MLP width of every layer stay multiples of
    ``multiple_of``, and every layer keeps at least one key/value group. ``plan.heads`` lists
    the key/value groups each layer keeps.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from costream.prune.hf import allocate_decoder, score_decoder
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ...     intermediate_size=64))
        >>> plan = allocate_decoder(llama, score_decoder(llama, "magnitude"), 0.3)
        >>> plan.sparsity >= 0.3 and all(n % 8 == 0 for n in plan.widths()[1])
        True
    """
    check_decoder(model)
    check_targets(sparsity, gamma, multiple_of)
    groups, neurons = unit_counts(model)
    if not isinstance(scores, Scores) or ([len(h) for h in scores.heads],
                                          [len(n) for n in scores.neurons]) != (groups, neurons):
        raise ValueError(f"scores do not fit the model: it has {groups} key/value groups and "
                         f"{neurons} neurons per layer")
    width = group_size(model.config) * head_dim(model.config)
    total = decoder_parameters(model)
    kh, kn, removed = search_widths(
        scores.heads, scores.neurons, _unit_cost(attention_parts(model, 0)),
        _unit_cost(mlp_parts(model, 0)), total, sparsity, gamma,
        multiple_of // math.gcd(width, multiple_of), multiple_of,
        what=(f"with gamma={gamma}, {multiple_of} MLP neurons and one key/value group kept per "
              f"layer (more would remove a whole layer's attention or MLP)"),
        denominator="the attention and MLP parameters")
    return plan_from_widths(scores, kh, kn, removed / total)


def _check_plan(model: PreTrainedModel, plan: PruningPlan) -> None:
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"plan must be a PruningPlan, got {type(plan).__name__}")
    groups, neurons = unit_counts(model)
    if len(plan.heads) != len(groups) or len(plan.neurons) != len(groups):
        raise ValueError(f"the plan has {len(plan.heads)} / {len(plan.neurons)} layers, the "
                         f"model {len(groups)}")
    for i, (h, n) in enumerate(zip(plan.heads, plan.neurons)):
        if not h:
            raise ValueError(f"layer {i}: the plan removes the whole attention of the layer; "
                             f"keep at least one key/value group")
        if len(set(h)) != len(h) or min(h) < 0 or max(h) >= groups[i]:
            raise ValueError(f"layer {i}: kept key/value groups must be distinct indices in "
                             f"[0, {groups[i]}); got {h}")
        if not n or len(set(n)) != len(n) or min(n) < 0 or max(n) >= neurons[i]:
            raise ValueError(f"layer {i}: kept neurons must be distinct indices in "
                             f"[0, {neurons[i]}), at least one; got {n}")


def pruned_decoder_config(model: PreTrainedModel, plan: PruningPlan) -> Any:
    """The pruned config (``Pruned*Config``) of ``model`` pruned by ``plan``."""
    kv, neurons = plan.widths()
    return derived_config(model.config, family(model)[0], kv_heads_per_layer=kv,
                          intermediate_per_layer=neurons)


@torch.no_grad()
def apply_decoder_plan(model: PreTrainedModel, plan: PruningPlan) -> PreTrainedModel:
    """A new pruned causal LM holding the key/value groups and neurons ``plan`` keeps.

    ``model`` is left unchanged. The result computes exactly what ``model`` computes with the
    output-projection columns of the removed query heads and the down-projection columns of the
    removed neurons set to zero.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from costream.prune.hf import PruningPlan, apply_decoder_plan
        >>> gpt = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4))
        >>> plan = PruningPlan(heads=[[0, 3]], neurons=[list(range(64))], sparsity=0.0,
        ...                    head_fraction=0.5, neuron_fraction=0.5)
        >>> small = apply_decoder_plan(gpt, plan)
        >>> small.config.kv_heads_per_layer, small.transformer.h[0].attn.c_attn.weight.shape
        ([2], torch.Size([32, 48]))
    """
    check_decoder(model)
    _check_plan(model, plan)
    names = {id(m): name for name, m in model.named_modules()}
    state = model.state_dict()
    for i, (heads, neurons) in enumerate(zip(plan.heads, plan.neurons)):
        keep: dict[int, dict[str, list[Tensor]]] = {}
        for parts, units in ((attention_parts(model, i), heads), (mlp_parts(model, i), neurons)):
            for p in parts:
                dev = p.module.weight.device
                keep.setdefault(id(p.module), {"out": [], "in": []})[p.side].append(
                    _features(p, units, dev))
        for key, sides in keep.items():
            name = names[key]
            module = model.get_submodule(name)
            w = _oriented(module)
            if sides["out"]:
                w = w[torch.cat(sides["out"])]
            if sides["in"]:
                w = w[:, torch.cat(sides["in"])]
            state[f"{name}.weight"] = w.T if isinstance(module, Conv1D) else w
            if module.bias is not None and sides["out"]:
                state[f"{name}.bias"] = module.bias[torch.cat(sides["out"])]
    _, model_cls = family(model)
    weight = model.get_input_embeddings().weight
    small = model_cls(pruned_decoder_config(model, plan)).to(device=weight.device,
                                                             dtype=weight.dtype)
    small.load_state_dict({k: v.clone() for k, v in state.items()})
    return small.train(model.training)


def prune_decoder(model: PreTrainedModel, criterion: str, sparsity: float,
                  batches: Iterable[Mapping[str, Tensor]] | None = None, gamma: float = 1.0,
                  multiple_of: int = 8) -> PreTrainedModel:
    """Score, allocate and apply in one call (:func:`score_decoder`, :func:`allocate_decoder`,
    :func:`apply_decoder_plan`).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from costream.prune.hf import decoder_parameters, prune_decoder
        >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ...     intermediate_size=64)).eval()
        >>> batches = [{"input_ids": torch.randint(0, 50, (4, 8))}]
        >>> small = prune_decoder(llama, "nirvana", 0.3, batches, gamma=3.0)
        >>> decoder_parameters(small) <= 0.7 * decoder_parameters(llama)
        True
        >>> small.config.model_type
        'pruned_llama'
    """
    scores = score_decoder(model, criterion, batches)
    return apply_decoder_plan(model, allocate_decoder(model, scores, sparsity, gamma,
                                                      multiple_of))

"""From scores to a smaller BERT: global thresholds, the attention/MLP ratio, physical removal.

:func:`allocate` turns head and neuron scores into a :class:`PruningPlan` that removes a
fraction ``sparsity`` of the encoder's parameters (every parameter of ``model.encoder``: the
attention and MLP projections with their biases and the layer norms; embeddings and pooler are
not counted and not pruned):

* heads and neurons are ranked globally, over all layers, each kind on its own (separate global
  thresholds), so layers lose different amounts (adaptive allocation);
* the fraction of heads removed is the fraction of neurons removed divided by ``gamma``
  (NIRVANA's attention/MLP ratio; ``gamma = 1`` prunes both kinds alike, ``gamma ~ 3`` spares
  attention);
* per layer, the kept width is rounded up to a multiple of ``multiple_of`` (the MLP width, and
  the attention width ``heads x head size``) by keeping the best-scored of the structures the
  thresholds would remove; every layer keeps at least one head and ``multiple_of`` neurons;
* the common fraction is searched (bisection) so that the plan removes at least ``sparsity`` of
  the encoder parameters after rounding, as little above as the discrete widths allow.

:func:`apply_plan` builds the smaller model: a :class:`PrunedBertModel` whose config records the
kept widths, holding the kept rows and columns of the original weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import BertModel

from ._model import PrunedBertConfig, PrunedBertModel, check_bert, head_size
from ._scores import Scores

_SEARCH_STEPS = 60


@dataclass
class PruningPlan:
    """Which heads and neurons each layer keeps (sorted indices), and what that removes.

    ``sparsity`` is the fraction of encoder parameters removed; ``head_fraction`` and
    ``neuron_fraction`` the fractions of heads and neurons removed (over all layers).

    Example:
        >>> from costream.prune.hf import PruningPlan
        >>> plan = PruningPlan(heads=[[0, 2]], neurons=[list(range(8))], sparsity=0.4,
        ...                    head_fraction=0.5, neuron_fraction=0.75)
        >>> plan.widths()
        ([2], [8])
    """

    heads: list[list[int]]
    neurons: list[list[int]]
    sparsity: float
    head_fraction: float
    neuron_fraction: float

    def widths(self) -> tuple[list[int], list[int]]:
        """``(heads kept, neurons kept)`` per layer."""
        return [len(h) for h in self.heads], [len(n) for n in self.neurons]

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict."""
        return asdict(self)


def encoder_parameters(model: BertModel) -> int:
    """Parameters of ``model.encoder`` (the part structured pruning shrinks).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from costream.prune.hf import encoder_parameters
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                             num_attention_heads=4, intermediate_size=32))
        >>> encoder_parameters(bert)  # 4 x (16 x 16 + 16) + 2 x 16 x 32 + 32 + 16 + 2 x 2 x 16
        2224
    """
    return sum(p.numel() for p in check_bert(model).encoder.parameters())


def _unit_params(model: BertModel) -> tuple[int, int]:
    """Parameters one head and one neuron own (weights and biases)."""
    hidden, d = model.config.hidden_size, head_size(model.config)
    return 3 * (hidden * d + d) + hidden * d, 2 * hidden + 1


def _ranked_layers(scores: list[Tensor]) -> Tensor:
    """The layer of every structure, lowest score first (ties: earlier layer, lower index)."""
    flat = torch.cat(scores)
    layer = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    return layer[torch.sort(flat, stable=True).indices]


def _lowest_per_layer(ranked: Tensor, k: int, layers: int) -> list[int]:
    """How many of each layer's structures are among the ``k`` lowest scores overall."""
    return torch.bincount(ranked[:k], minlength=layers).tolist()


def _kept(sizes: list[int], removed: list[int], step: int) -> list[int]:
    """Kept counts per layer: at least ``step``, rounded up to a multiple of ``step``."""
    out = []
    for n, r in zip(sizes, removed):
        c = max(n - r, step)
        out.append(min(n, math.ceil(c / step) * step))
    return out


def _check_scores(model: BertModel, scores: Scores) -> None:
    if not isinstance(scores, Scores):
        raise TypeError(f"scores must be a Scores (from costream.prune.hf.score), "
                        f"got {type(scores).__name__}")
    heads = [layer.attention.self.query.out_features // head_size(model.config)
             for layer in model.encoder.layer]
    neurons = [layer.intermediate.dense.out_features for layer in model.encoder.layer]
    got = [len(h) for h in scores.heads], [len(n) for n in scores.neurons]
    if got != (heads, neurons):
        raise ValueError(f"scores do not fit the model: the model has {heads} heads and "
                         f"{neurons} neurons per layer, the scores {got[0]} and {got[1]}")


def allocate(model: BertModel, scores: Scores, sparsity: float, gamma: float = 1.0,
             multiple_of: int = 8) -> PruningPlan:
    """Plan the removal of ``sparsity`` of the encoder parameters (module docstring).

    Args:
        model: the ``BertModel`` the scores belong to.
        scores: from :func:`score`.
        sparsity: fraction of encoder parameters to remove, in ``[0, 1)``.
        gamma: neuron fraction / head fraction removed (``> 0``).
        multiple_of: kept widths are multiples of it (``>= 1``).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from costream.prune.hf import allocate, encoder_parameters, score
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
        ...                             num_attention_heads=4, intermediate_size=64))
        >>> plan = allocate(bert, score(bert, "magnitude"), sparsity=0.3, gamma=3.0)
        >>> widths = plan.widths()
        >>> all(n % 8 == 0 for n in widths[1]) and min(widths[0]) >= 1
        True
        >>> plan.sparsity >= 0.3
        True
    """
    check_bert(model)
    _check_scores(model, scores)
    check_targets(sparsity, gamma, multiple_of)
    d = head_size(model.config)
    per_head, per_neuron = _unit_params(model)
    kh, kn, removed = search_widths(
        scores.heads, scores.neurons, per_head, per_neuron, encoder_parameters(model),
        sparsity, gamma, multiple_of // math.gcd(d, multiple_of), multiple_of,
        what=f"with gamma={gamma} and at least one head and {multiple_of} neurons per layer",
        denominator="the encoder parameters")
    return plan_from_widths(scores, kh, kn, removed / encoder_parameters(model))


def check_targets(sparsity: float, gamma: float, multiple_of: int) -> None:
    """A clear error for a sparsity outside ``[0, 1)``, ``gamma <= 0`` or ``multiple_of < 1``."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    if not isinstance(gamma, (int, float)) or gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}")


def search_widths(head_scores: list[Tensor], neuron_scores: list[Tensor], per_head: int,
                  per_neuron: int, total: int, sparsity: float, gamma: float, head_step: int,
                  neuron_step: int, what: str = "",
                  denominator: str = "the parameters") -> tuple[list[int], list[int], int]:
    """Kept heads and neurons per layer, and parameters removed, for a ``sparsity`` target.

    The common fraction ``u`` is bisected: ``u / gamma`` of the heads (``u gamma`` of the
    neurons if ``gamma < 1``) with the lowest scores over all layers go, rounded per layer up to
    multiples of ``head_step`` / ``neuron_step`` (at least one step kept), until at least
    ``sparsity * total`` parameters are removed (``per_head`` / ``per_neuron`` each).
    """
    n_heads = [len(h) for h in head_scores]
    n_neurons = [len(n) for n in neuron_scores]
    a, b = min(1.0, 1.0 / gamma), min(1.0, float(gamma))  # head / neuron fraction per unit u
    ranked_h, ranked_n = _ranked_layers(head_scores), _ranked_layers(neuron_scores)
    layers = len(n_heads)

    def widths(u: float) -> tuple[list[int], list[int], int]:
        k_h = math.floor(u * a * sum(n_heads) + 1e-9)
        k_n = math.floor(u * b * sum(n_neurons) + 1e-9)
        kh = _kept(n_heads, _lowest_per_layer(ranked_h, k_h, layers), head_step)
        kn = _kept(n_neurons, _lowest_per_layer(ranked_n, k_n, layers), neuron_step)
        removed = (per_head * (sum(n_heads) - sum(kh))
                   + per_neuron * (sum(n_neurons) - sum(kn)))
        return kh, kn, removed

    target = sparsity * total
    removed = widths(1.0)[2]
    if removed < target:
        raise ValueError(f"sparsity {sparsity} is out of reach: {what} at most "
                         f"{removed / total:.3f} of {denominator} can go")
    lo, hi = 0.0, 1.0
    if widths(0.0)[2] >= target:
        hi = 0.0
    for _ in range(_SEARCH_STEPS):
        if hi - lo < 1e-12:
            break
        mid = (lo + hi) / 2
        if widths(mid)[2] >= target:
            hi = mid
        else:
            lo = mid
    return widths(hi)


def plan_from_widths(scores: Scores, kh: list[int], kn: list[int],
                     sparsity: float) -> PruningPlan:
    """The plan keeping the ``kh[i]`` / ``kn[i]`` best-scored heads / neurons of layer ``i``."""

    def top(s: Tensor, c: int) -> list[int]:
        return sorted(torch.sort(s, descending=True, stable=True).indices[:c].tolist())

    return PruningPlan(
        heads=[top(s, c) for s, c in zip(scores.heads, kh)],
        neurons=[top(s, c) for s, c in zip(scores.neurons, kn)],
        sparsity=sparsity,
        head_fraction=1.0 - sum(kh) / scores.num_heads,
        neuron_fraction=1.0 - sum(kn) / scores.num_neurons,
    )


def _check_plan(model: BertModel, plan: PruningPlan) -> None:
    d = head_size(model.config)
    layers = model.encoder.layer
    if len(plan.heads) != len(layers) or len(plan.neurons) != len(layers):
        raise ValueError(f"the plan has {len(plan.heads)} / {len(plan.neurons)} layers, the model "
                         f"{len(layers)}")
    for i, (layer, h, n) in enumerate(zip(layers, plan.heads, plan.neurons)):
        n_h = layer.attention.self.query.out_features // d
        n_n = layer.intermediate.dense.out_features
        if not h or len(set(h)) != len(h) or min(h) < 0 or max(h) >= n_h:
            raise ValueError(f"layer {i}: kept heads must be distinct indices in [0, {n_h}), at "
                             f"least one; got {h}")
        if not n or len(set(n)) != len(n) or min(n) < 0 or max(n) >= n_n:
            raise ValueError(f"layer {i}: kept neurons must be distinct indices in [0, {n_n}), "
                             f"at least one; got {n}")


def pruned_config(model: BertModel, plan: PruningPlan) -> PrunedBertConfig:
    """The :class:`PrunedBertConfig` of ``model`` pruned by ``plan``."""
    heads, neurons = plan.widths()
    return derived_config(model.config, PrunedBertConfig, heads_per_layer=heads,
                          intermediate_per_layer=neurons,
                          add_pooling_layer=model.pooler is not None)


def derived_config(config: Any, cls: type, **fields: Any) -> Any:
    """A ``cls`` config with the fields of ``config`` (but its model type) and ``fields``."""
    data = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    data.update(fields)
    out = cls.from_dict(data)
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None:
        out._attn_implementation = impl
    return out


@torch.no_grad()
def apply_plan(model: BertModel, plan: PruningPlan) -> PrunedBertModel:
    """A new :class:`PrunedBertModel` holding the heads and neurons ``plan`` keeps.

    ``model`` is left unchanged. Removing a head drops its rows of the query, key and value
    projections (weights and biases) and its columns of the attention output projection;
    removing a neuron drops its row of ``intermediate.dense`` and its column of
    ``output.dense``. The result computes exactly what ``model`` computes with the removed heads
    and neurons masked to zero.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from costream.prune.hf import PruningPlan, apply_plan
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                             num_attention_heads=4, intermediate_size=32))
        >>> plan = PruningPlan(heads=[[1, 3]], neurons=[list(range(8))], sparsity=0.0,
        ...                    head_fraction=0.5, neuron_fraction=0.75)
        >>> small = apply_plan(bert, plan)
        >>> small.config.heads_per_layer, small.encoder.layer[0].output.dense.in_features
        ([2], 8)
    """
    check_bert(model)
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"plan must be a PruningPlan, got {type(plan).__name__}")
    _check_plan(model, plan)
    d = head_size(model.config)
    state = model.state_dict()
    for i, (heads, neurons) in enumerate(zip(plan.heads, plan.neurons)):
        dev = state[f"encoder.layer.{i}.attention.self.query.weight"].device
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads]).to(dev)
        cols = torch.as_tensor(neurons, dtype=torch.long, device=dev)
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                key = f"{p}attention.self.{name}.{kind}"
                state[key] = state[key][rows]
        state[f"{p}attention.output.dense.weight"] = state[f"{p}attention.output.dense.weight"][
            :, rows]
        state[f"{p}intermediate.dense.weight"] = state[f"{p}intermediate.dense.weight"][cols]
        state[f"{p}intermediate.dense.bias"] = state[f"{p}intermediate.dense.bias"][cols]
        state[f"{p}output.dense.weight"] = state[f"{p}output.dense.weight"][:, cols]
    weight = model.get_input_embeddings().weight
    small = PrunedBertModel(pruned_config(model, plan)).to(device=weight.device,
                                                           dtype=weight.dtype)
    small.load_state_dict({k: v.clone() for k, v in state.items()})
    return small.train(model.training)


def prune_heads_and_neurons(model: BertModel, scores: Scores, sparsity: float,
                            gamma: float = 1.0, multiple_of: int = 8) -> PrunedBertModel:
    """``apply_plan(model, allocate(model, scores, sparsity, gamma, multiple_of))``.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from costream.prune.hf import encoder_parameters, prune_heads_and_neurons, score
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
        ...                             num_attention_heads=4, intermediate_size=64)).eval()
        >>> batches = [{"input_ids": torch.randint(0, 50, (4, 6))}]
        >>> small = prune_heads_and_neurons(bert, score(bert, "nirvana", batches), 0.3, gamma=3)
        >>> encoder_parameters(small) <= 0.7 * encoder_parameters(bert)
        True
        >>> small.config.model_type
        'pruned_bert'
    """
    return apply_plan(model, allocate(model, scores, sparsity, gamma, multiple_of))

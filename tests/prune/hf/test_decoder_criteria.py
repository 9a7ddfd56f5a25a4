"""Decoder criteria, next-token KL, perplexity, calibration selection and LoRA healing."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from costream.prune.hf import (
    allocate_decoder,
    apply_decoder_plan,
    heal_decoder,
    next_token_kl,
    perplexity,
    prune_decoder,
    score_decoder,
    select_decoder_calibration,
)

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 48


@pytest.fixture(scope="module")
def llama() -> Any:
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64)).double().eval()


def _text(n: int = 4, t: int = 12) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.randint(0, VOCAB, (n, t))}]


@pytest.mark.parametrize("criterion", ["taylor", "nirvana"])
def test_gradient_scores_match_their_definitions(llama: Any, criterion: str) -> None:
    batch = _text()[0]
    scores = score_decoder(llama, criterion, [batch])
    attn, mlp = llama.model.layers[1].self_attn, llama.model.layers[1].mlp
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
               mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    model = copy.deepcopy(llama)  # the objective by hand, on a copy
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    copies = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
              mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    if criterion == "taylor":
        objective = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    else:
        objective = model(input_ids=batch["input_ids"]).logits.max(-1).values.mean()
    grads = torch.autograd.grad(objective, copies)
    s = [(w.detach() * g).abs() for w, g in zip(weights, grads)]
    # group 1 of layer 1: query heads 2, 3 (rows 16..31), key/value head 1 (rows 8..15)
    group1 = s[0][16:32].sum() + s[1][8:16].sum() + s[2][8:16].sum() + s[3][:, 16:32].sum()
    neuron5 = s[4][5].sum() + s[5][5].sum() + s[6][:, 5].sum()
    torch.testing.assert_close(scores.heads[1][1], group1, rtol=1e-12, atol=0)
    torch.testing.assert_close(scores.neurons[1][5], neuron5, rtol=1e-12, atol=0)
    assert all(p.grad is None and p.requires_grad for p in llama.parameters())


def test_perplexity_and_kl_against_torch(llama: Any) -> None:
    batch = _text(3, 10)[0]
    ids = batch["input_ids"]
    with torch.no_grad():  # transformers' own loss runs in float32: the reference is by hand
        logits = llama(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                             ids[:, 1:].reshape(-1))
    assert perplexity(llama, [batch]) == pytest.approx(math.exp(float(loss)), rel=1e-12)
    small = prune_decoder(llama, "magnitude", 0.4)
    with torch.no_grad():
        lp = torch.log_softmax(llama(input_ids=batch["input_ids"]).logits, -1)
        lq = torch.log_softmax(small(input_ids=batch["input_ids"]).logits, -1)
    want = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="sum") / 30
    assert next_token_kl(llama, small, [batch]) == pytest.approx(float(want), rel=1e-10)
    assert next_token_kl(llama, llama, [batch]) == 0.0


def test_calibration_selection_keeps_the_lowest_kl(llama: Any) -> None:
    candidates, reference = [_text(), _text(), _text()], _text()
    choice = select_decoder_calibration(llama, candidates, reference, 0.4, gamma=2.0)
    assert choice.index == min(range(3), key=choice.kl.__getitem__)
    plan = allocate_decoder(llama, score_decoder(llama, "nirvana", candidates[choice.index][0:1]),
                            0.4, gamma=2.0)
    assert plan.heads == choice.plan.heads and plan.neurons == choice.plan.neurons
    again = apply_decoder_plan(llama, plan)
    assert next_token_kl(llama, again, reference) == pytest.approx(choice.kl[choice.index],
                                                                   rel=1e-12)
    with pytest.raises(ValueError, match="too short"):
        select_decoder_calibration(llama, [_text(1, 4)], reference, 0.4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_healing_brings_the_pruned_model_closer(llama: Any, family: str) -> None:
    if family == "gpt2":
        torch.manual_seed(2)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=32)).double().eval()
    else:
        model = llama
    text = _text(8, 12)
    small = prune_decoder(model, "magnitude", 0.5)
    shapes = {k: v.shape for k, v in small.state_dict().items()}
    before = next_token_kl(model, small, text)
    healed = heal_decoder(small, model, text, rank=4, epochs=15, lr=1e-2)
    assert healed is small and type(healed) is type(small)
    assert {k: v.shape for k, v in healed.state_dict().items()} == shapes
    assert not any(parametrize.is_parametrized(m) for m in healed.modules())
    assert all(p.requires_grad for p in healed.parameters())
    assert next_token_kl(model, healed, text) < 0.8 * before


def test_fluctuation_scores_match_flap(llama: Any) -> None:
    batch = _text(4, 10)[0]
    inputs: dict[str, torch.Tensor] = {}
    layer = llama.model.layers[0]
    hooks = [m.register_forward_hook(lambda mod, args, out, key=key: inputs.__setitem__(
        key, args[0].reshape(-1, args[0].shape[-1]))) for key, m in
        (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj))]
    with torch.no_grad():
        llama(input_ids=batch["input_ids"])
    for h in hooks:
        h.remove()
    scores = score_decoder(llama, "fluctuation", [batch])
    o_cols = inputs["o"].var(0, unbiased=False) * layer.self_attn.o_proj.weight.square().sum(0)
    down = inputs["down"].var(0, unbiased=False) * layer.mlp.down_proj.weight.square().sum(0)
    # group 0 = query heads 0 and 1 = o_proj input channels 0..15
    torch.testing.assert_close(scores.heads[0][0], o_cols[:16].sum().detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(scores.neurons[0], down.detach(), rtol=1e-9, atol=0)

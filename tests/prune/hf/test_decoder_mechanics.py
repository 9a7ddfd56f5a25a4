"""Decoder pruning mechanics on tiny random Llama (GQA), Qwen2 and GPT-2 models.

The reference for a pruned model is the original model with the removed heads and neurons
masked: the output-projection columns reading removed query heads and the down-projection
columns of removed neurons zeroed by hand here (plain indexing, not the code under test).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from costream.prune import count_macs
from costream.prune.hf import (
    PruningPlan,
    allocate_decoder,
    apply_decoder_plan,
    decoder_parameters,
    score_decoder,
)

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 64


def _llama() -> Any:  # 8 query heads of size 8, 4 key/value heads: groups of 2 query heads
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=4,
                                        intermediate_size=96, eos_token_id=None,
                                        bos_token_id=None, pad_token_id=None))


def _mistral() -> Any:  # 4 query heads of size 8, 2 key/value heads
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=48,
                                            sliding_window=None, eos_token_id=None,
                                            bos_token_id=None, pad_token_id=None))


def _qwen2() -> Any:
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, eos_token_id=None,
                                        bos_token_id=None, pad_token_id=None))


def _gpt2() -> Any:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=64, bos_token_id=None, eos_token_id=None))


# family -> (builder, query heads per key/value group, head size, hand-written plan)
FAMILIES = {
    "llama": (_llama, 2, 8, PruningPlan([[1, 3], [2]], [list(range(0, 96, 3)), [5, 9, 70]],
                                         0.0, 0.0, 0.0)),
    "mistral": (_mistral, 2, 8, PruningPlan([[0], [1]], [list(range(16)), [47]],
                                             0.0, 0.0, 0.0)),
    "qwen2": (_qwen2, 2, 8, PruningPlan([[1], [0, 1]], [list(range(8, 24)), [0, 63]],
                                         0.0, 0.0, 0.0)),
    "gpt2": (_gpt2, 1, 8, PruningPlan([[0, 2, 3], [1]], [list(range(40)), [127, 3]],
                                       0.0, 0.0, 0.0)),
}


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    torch.manual_seed(0)
    return {name: build().double().eval() for name, (build, *_rest) in FAMILIES.items()}


def _masked(model: Any, name: str, plan: PruningPlan) -> Any:
    """The original with removed query heads' output columns and removed neurons zeroed."""
    _, g, d, _ = FAMILIES[name]
    masked = copy.deepcopy(model)
    layers = masked.transformer.h if name == "gpt2" else masked.model.layers
    with torch.no_grad():
        for layer, groups, neurons in zip(layers, plan.heads, plan.neurons):
            n_q = (layer.attn.c_proj.weight.shape[0] if name == "gpt2"
                   else layer.self_attn.o_proj.in_features) // d
            gone_heads = [h for h in range(n_q) if h // g not in groups]
            cols = [h * d + k for h in gone_heads for k in range(d)]
            if name == "gpt2":  # Conv1D weights are (in, out)
                n_mlp = layer.mlp.c_proj.weight.shape[0]
                layer.attn.c_proj.weight[cols, :] = 0
                layer.mlp.c_proj.weight[[j for j in range(n_mlp) if j not in neurons], :] = 0
            else:
                n_mlp = layer.mlp.down_proj.in_features
                layer.self_attn.o_proj.weight[:, cols] = 0
                layer.mlp.down_proj.weight[:, [j for j in range(n_mlp) if j not in neurons]] = 0
    return masked


def _plans(model: Any, name: str) -> list[PruningPlan]:
    batches = [{"input_ids": torch.randint(0, VOCAB, (4, 12))}]
    allocated = allocate_decoder(model, score_decoder(model, "nirvana", batches), 0.4,
                                 gamma=2.0)
    return [FAMILIES[name][3], allocated]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruned_equals_masked_original(models: dict[str, Any], name: str) -> None:
    model = models[name]
    ids = torch.randint(0, VOCAB, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in one row
    for plan in _plans(model, name):
        small, masked = apply_decoder_plan(model, plan), _masked(model, name, plan)
        assert small.config.kv_heads_per_layer == [len(h) for h in plan.heads]
        with torch.no_grad():
            got = small(input_ids=ids, attention_mask=mask).logits
            want = masked(input_ids=ids, attention_mask=mask).logits
            full = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        assert (got - full).abs().max() > 1e-4  # the pruning changed something


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_matches_masked_original(models: dict[str, Any], name: str) -> None:
    model = models[name]
    plan = FAMILIES[name][3]
    small, masked = apply_decoder_plan(model, plan), _masked(model, name, plan)
    prompt = torch.randint(0, VOCAB, (2, 6))
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    got = small.generate(prompt, **kwargs)
    assert got.shape == (2, 16)
    assert torch.equal(got, masked.generate(prompt, **kwargs))
    assert torch.equal(got, small.generate(prompt, use_cache=False, **kwargs))


def _unit_costs(name: str, config: Any) -> tuple[int, int]:
    """Parameters of one key/value group and of one neuron, from the architecture."""
    e = config.hidden_size
    if name == "gpt2":
        d = e // config.n_head
        return 3 * (d * e + d) + d * e, 2 * e + 1
    g, d = config.num_attention_heads // config.num_key_value_heads, e // config.num_attention_heads
    bias = g * d + 2 * d if name == "qwen2" else 0  # Qwen2: q, k, v biases
    return 2 * g * d * e + 2 * d * e + bias, 3 * e


def _macs(name: str, config: Any, groups: list[int], neurons: list[int], t: int) -> int:
    """MACs of one sequence of ``t`` tokens: projections, attention products, LM head."""
    e = config.hidden_size
    if name == "gpt2":
        g, d = 1, e // config.n_head
    else:
        g, d = config.num_attention_heads // config.num_key_value_heads, \
            e // config.num_attention_heads
    per_neuron = 2 * e if name == "gpt2" else 3 * e
    total = t * e * VOCAB
    for k, n in zip(groups, neurons):
        q, kv = k * g * d, k * d
        total += t * (e * (q + 2 * kv) + q * e) + 2 * t * t * q + t * n * per_neuron
    return total


@pytest.mark.parametrize("name", list(FAMILIES))
def test_parameter_and_mac_counts_follow_kept_widths(models: dict[str, Any], name: str) -> None:
    model = copy.deepcopy(models[name])
    model.config._attn_implementation = "eager"  # FlopCounterMode does not count CPU SDPA
    plan = FAMILIES[name][3]
    small = apply_decoder_plan(model, plan)
    assert small.config._attn_implementation == "eager"
    per_group, per_neuron = _unit_costs(name, model.config)
    n_groups = model.config.n_head if name == "gpt2" else model.config.num_key_value_heads
    n_mlp = 4 * model.config.n_embd if name == "gpt2" else model.config.intermediate_size
    removed = (sum(n_groups - len(h) for h in plan.heads) * per_group
               + sum(n_mlp - len(n) for n in plan.neurons) * per_neuron)
    count = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) == count - removed
    assert decoder_parameters(model) - decoder_parameters(small) == removed
    t = 11
    ids = torch.randint(0, VOCAB, (1, t))
    assert count_macs(model, ids) == _macs(name, model.config, [n_groups] * 2, [n_mlp] * 2, t)
    assert count_macs(small, ids) == _macs(name, model.config, [len(h) for h in plan.heads],
                                           [len(n) for n in plan.neurons], t)


_RELOAD = """
import sys, torch
from costream.prune.hf import load_decoder
torch.set_num_threads(1)  # as this test's process: same kernels, same summation order
ids = torch.load(sys.argv[1])
for path in sys.argv[3:]:
    model = load_decoder(path)
    torch.save(model(input_ids=ids).logits, path + "/logits.pt")
print(type(model).__name__)
"""


def test_reload_in_new_process_is_bit_identical(models: dict[str, Any], tmp_path: Any) -> None:
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    paths, want = [], {}
    for name in FAMILIES:
        small = apply_decoder_plan(models[name], FAMILIES[name][3])
        path = tmp_path / name
        small.save_pretrained(path)
        assert (path / "model.safetensors").is_file()
        with torch.no_grad():
            want[name] = small(input_ids=ids).logits
        paths.append(str(path))
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "ids.pt"), "-",
                           *paths], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in FAMILIES:
        got = torch.load(tmp_path / name / "logits.pt")
        assert got.dtype == torch.float64
        assert torch.equal(got, want[name]), name


def test_bad_input_gets_a_clear_error(models: dict[str, Any]) -> None:
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match="unsupported model family BertModel"):
        score_decoder(bert, "magnitude")
    llama = models["llama"]
    with pytest.raises(ValueError, match="whole layer's attention"):
        allocate_decoder(llama, score_decoder(llama, "magnitude"), 0.95)
    plan = PruningPlan([[], [0]], [[0], [0]], 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="removes the whole attention of the layer"):
        apply_decoder_plan(llama, plan)
    with pytest.raises(ValueError, match="calibration set is too short"):
        score_decoder(llama, "nirvana", [{"input_ids": torch.randint(0, VOCAB, (2, 5))}])
    with pytest.raises(ValueError, match="calibration set is too short"):
        score_decoder(llama, "taylor", [{"input_ids": torch.randint(0, VOCAB, (40, 1))}])
    with pytest.raises(ValueError, match="criterion"):
        score_decoder(llama, "fluctuation")


def test_pruning_a_pruned_model_again(models: dict[str, Any]) -> None:
    model = models["llama"]
    first = PruningPlan([[0, 1, 3], [0, 2]], [list(range(64)), list(range(8, 96))], 0, 0, 0)
    again = PruningPlan([[0, 2], [1]], [list(range(0, 64, 2)), list(range(40))], 0, 0, 0)
    twice = apply_decoder_plan(apply_decoder_plan(model, first), again)
    # the second plan indexes what the first kept: groups [0, 3] and [2] of the original
    once = PruningPlan([[0, 3], [2]], [list(range(0, 64, 2)), list(range(8, 48))], 0, 0, 0)
    assert twice.config.kv_heads_per_layer == [2, 1]
    assert twice.config.intermediate_per_layer == [32, 40]
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(twice(input_ids=ids).logits,
                                   _masked(model, "llama", once)(input_ids=ids).logits,
                                   rtol=0, atol=1e-10)

"""Decoder LLMs whose layers have their own widths: Llama, Mistral, Qwen2 and GPT-2.

``transformers`` builds every decoder layer at the widths of one config, and its
``per_layer_config`` mechanism is not read by these families' modeling code (5.x), so a
structurally pruned decoder needs a config that records per-layer widths and a model class that
builds its layers at them. For each family a config subclass adds two fields,

* ``kv_heads_per_layer``: key/value heads kept in each layer (with their query heads: a layer
  keeps ``kv_heads_per_layer[i] * num_attention_heads / num_key_value_heads`` query heads; GPT-2
  has one key/value head per query head);
* ``intermediate_per_layer``: MLP neurons kept in each layer,

and a model subclass rebuilds the attention and MLP projections at those widths after the
parent constructor. The head size, the number of query heads per key/value head and everything
else stay those of the source model, so the parent's forward pass, KV cache and ``generate``
run unchanged. Importing this module registers the classes with ``AutoConfig`` and
``AutoModelForCausalLM`` under the model types ``pruned_llama``, ``pruned_mistral``,
``pruned_qwen2`` and ``pruned_gpt2``; ``save_pretrained`` writes safetensors, and
:func:`load_decoder` reloads a directory with nothing but ``transformers`` and costream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Part:
    """Features of one projection that the pruning units of a layer own.

    Unit ``u`` owns features ``offset + u * width + (0..width-1)`` of ``module``: its output
    features (rows of an ``nn.Linear`` weight, with the bias entries) when ``side == "out"``,
    its input features (columns) when ``side == "in"``. ``Conv1D`` (GPT-2) stores the
    transposed weight ``(in, out)``.
    """

    module: nn.Module
    side: str
    width: int
    offset: int = 0


def head_dim(config: Any) -> int:
    """Size of one attention head."""
    if isinstance(config, GPT2Config):
        return config.n_embd // config.n_head
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def group_size(config: Any) -> int:
    """Query heads per key/value head (1 for GPT-2)."""
    if isinstance(config, GPT2Config):
        return 1
    return config.num_attention_heads // config.num_key_value_heads


def full_widths(config: Any) -> tuple[int, int]:
    """``(key/value heads, MLP neurons)`` of an unpruned layer."""
    if isinstance(config, GPT2Config):
        return config.n_head, config.n_inner or 4 * config.n_embd
    return config.num_key_value_heads, config.intermediate_size


def layer_widths(config: Any) -> tuple[list[int], list[int]]:
    """``(key/value heads, MLP neurons)`` per layer recorded by ``config`` (uniform if none)."""
    n = config.num_hidden_layers
    kv, inter = full_widths(config)
    heads = [int(h) for h in (getattr(config, "kv_heads_per_layer", None) or [kv] * n)]
    neurons = [int(i) for i in (getattr(config, "intermediate_per_layer", None) or [inter] * n)]
    if len(heads) != n or len(neurons) != n:
        raise ValueError(f"kv_heads_per_layer and intermediate_per_layer need {n} entries (one "
                         f"per layer), got {len(heads)} and {len(neurons)}")
    if min(heads) < 1 or max(heads) > kv:
        raise ValueError(f"kv_heads_per_layer entries must lie in [1, {kv}] (a layer without "
                         f"attention is not supported), got {heads}")
    if min(neurons) < 1:
        raise ValueError(f"intermediate_per_layer entries must be >= 1, got {neurons}")
    return heads, neurons


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks of a supported causal LM."""
    return model.transformer.h if isinstance(model, GPT2LMHeadModel) else model.model.layers


def attention_parts(model: PreTrainedModel, i: int) -> list[Part]:
    """What each key/value group of layer ``i`` owns (its query, key, value features and the
    output projection's input features reading its query heads)."""
    cfg, layer = model.config, decoder_layers(model)[i]
    d, g = head_dim(cfg), group_size(cfg)
    if isinstance(model, GPT2LMHeadModel):
        attn = layer.attn
        width = attn.c_proj.weight.shape[0]
        return [Part(attn.c_attn, "out", d, 0), Part(attn.c_attn, "out", d, width),
                Part(attn.c_attn, "out", d, 2 * width), Part(attn.c_proj, "in", d)]
    attn = layer.self_attn
    return [Part(attn.q_proj, "out", g * d), Part(attn.k_proj, "out", d),
            Part(attn.v_proj, "out", d), Part(attn.o_proj, "in", g * d)]


def mlp_parts(model: PreTrainedModel, i: int) -> list[Part]:
    """What each MLP neuron of layer ``i`` owns (SwiGLU: gate and up rows, down column)."""
    mlp = decoder_layers(model)[i].mlp
    if isinstance(model, GPT2LMHeadModel):
        return [Part(mlp.c_fc, "out", 1), Part(mlp.c_proj, "in", 1)]
    return [Part(mlp.gate_proj, "out", 1), Part(mlp.up_proj, "out", 1),
            Part(mlp.down_proj, "in", 1)]


def _linear(model: PreTrainedModel, old: nn.Module, n_in: int, n_out: int) -> nn.Module:
    if isinstance(old, Conv1D):
        new: nn.Module = Conv1D(n_out, n_in)
    else:
        new = nn.Linear(n_in, n_out, bias=old.bias is not None)
    model._init_weights(new)
    return new.to(device=old.weight.device, dtype=old.weight.dtype)


def _rebuild(model: PreTrainedModel) -> None:
    """Rebuild the projections of every layer at the widths of ``model.config``."""
    cfg = model.config
    heads, neurons = layer_widths(cfg)
    d, g, hidden = head_dim(cfg), group_size(cfg), cfg.hidden_size
    gpt2 = isinstance(model, GPT2LMHeadModel)
    for layer, h, n in zip(decoder_layers(model), heads, neurons, strict=True):
        width = h * g * d
        if gpt2:
            attn, mlp = layer.attn, layer.mlp
            if attn.c_proj.weight.shape[0] != width:
                attn.c_attn = _linear(model, attn.c_attn, hidden, 3 * width)
                attn.c_proj = _linear(model, attn.c_proj, width, hidden)
                attn.split_size, attn.num_heads = width, h
            if mlp.c_fc.weight.shape[1] != n:
                mlp.c_fc = _linear(model, mlp.c_fc, hidden, n)
                mlp.c_proj = _linear(model, mlp.c_proj, n, hidden)
            continue
        attn, mlp = layer.self_attn, layer.mlp
        if attn.q_proj.out_features != width:
            attn.q_proj = _linear(model, attn.q_proj, hidden, width)
            attn.k_proj = _linear(model, attn.k_proj, hidden, h * d)
            attn.v_proj = _linear(model, attn.v_proj, hidden, h * d)
            attn.o_proj = _linear(model, attn.o_proj, width, hidden)
        if mlp.up_proj.out_features != n:
            mlp.gate_proj = _linear(model, mlp.gate_proj, hidden, n)
            mlp.up_proj = _linear(model, mlp.up_proj, hidden, n)
            mlp.down_proj = _linear(model, mlp.down_proj, n, hidden)
            mlp.intermediate_size = n


class _PerLayerWidths:
    """Mixin: build the parent causal LM, then its layers at the config's per-layer widths."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        _rebuild(self)


class PrunedLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus ``kv_heads_per_layer`` and ``intermediate_per_layer``.

    Example:
        >>> from costream.prune.hf import PrunedLlamaConfig
        >>> cfg = PrunedLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                         num_key_value_heads=2, kv_heads_per_layer=[1, 2])
        >>> cfg.model_type, cfg.kv_heads_per_layer
        ('pruned_llama', [1, 2])
    """

    model_type = "pruned_llama"


class PrunedMistralConfig(MistralConfig):
    """``MistralConfig`` plus ``kv_heads_per_layer`` and ``intermediate_per_layer``.

    Example:
        >>> from costream.prune.hf import PrunedMistralConfig
        >>> PrunedMistralConfig(num_hidden_layers=1, intermediate_per_layer=[64]).model_type
        'pruned_mistral'
    """

    model_type = "pruned_mistral"


class PrunedQwen2Config(Qwen2Config):
    """``Qwen2Config`` plus ``kv_heads_per_layer`` and ``intermediate_per_layer``.

    Example:
        >>> from costream.prune.hf import PrunedQwen2Config
        >>> PrunedQwen2Config(num_hidden_layers=1, intermediate_per_layer=[64]).model_type
        'pruned_qwen2'
    """

    model_type = "pruned_qwen2"


class PrunedGPT2Config(GPT2Config):
    """``GPT2Config`` plus ``kv_heads_per_layer`` (= heads) and ``intermediate_per_layer``.

    Example:
        >>> from costream.prune.hf import PrunedGPT2Config
        >>> PrunedGPT2Config(n_layer=1, kv_heads_per_layer=[3]).model_type
        'pruned_gpt2'
    """

    model_type = "pruned_gpt2"


class PrunedLlamaForCausalLM(_PerLayerWidths, LlamaForCausalLM):
    """``LlamaForCausalLM`` whose layers have the widths of a :class:`PrunedLlamaConfig`.

    Example:
        >>> import torch
        >>> from costream.prune.hf import PrunedLlamaConfig, PrunedLlamaForCausalLM
        >>> cfg = PrunedLlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
        ...                         num_attention_heads=4, num_key_value_heads=2,
        ...                         intermediate_size=48, kv_heads_per_layer=[1, 2],
        ...                         intermediate_per_layer=[16, 48])
        >>> model = PrunedLlamaForCausalLM(cfg).eval()
        >>> model.model.layers[0].self_attn.q_proj.out_features  # 1 KV group: 2 heads of 8
        16
        >>> model(torch.randint(0, 64, (1, 5))).logits.shape
        torch.Size([1, 5, 64])
    """

    config_class = PrunedLlamaConfig


class PrunedMistralForCausalLM(_PerLayerWidths, MistralForCausalLM):
    """``MistralForCausalLM`` at the per-layer widths of a :class:`PrunedMistralConfig`.

    Example:
        >>> from costream.prune.hf import PrunedMistralConfig, PrunedMistralForCausalLM
        >>> cfg = PrunedMistralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        ...     kv_heads_per_layer=[1], intermediate_per_layer=[16])
        >>> PrunedMistralForCausalLM(cfg).model.layers[0].mlp.down_proj.in_features
        16
    """

    config_class = PrunedMistralConfig


class PrunedQwen2ForCausalLM(_PerLayerWidths, Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` at the per-layer widths of a :class:`PrunedQwen2Config`.

    Example:
        >>> from costream.prune.hf import PrunedQwen2Config, PrunedQwen2ForCausalLM
        >>> cfg = PrunedQwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        ...     kv_heads_per_layer=[1], intermediate_per_layer=[16])
        >>> PrunedQwen2ForCausalLM(cfg).model.layers[0].self_attn.k_proj.out_features
        8
    """

    config_class = PrunedQwen2Config


class PrunedGPT2LMHeadModel(_PerLayerWidths, GPT2LMHeadModel):
    """``GPT2LMHeadModel`` at the per-layer widths of a :class:`PrunedGPT2Config`.

    Example:
        >>> from costream.prune.hf import PrunedGPT2Config, PrunedGPT2LMHeadModel
        >>> cfg = PrunedGPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
        ...                        kv_heads_per_layer=[2], intermediate_per_layer=[40])
        >>> PrunedGPT2LMHeadModel(cfg).transformer.h[0].attn.c_attn.weight.shape
        torch.Size([32, 48])
    """

    config_class = PrunedGPT2Config


# source class -> (pruned config class, pruned model class); subclasses come first
FAMILIES: dict[type, tuple[type, type]] = {
    PrunedLlamaForCausalLM: (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    PrunedMistralForCausalLM: (PrunedMistralConfig, PrunedMistralForCausalLM),
    PrunedQwen2ForCausalLM: (PrunedQwen2Config, PrunedQwen2ForCausalLM),
    PrunedGPT2LMHeadModel: (PrunedGPT2Config, PrunedGPT2LMHeadModel),
    LlamaForCausalLM: (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    MistralForCausalLM: (PrunedMistralConfig, PrunedMistralForCausalLM),
    Qwen2ForCausalLM: (PrunedQwen2Config, PrunedQwen2ForCausalLM),
    GPT2LMHeadModel: (PrunedGPT2Config, PrunedGPT2LMHeadModel),
}
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")

for _config_cls, _model_cls in set(FAMILIES.values()):
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)


def family(model: Any) -> tuple[type, type]:
    """``(pruned config class, pruned model class)`` of ``model``; a clear error if the family
    is not supported."""
    if type(model) in FAMILIES:
        return FAMILIES[type(model)]
    for cls, pair in FAMILIES.items():
        if isinstance(model, cls):
            return pair
    name = type(model).__name__
    raise TypeError(f"unsupported model family {name}: decoder pruning supports "
                    f"{', '.join(SUPPORTED)} (causal LMs with their heads)")


def check_decoder(model: Any) -> PreTrainedModel:
    """``model`` if it is a supported causal LM (:data:`SUPPORTED`); a clear error otherwise."""
    family(model)
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError("decoders with cross-attention are not supported")
    return model


def load_decoder(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """A causal LM saved in ``path`` (pruned by costream or not), offline, in eval mode.

    Example:
        >>> import tempfile, torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from costream.prune.hf import load_decoder
        >>> gpt = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
        >>> with tempfile.TemporaryDirectory() as path:
        ...     gpt.save_pretrained(path)
        ...     type(load_decoder(path)).__name__
        'GPT2LMHeadModel'
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a saved Hugging Face model")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    return check_decoder(model).eval()

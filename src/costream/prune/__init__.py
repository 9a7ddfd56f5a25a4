"""Structured pruning for costream networks, on Torch-Pruning's dependency graph.

Prune coupled channels of ``torch.nn`` and continual networks (their stream state follows the new
widths), score them with magnitude, Taylor, Fisher or random criteria, follow one-shot, linear or
cubic schedules, and account for what a derived task stores and executes. Adapters (SPLoRA,
SPPaRA, SPLoPA) live in :mod:`costream.prune.adapters`.

Needs the ``prune`` extra (``torch-pruning``, ``safetensors``); ``import costream`` does not
import this package.

Example:
    >>> import torch, costream as cs
    >>> from costream.prune import prune
    >>> net = cs.Sequential(cs.Conv1d(4, 16, 3, padding=1), torch.nn.ReLU(), cs.Conv1d(16, 2, 3))
    >>> _ = prune(net, torch.randn(1, 4, 12), "l2", density=0.5)
    >>> net[0].out_channels
    8
    >>> x = torch.randn(1, 4, 12)
    >>> torch.allclose(net.forward_steps(x, pad_end=True), net(x), atol=1e-6)
    True
"""

from costream._lazy import lazy_exports

_EXPORTS = {
    "CRITERIA": "_criteria", "Criterion": "_criteria", "Fisher": "_criteria",
    "Magnitude": "_criteria", "Pruner": "_pruner", "RandomImportance": "_criteria",
    "Schedule": "_schedules", "StepReport": "_pruner", "TaskStorage": "_accounting",
    "Taylor": "_criteria", "apply_masks": "_masks", "count_macs": "_accounting",
    "cubic_sparsity": "_schedules", "get_criterion": "_criteria", "kept_masks": "_masks",
    "layer_macs": "_accounting", "prune": "_pruner", "step_macs": "_accounting",
    "task_storage": "_accounting",
}

__all__ = [
    "Criterion",
    "Fisher",
    "Magnitude",
    "Pruner",
    "RandomImportance",
    "Schedule",
    "StepReport",
    "TaskStorage",
    "Taylor",
    "apply_masks",
    "count_macs",
    "cubic_sparsity",
    "get_criterion",
    "kept_masks",
    "layer_macs",
    "prune",
    "step_macs",
    "task_storage",
]


# Names load on first use, so the command line can import ``costream.prune._cli`` without
# the optional dependencies.
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)

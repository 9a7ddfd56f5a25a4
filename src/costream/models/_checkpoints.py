"""Load published checkpoints onto the zoo models: a pure renaming of state-dict keys.

Supported layouts (REFERENCE facts; Co3D, arXiv 2106.00050, reuses these weights unchanged):

* ``"pytorchvideo"``: PyTorchVideo ``.pyth`` files (X3D, Slow, I3D): ``{"model_state": ...}``
  with keys ``blocks.0.*`` (stem), ``blocks.N.res_blocks.i.*`` (stages), ``blocks.5.*`` or
  ``blocks.6.*`` (head; I3D has its temporal pool at ``blocks.2``).
* ``"pyslowfast"``: PySlowFast ``.pyth`` files (X3D, Slow, I3D): ``{"model_state": ...}`` with
  keys ``s1.pathway0_stem.*``, ``s{2-5}.pathway0_res{i}.*``, ``head.*``.
* ``"stgcn"``: the ST-GCN family (ST-GCN, AGCN, S-TR): ``.pt`` state dicts or Lightning
  ``.ckpt`` files (``{"state_dict": ...}``, keys possibly prefixed with ``model.``) with keys
  ``data_bn.*``, ``layers.layerK.{gcn,tcn,residual}.*``, ``fc.*`` (see
  ``skeleton/_skeleton_checkpoints.py``).
* ``"costream"``: a ``state_dict`` of the zoo model itself.

Files are read with ``torch.load(weights_only=True)`` (no code from the file runs). Anything that
does not fit raises :class:`CheckpointError` naming the missing and unexpected keys and the shape
mismatches; two checkpoint keys that rename onto the same model key are refused, naming both.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._rename import CheckpointError, rename_keys
from .skeleton._skeleton_checkpoints import is_stgcn_layout, map_stgcn_keys
from .video._resnet3d import ResNet3D
from .video._x3d import X3D

Layout = Literal["auto", "pytorchvideo", "pyslowfast", "stgcn", "costream"]
Rule = tuple[str, str | Callable[[re.Match], str]]

# ------------------------------------------------------------------------------ mapping tables
# Each table is a list of (pattern, replacement); the first matching prefix rule renames the
# start of a key, then every matching block rule renames its inside.
_PTV_X3D_PREFIX: list[Rule] = [
    (r"^blocks\.0\.conv\.conv_t\.", "stem.conv_s."),   # PyTorchVideo's conv_t is the 1x3x3 one
    (r"^blocks\.0\.conv\.conv_xy\.", "stem.conv_t."),  # ... and conv_xy the 5x1x1 depthwise one
    (r"^blocks\.0\.norm\.", "stem.bn."),
    (r"^blocks\.([1-4])\.res_blocks\.(\d+)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}."),
    (r"^blocks\.5\.pool\.pre_conv\.", "head.conv."),
    (r"^blocks\.5\.pool\.pre_norm\.", "head.bn."),
    (r"^blocks\.5\.pool\.post_conv\.", "head.fc."),
    (r"^blocks\.5\.proj\.", "head.proj."),
]
_PTV_BLOCK: list[Rule] = [
    (r"\.branch1_conv\.", ".branches.shortcut.conv."),
    (r"\.branch1_norm\.", ".branches.shortcut.bn."),
    (r"\.branch2\.conv_([abc])\.", r".branches.main.conv_\1."),
    (r"\.branch2\.norm_b\.0\.", ".branches.main.bn_b."),  # X3D: norm_b = (BN, SE or Identity)
    (r"\.branch2\.norm_b\.1\.block\.0\.", ".branches.main.se.fc1."),
    (r"\.branch2\.norm_b\.1\.block\.2\.", ".branches.main.se.fc2."),
    (r"\.branch2\.norm_([abc])\.", r".branches.main.bn_\1."),
]
_SLOWFAST_BLOCK: list[Rule] = [
    (r"\.branch1\.", ".branches.shortcut.conv."),
    (r"\.branch1_bn\.", ".branches.shortcut.bn."),
    (r"\.branch2\.([abc])\.", r".branches.main.conv_\1."),
    (r"\.branch2\.([abc])_bn\.", r".branches.main.bn_\1."),
    (r"\.branch2\.se\.(fc[12])\.", r".branches.main.se.\1."),
]
_SLOWFAST_STAGES: Rule = (r"^s([2-5])\.pathway0_res(\d+)\.", lambda m: f"res{m[1]}.{m[2]}.")
_SLOWFAST_X3D_PREFIX: list[Rule] = [
    (r"^s1\.pathway0_stem\.conv_xy\.", "stem.conv_s."),
    (r"^s1\.pathway0_stem\.conv\.", "stem.conv_t."),
    (r"^s1\.pathway0_stem\.bn\.", "stem.bn."),
    _SLOWFAST_STAGES,
    (r"^head\.conv_5\.", "head.conv."),
    (r"^head\.conv_5_bn\.", "head.bn."),
    (r"^head\.lin_5\.", "head.fc."),
    (r"^head\.projection\.", "head.proj."),
]
_SLOWFAST_RESNET_PREFIX: list[Rule] = [
    (r"^s1\.pathway0_stem\.conv\.", "stem.conv."),
    (r"^s1\.pathway0_stem\.bn\.", "stem.bn."),
    _SLOWFAST_STAGES,
    (r"^head\.projection\.", "head.proj."),
]


def _ptv_resnet_prefix(model: ResNet3D) -> list[Rule]:
    # PyTorchVideo's I3D has its temporal max pool at blocks.2, moving later stages by one
    stages = {1: 2, 3: 3, 4: 4, 5: 5} if _has_pool2(model) else {1: 2, 2: 3, 3: 4, 4: 5}
    head = 6 if _has_pool2(model) else 5

    def stage(m: re.Match) -> str:
        return f"res{stages[int(m[1])]}.{m[2]}." if int(m[1]) in stages else m[0]

    return [
        (r"^blocks\.0\.conv\.", "stem.conv."),
        (r"^blocks\.0\.norm\.", "stem.bn."),
        (r"^blocks\.(\d)\.res_blocks\.(\d+)\.", stage),
        (rf"^blocks\.{head}\.proj\.", "head.proj."),
    ]


def _has_pool2(model: nn.Module) -> bool:
    return "pool2" in model._modules


def _tables(model: nn.Module, layout: str) -> tuple[list[Rule], list[Rule]]:
    if isinstance(model, X3D):
        if layout == "pytorchvideo":
            return _PTV_X3D_PREFIX, _PTV_BLOCK
        return _SLOWFAST_X3D_PREFIX, _SLOWFAST_BLOCK
    if isinstance(model, ResNet3D):
        if layout == "pytorchvideo":
            return _ptv_resnet_prefix(model), _PTV_BLOCK
        return _SLOWFAST_RESNET_PREFIX, _SLOWFAST_BLOCK
    raise TypeError(f"no {layout} key mapping for {type(model).__name__}; pass a costream "
                    f"state dict (layout='costream') instead")


def _rename(key: str, prefix: list[Rule], block: list[Rule]) -> str:
    for pattern, repl in prefix:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            key = new
            if new.startswith("res"):
                for b_pattern, b_repl in block:
                    key = re.sub(b_pattern, b_repl, key, count=1)
            return key
    return key


# ------------------------------------------------------------------------------ public API
def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a ``.pyth`` / ``.pt`` file, read with ``torch.load(weights_only=True)``.

    The weights may sit at the top level or under ``model_state`` / ``state_dict`` / ``model``.
    """
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain containers (e.g. a training "
            f"framework's hyper-parameters), which torch.load(weights_only=True) refuses to "
            f"unpickle; save its state dict alone from a trusted environment. ({err})") from err
    return _unwrap(obj, str(path))


def _unwrap(obj: Any, where: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model_state", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(f"{where}: expected a state dict of tensors (possibly under "
                          f"'model_state' or 'state_dict'), got {type(obj).__name__}")


def detect_layout(state: Mapping[str, Tensor]) -> str:
    """``"pytorchvideo"``, ``"pyslowfast"``, ``"stgcn"`` or ``"costream"`` from the keys of
    ``state``."""
    keys = list(state)
    if any(k.startswith("blocks.") for k in keys):
        return "pytorchvideo"
    if any(re.match(r"^s\d\.pathway0_", k) for k in keys):
        return "pyslowfast"
    if is_stgcn_layout(keys):
        return "stgcn"
    return "costream"


def map_checkpoint(state: Mapping[str, Tensor], model: nn.Module,
                   layout: Layout = "auto") -> dict[str, Tensor]:
    """Rename the keys of a published ``state`` to those of the zoo ``model``.

    Example:
        >>> from costream.models import create_model, map_checkpoint
        >>> import torch
        >>> state = {"blocks.0.conv.conv_t.weight": torch.zeros(24, 3, 1, 3, 3)}
        >>> list(map_checkpoint(state, create_model("x3d_s")))
        ['stem.conv_s.weight']
    """
    layout = detect_layout(state) if layout == "auto" else layout
    if layout not in ("pytorchvideo", "pyslowfast", "stgcn", "costream"):
        raise ValueError(f"unknown checkpoint layout {layout!r}")
    if layout == "costream":
        return dict(state)
    if layout == "stgcn":
        return map_stgcn_keys(state)
    prefix, block = _tables(model, layout)
    return rename_keys(state, lambda k: _rename(k, prefix, block))


def architecture_options(state: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Constructor options of the architecture variant that ``state`` holds (for ``model``).

    PyTorchVideo's X3D has no batch norm on res2's projection shortcut; PySlowFast's has one.
    """
    if not isinstance(model, X3D):
        return {}
    state = _unwrap(state, "checkpoint")
    mapped = map_checkpoint(state, model)
    has_conv = "res2.0.branches.shortcut.conv.weight" in mapped
    has_bn = "res2.0.branches.shortcut.bn.weight" in mapped
    if has_conv and has_bn != model.res2_shortcut_bn:
        return {"res2_shortcut_bn": has_bn}
    return {}


def load_checkpoint(model: nn.Module, checkpoint: str | Path | Mapping[str, Any], *,
                    layout: Layout = "auto", strict: bool = True) -> nn.Module:
    """Load a PyTorchVideo / PySlowFast / costream checkpoint into a zoo ``model`` (in place).

    Args:
        model: a zoo model (e.g. from :func:`create_model`).
        checkpoint: a file path or an already loaded dict.
        layout: the key layout; ``"auto"`` detects it from the keys.
        strict: with ``False`` missing and unexpected keys are ignored; shapes must still fit.

    Returns:
        ``model``.

    Raises:
        CheckpointError: naming every missing and unexpected key and every shape mismatch
            (``num_batches_tracked`` counters may be absent).

    Example:
        >>> from costream.models import create_model, load_checkpoint
        >>> src, dst = create_model("x3d_xs"), create_model("cox3d_xs")
        >>> load_checkpoint(dst, src.state_dict()) is dst
        True
    """
    if isinstance(checkpoint, (str, Path)):
        where = str(checkpoint)
        state = read_checkpoint(checkpoint)
    else:
        where = "checkpoint"
        state = _unwrap(checkpoint, where)
    found = detect_layout(state) if layout == "auto" else layout
    mapped = map_checkpoint(state, model, found)
    origin = dict(zip(mapped, state))
    own = model.state_dict()
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in own]
    mismatched = [k for k in mapped if k in own and mapped[k].shape != own[k].shape]
    problems = []
    if strict and missing:
        problems.append(_listing("missing keys", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected keys", [
            k if origin[k] == k else f"{origin[k]} (as {k})" for k in unexpected]))
    if mismatched:
        problems.append(_listing("shape mismatches", [
            f"{origin[k]}: checkpoint {tuple(mapped[k].shape)}, model {tuple(own[k].shape)}"
            for k in mismatched]))
    if problems:
        if isinstance(model, X3D) and architecture_options(state, model):
            problems.append(f"  hint: the checkpoint {'lacks' if model.res2_shortcut_bn else 'has'}"
                            f" a batch norm on res2's projection shortcut; build the model with "
                            f"res2_shortcut_bn={not model.res2_shortcut_bn} (create_model(name, "
                            f"checkpoint=...) does so)")
        raise CheckpointError(f"{where} ({found} layout) does not fit "
                              f"{type(model).__name__}:\n" + "\n".join(problems))
    fitting = {k: v for k, v in mapped.items() if k in own}
    for k in own:
        if k not in fitting and k.endswith("num_batches_tracked"):
            fitting[k] = own[k]
    model.load_state_dict(fitting, strict=strict)
    return model


def _listing(what: str, items: list[str], limit: int = 12) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {what} ({len(items)}):\n    {shown}{more}"

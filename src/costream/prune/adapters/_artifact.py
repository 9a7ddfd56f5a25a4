"""Per-task artifacts: what a derived model adds to its base, in one safetensors file.

A task derived from a base network (pruned, adapted, fine-tuned) is stored as:

* ``mask/<module>/<out|in>``: boolean channel masks over the base widths (:func:`kept_masks`);
* ``adapter/<module>/<name>``: each adapter layer's own tensors, already pruned (SPLoPA stores
  the scalings of kept blocks and its block mask);
* ``shared/<module>/<name>``: modules shared between adapter layers (SPLoPA's prototype bank),
  once, under the first layer using them;
* ``param/<name>``: every other trainable parameter (biases, saved modules such as a new head;
  everything, for a model trained in full);
* ``buffer/<name>``: floating-point buffers of modules with trainable parameters (batch-norm
  statistics), which training changes too.

:func:`save_artifact` also rebuilds the task from what it is about to store and adds every
buffer (e.g. running statistics that adapter training changed in a frozen batch norm) and every
parameter that would otherwise come back different, so the stored task is the task.

The metadata holds the format version, the SHA-256 of the base state dict, the adapter config
(JSON), the names of the adapted modules, the list of entries and a SHA-256 over the artifact's
own content (every tensor and the metadata). :func:`load_artifact` rebuilds the derived model from
the base: it checks the entries and the content checksum, prunes a copy with the masks, adds the
adapters, loads the tensors, and refuses any mismatch (unknown or missing entries, a damaged
file, unknown module names, shapes, another base) with a message saying which.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .._masks import apply_masks, kept_masks
from ._config import AdapterConfig
from ._layer import AdapterLayer
from ._model import adapter_layers, adapter_state, add_adapters

FORMAT = "costream-task-artifact"
VERSION = "2"
_PREFIXES = ("mask/", "adapter/", "shared/", "param/", "buffer/")


def base_checksum(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model``'s state dict.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> base_checksum(lin) == base_checksum(lin), len(base_checksum(lin))
        (True, 64)
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        _hash_tensor(h, name, t)
    return h.hexdigest()


def _hash_tensor(h: hashlib._Hash, name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def content_checksum(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over an artifact's tensors (names, dtypes, shapes, bytes) and its metadata."""
    h = hashlib.sha256()
    for key, value in sorted(meta.items()):
        if key != "content_sha256":
            h.update(f"{key}={value}\n".encode())
    for name, t in sorted(tensors.items()):
        _hash_tensor(h, name, t)
    return h.hexdigest()


def artifact_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The tensors :func:`save_artifact` stores for ``model`` by its structure, by artifact key.

    :func:`save_artifact` adds the buffers and parameters that differ from the base otherwise
    (it needs the base to tell).

    Example:
        >>> import torch
        >>> from costream.prune.adapters import SPLoRAConfig, add_adapters
        >>> net = add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 3)), SPLoRAConfig(rank=2))
        >>> sorted(artifact_tensors(net))
        ['adapter/0/lora_A.weight', 'adapter/0/lora_B.weight', 'param/0.base_layer.bias']
    """
    state = adapter_state(model)
    layers = adapter_layers(model)
    if (state is not None and state["merged"]) or any(m.merged for m in layers.values()):
        raise ValueError("the model's adapters are merged; store the task before merging")
    out: dict[str, Tensor] = {}
    for name, entry in kept_masks(model).items():
        for kind, mask in entry.items():
            out[f"mask/{name}/{kind}"] = mask
    adapter_params: set[int] = set()
    seen_shared: set[int] = set()
    for name, layer in layers.items():
        for key, t in layer.export_state().items():
            out[f"adapter/{name}/{key}"] = t
        for sname, module in layer.shared_modules().items():
            if id(module) not in seen_shared:
                seen_shared.add(id(module))
                for key, t in [*module.named_parameters(), *module.named_buffers()]:
                    out[f"shared/{name}/{sname}.{key}"] = t.detach().clone()
        adapter_params.update(id(p) for _, p in layer.adapter_parameters())
        adapter_params.update(id(b) for n, b in layer.named_buffers()
                              if not n.startswith("base_layer."))
    saved = set((state or {}).get("modules_to_save", []))
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False)
               if id(p) not in adapter_params]
        trained = [(n, p) for n, p in own if p.requires_grad]
        prefix = f"{mname}." if mname else ""
        for n, p in trained:
            out[f"param/{prefix}{n}"] = p.detach().clone()
        if trained or mname in saved or any(mname.startswith(s + ".") for s in saved):
            for n, b in module.named_buffers(recurse=False):
                if b.is_floating_point() and id(b) not in adapter_params:
                    out[f"buffer/{prefix}{n}"] = b.detach().clone()
    return out


def save_artifact(path: str | Path, model: nn.Module, base: nn.Module) -> dict[str, str]:
    """Store the task ``model`` derived from ``base`` at ``path``; return the metadata.

    Args:
        path: the ``.safetensors`` file to write.
        model: the derived model (pruned and/or adapted, not merged).
        base: the unmodified base model it was derived from.

    Example:
        >>> import copy, os, tempfile, torch
        >>> from costream.prune import prune
        >>> from costream.prune.adapters import SPLoRAConfig, add_adapters
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                            torch.nn.Linear(8, 2))
        >>> task = add_adapters(copy.deepcopy(base), SPLoRAConfig(rank=2, init_scale=0.1))
        >>> _ = prune(task, torch.randn(1, 4), "l1", density=0.5)
        >>> path = os.path.join(tempfile.mkdtemp(), "task.safetensors")
        >>> save_artifact(path, task, base)["format"]
        'costream-task-artifact'
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(load_artifact(path, base)(x), task(x))
        True
    """
    tensors = {k: v.contiguous() for k, v in artifact_tensors(model).items()}
    state = adapter_state(model)
    config: AdapterConfig | None = state["config"] if state else None
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "base_sha256": base_checksum(base),
        "adapter_config": config.to_json() if config else "",
        "adapter_modules": json.dumps(sorted(adapter_layers(model))),
    }
    tensors.update(_differences(model, _rebuild(tensors, meta, base)))
    meta["entries"] = json.dumps(sorted(tensors))
    meta["content_sha256"] = content_checksum(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    return meta


def _differences(model: nn.Module, rebuilt: nn.Module) -> dict[str, Tensor]:
    """``param/`` and ``buffer/`` entries for every tensor of ``model`` that the model
    ``rebuilt`` from the artifact so far does not reproduce exactly."""
    out: dict[str, Tensor] = {}
    for prefix, ours, theirs in (("param/", model.named_parameters(), rebuilt.named_parameters()),
                                 ("buffer/", model.named_buffers(), rebuilt.named_buffers())):
        other = dict(theirs)
        for name, t in ours:
            if name not in other:
                raise ValueError(f"cannot store the task: its {prefix[:-1]} {name!r} has no "
                                 f"counterpart in the model rebuilt from the base")
            o = other[name]
            if o.dtype != t.dtype or o.shape != t.shape or not torch.equal(o, t.detach()):
                out[f"{prefix}{name}"] = t.detach().clone().contiguous()
    return out


def load_artifact(path: str | Path, base: nn.Module) -> nn.Module:
    """Rebuild the derived model stored at ``path`` from ``base`` (which is not modified).

    Example:
        >>> import copy, os, tempfile, torch
        >>> from costream.prune.adapters import SPLoRAConfig, add_adapters, save_artifact
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> task = add_adapters(copy.deepcopy(base), SPLoRAConfig(rank=2, init_scale=0.1))
        >>> path = os.path.join(tempfile.mkdtemp(), "task.safetensors")
        >>> _ = save_artifact(path, task, base)
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(load_artifact(path, base)(x), task(x))
        True

    Checks, in order: the file format, that the file holds exactly the entries it lists (none
    unknown, none missing or renamed), the checksum of its content (a flipped mask bit or an
    edited tensor is refused), that every module the artifact names exists in the base, the
    shapes of masks and tensors, and the base checksum. The model comes back in eval mode with
    adapters unmerged (see :func:`merge_adapters`).

    Raises:
        ValueError: on any mismatch between the artifact and ``base``, or a damaged artifact.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a costream task artifact (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"artifact version {meta.get('version')!r} is not supported "
                         f"(expected {VERSION})")
    tensors = load_file(str(path))
    _check_content(path, tensors, meta)
    model = _rebuild(tensors, meta, base)
    checksum = base_checksum(base)
    if checksum != meta.get("base_sha256"):
        raise ValueError(f"base checksum mismatch: the artifact was derived from a base with "
                         f"SHA-256 {meta.get('base_sha256')}, this base has {checksum}")
    return model.eval()


def _check_content(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    unknown = sorted(k for k in tensors if not k.startswith(_PREFIXES))
    if unknown:
        raise ValueError(f"{path}: unknown entries {unknown} (a task artifact holds only "
                         f"{', '.join(_PREFIXES)} entries)")
    try:
        listed = set(json.loads(meta["entries"]))
        expected_sum = meta["content_sha256"]
    except (KeyError, ValueError):
        raise ValueError(f"{path}: the metadata lacks the list of entries or the content "
                         f"checksum; the file is damaged") from None
    missing, extra = sorted(listed - set(tensors)), sorted(set(tensors) - listed)
    if missing or extra:
        raise ValueError(f"{path}: entries do not match the artifact's list (missing or "
                         f"renamed: {missing}; not listed: {extra})")
    if content_checksum(tensors, meta) != expected_sum:
        raise ValueError(f"{path}: content checksum mismatch: a mask, tensor or metadata field "
                         f"changed after the artifact was saved (damaged or edited file)")


def _rebuild(tensors: dict[str, Tensor], meta: dict[str, str], base: nn.Module) -> nn.Module:
    """A copy of ``base`` pruned by the masks, with the adapters and tensors of an artifact."""
    model = copy.deepcopy(base)
    names = dict(model.named_modules())
    masks: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("mask/"):
            module, kind = key[len("mask/"):].rsplit("/", 1)
            if module not in names:
                raise ValueError(f"module name mismatch: the artifact masks {module!r}, which "
                                 f"the base model does not have")
            masks.setdefault(module, {})[kind] = t
    apply_masks(model, masks)
    config = meta["adapter_config"]
    if config:
        add_adapters(model, AdapterConfig.from_json(config))
    layers = adapter_layers(model)
    expected = json.loads(meta["adapter_modules"])
    if sorted(layers) != expected:
        raise ValueError(f"module name mismatch: the artifact adapts {expected}, the base "
                         f"model yields {sorted(layers)}")
    _load_adapters(tensors, layers)
    _load_named(tensors, model)
    return model


def _load_adapters(tensors: dict[str, Tensor], layers: dict[str, AdapterLayer]) -> None:
    per_layer: dict[str, dict[str, Tensor]] = {name: {} for name in layers}
    for key, t in tensors.items():
        if key.startswith("adapter/"):
            name, local = key[len("adapter/"):].rsplit("/", 1)
            if name not in per_layer:
                raise ValueError(f"module name mismatch: adapter tensors for {name!r}, which "
                                 f"is not an adapted module")
            per_layer[name][local] = t
    for name, layer in layers.items():
        layer.import_state(per_layer[name], name)
    with torch.no_grad():
        for key, t in tensors.items():
            if not key.startswith("shared/"):
                continue
            name, local = key[len("shared/"):].rsplit("/", 1)
            sname, _, pname = local.partition(".")
            if name not in layers or sname not in layers[name].shared_modules():
                raise ValueError(f"module name mismatch: shared tensor {key!r} has no module")
            _copy_checked(layers[name].shared_modules()[sname], pname, t, key)


def _load_named(tensors: dict[str, Tensor], model: nn.Module) -> None:
    with torch.no_grad():
        for key, t in tensors.items():
            for prefix in ("param/", "buffer/"):
                if key.startswith(prefix):
                    _copy_checked(model, key[len(prefix):], t, key)


def _copy_checked(root: nn.Module, name: str, value: Tensor, key: str) -> None:
    tensors = dict(root.named_parameters())
    tensors.update(dict(root.named_buffers()))
    if name not in tensors:
        raise ValueError(f"module name mismatch: the artifact stores {key!r}, which the derived "
                         f"model does not have")
    target = tensors[name]
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(f"shape mismatch for {key!r}: artifact {tuple(value.shape)}, model "
                         f"{tuple(target.shape)}")
    target.copy_(value)

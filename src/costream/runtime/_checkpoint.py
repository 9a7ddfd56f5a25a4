"""Stream-state checkpoints: save running streams to disk and resume them bit-identically.

Files are written with ``torch.save`` and read back with ``torch.load(weights_only=True)``.
Each file records a fingerprint of the module (class, temporal geometry, state layout, the type
of every layer and, unless saved with ``hash_weights=False``, a SHA-256 of its weights) and a
SHA-256 of every tensor; a corrupt or mismatched file is refused before anything is applied.
"""

from __future__ import annotations

import hashlib
import io
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core._module import CoModule
from ..core._tree import State, tree_leaves, tree_unflatten
from ._engine import StreamEngine

FORMAT = "costream-streams/2"
_OLD_FORMATS = ("costream-streams/1",)  # no layer types: re-save with this version


def _fingerprint(module: CoModule, template: State) -> dict[str, Any]:
    t = module.temporal
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "temporal": [t.receptive_field, t.stride, t.padding, t.end_padding],
        "leaves": [[name, list(v.shape[1:]), str(v.dtype)] for name, v in tree_leaves(template)],
        "layers": [[name, type(m).__qualname__] for name, m in module.named_modules()],
    }


def _digest(tensors: list[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of ``module``'s ``state_dict`` (parameters and persistent buffers, with names and
    dtypes). Cached while no tensor is replaced or changed in place (``Tensor._version``).

    Example:
        >>> import torch, costream as cs
        >>> from costream.runtime._checkpoint import weights_digest
        >>> conv = cs.Conv1d(2, 2, 3)
        >>> before = weights_digest(conv)
        >>> with torch.no_grad():
        ...     _ = conv.weight.mul_(2)
        >>> weights_digest(conv) == before
        False
    """
    items = list(module.state_dict(keep_vars=True).items())
    try:
        key: tuple | None = tuple((name, id(t), t.data_ptr(), t._version) for name, t in items)
    except RuntimeError:  # inference tensors have no version counter: no cache
        key = None
    hit = _WEIGHTS.get(module)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}:{t.dtype}:".encode())
        h.update(_digest([t]).encode())
    digest = h.hexdigest()
    if key is not None:
        _WEIGHTS[module] = (key, digest)
    return digest


_MAGIC = b"COSTREAM-STREAMS\n"


def _write(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` with a SHA-256 of the whole serialised body in front of it."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(_MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name


def _read(path: str | os.PathLike) -> dict[str, Any]:
    data = Path(path).read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError(f"{path} is not a costream stream checkpoint ({FORMAT})")
    digest, _, body = data[len(_MAGIC):].partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise ValueError(f"{path} is corrupt: its content does not match the recorded checksum")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
    except Exception as err:  # unpickling errors of every kind mean the same to the user
        raise ValueError(f"{path} is not a readable stream checkpoint ({err})") from err
    if isinstance(payload, dict) and payload.get("format") in _OLD_FORMATS:
        raise ValueError(f"{path} is a {payload['format']} stream checkpoint: its fingerprint "
                         f"lacks the layer types that {FORMAT} checks; save the streams again")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a costream stream checkpoint ({FORMAT})")
    leaves = payload.get("leaves")
    if not isinstance(leaves, list) or _digest(leaves) != payload.get("sha256"):
        raise ValueError(f"{path} is corrupt: its tensors do not match the recorded checksum")
    return payload


def _check_fingerprint(path: Any, got: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("class", "temporal", "leaves", "layers"):
        if got.get(key) == expected[key]:
            continue
        if key == "layers":
            saved = {n: c for n, c in got.get(key) or []}
            here = {n: c for n, c in expected[key]}
            diff = next(n for n in [*here, *saved] if saved.get(n) != here.get(n))
            raise ValueError(f"{path} was saved from a different module: layer "
                             f"'{diff or '(root)'}' is {saved.get(diff, 'absent')} there, "
                             f"{here.get(diff, 'absent')} in this module")
        raise ValueError(f"{path} was saved from a different module: {key} is "
                         f"{got.get(key)!r}, this module has {expected[key]!r}")


def _check_weights(path: Any, payload: dict[str, Any], module: nn.Module,
                   check_weights: bool) -> None:
    saved = payload.get("weights")
    if check_weights and saved is not None and saved != weights_digest(module):
        raise ValueError(f"{path} was saved from a module with other weights (parameters or "
                         f"buffers): its streams' state was computed with those. Load the same "
                         f"weights first, or pass check_weights=False to resume anyway")


def save_engine(engine: StreamEngine, path: str | os.PathLike, *,
                hash_weights: bool = True) -> None:
    """Save every stream slot of ``engine`` (open or not) to ``path``.

    Args:
        engine: the engine.
        path: the file to write (replaced atomically).
        hash_weights: record a SHA-256 of the module's weights, so that loading into a module
            with other weights is refused (hashing reads every weight once per new weights;
            pass ``False`` to skip it, e.g. for frequent snapshots of a very large model).

    Example:
        >>> import os, tempfile, torch, costream as cs
        >>> from costream.runtime import StreamEngine, load_engine, save_engine
        >>> net = cs.Conv1d(2, 3, 3)
        >>> engine = StreamEngine(net, capacity=2, frame_shape=(2,))
        >>> slot = engine.open()
        >>> _ = engine.step({slot: torch.randn(2)})
        >>> path = os.path.join(tempfile.mkdtemp(), "engine.pt")
        >>> save_engine(engine, path)
        >>> restored = StreamEngine(net, capacity=2, frame_shape=(2,))
        >>> load_engine(restored, path)
        >>> restored.ready(slot)
        False
    """
    state = engine.state_dict()
    leaves = [t.cpu() for _, t in tree_leaves(state["tree"])]
    _write(path, {"format": FORMAT, "kind": "engine",
                  "fingerprint": _fingerprint(engine.module, engine._fresh),
                  "weights": weights_digest(engine.module) if hash_weights else None,
                  "frame_shape": list(engine.frame_shape), "capacity": engine.capacity,
                  "age": state["age"], "active": state["active"], "leaves": leaves,
                  "sha256": _digest(leaves)})


def load_engine(engine: StreamEngine, path: str | os.PathLike, *,
                check_weights: bool = True) -> None:
    """Resume the streams saved by :func:`save_engine` into ``engine`` (same module/config).

    Refuses a file saved from another network (class, layer types, temporal geometry, state
    layout), for another capacity or frame shape, or, unless ``check_weights`` is false, from
    a module with other weights.

    Example:
        >>> import os, tempfile, torch, costream as cs
        >>> from costream.runtime import StreamEngine, load_engine, save_engine
        >>> net = cs.Conv1d(2, 3, 3)
        >>> engine = StreamEngine(net, capacity=1, frame_shape=(2,))
        >>> slot = engine.open()
        >>> frames = torch.randn(4, 2)
        >>> _ = [engine.step({slot: f}) for f in frames[:2]]
        >>> path = os.path.join(tempfile.mkdtemp(), "engine.pt")
        >>> save_engine(engine, path)
        >>> resumed = StreamEngine(net, capacity=1, frame_shape=(2,))
        >>> load_engine(resumed, path)
        >>> a = [engine.step({slot: f})[slot] for f in frames[2:]]
        >>> b = [resumed.step({slot: f})[slot] for f in frames[2:]]
        >>> all(torch.equal(x, y) for x, y in zip(a, b))
        True
    """
    payload = _read(path)
    if payload.get("kind") != "engine":
        raise ValueError(f"{path} holds a single module's streams, not an engine's")
    _check_fingerprint(path, payload["fingerprint"], _fingerprint(engine.module, engine._fresh))
    if payload["capacity"] != engine.capacity or tuple(payload["frame_shape"]) != \
            engine.frame_shape:
        raise ValueError(f"{path}: saved for capacity {payload['capacity']} and frames "
                         f"{tuple(payload['frame_shape'])}, this engine has {engine.capacity} "
                         f"and {engine.frame_shape}")
    _check_weights(path, payload, engine.module, check_weights)
    tree = tree_unflatten(engine._fresh, payload["leaves"])
    engine.load_state_dict({"tree": tree, "age": payload["age"], "active": payload["active"]})


def save_stream(module: CoModule, path: str | os.PathLike, *,
                hash_weights: bool = True) -> None:
    """Save the running streams of ``module`` (its :meth:`~CoModule.get_state`) to ``path``.

    ``hash_weights`` as for :func:`save_engine`.

    Example:
        >>> import torch, tempfile, os, costream as cs
        >>> from costream.runtime import save_stream, load_stream
        >>> conv = cs.Conv1d(2, 2, 3)
        >>> _ = conv.forward_step(torch.randn(1, 2))
        >>> path = os.path.join(tempfile.mkdtemp(), "stream.pt")
        >>> save_stream(conv, path)
        >>> fresh = cs.Conv1d(2, 2, 3)
        >>> fresh.load_state_dict(conv.state_dict())  # the weights the streams ran with
        <All keys matched successfully>
        >>> load_stream(fresh, path)
        >>> fresh.get_state()["age"]
        tensor([1])
    """
    state = module.get_state()
    if state is None:
        raise ValueError("the module has no running stream to save")
    leaves = [t.cpu() for _, t in tree_leaves(state["tree"])]
    template = module.init_state(1, state["frame_shape"], dtype=leaves[0].dtype if leaves
                                 else None)["tree"]
    _write(path, {"format": FORMAT, "kind": "module",
                  "fingerprint": _fingerprint(module, template),
                  "weights": weights_digest(module) if hash_weights else None,
                  "frame_shape": _listify(state["frame_shape"]), "age": state["age"].cpu(),
                  "phase": state["phase"], "leaves": leaves, "sha256": _digest(leaves)})


def load_stream(module: CoModule, path: str | os.PathLike, *,
                check_weights: bool = True) -> None:
    """Resume the streams saved by :func:`save_stream` in ``module``.

    Refuses a file as :func:`load_engine` does.

    Example:
        >>> import os, tempfile, torch, costream as cs
        >>> from costream.runtime import load_stream, save_stream
        >>> conv, x = cs.Conv1d(2, 2, 3), torch.randn(1, 2, 6)
        >>> _ = conv.forward_steps(x[:, :, :3])
        >>> path = os.path.join(tempfile.mkdtemp(), "stream.pt")
        >>> save_stream(conv, path)
        >>> copy = cs.Conv1d(2, 2, 3)
        >>> copy.load_state_dict(conv.state_dict())
        <All keys matched successfully>
        >>> load_stream(copy, path)
        >>> torch.equal(copy.forward_steps(x[:, :, 3:]), conv.forward_steps(x[:, :, 3:]))
        True
    """
    payload = _read(path)
    if payload.get("kind") != "module":
        raise ValueError(f"{path} holds an engine's streams, not a single module's")
    frame_shape = _tupleify(payload["frame_shape"])
    dtype = payload["leaves"][0].dtype if payload["leaves"] else None
    batch = payload["age"].shape[0]
    template = module.init_state(batch, frame_shape, dtype=dtype)
    single = module.init_state(1, frame_shape, dtype=dtype)["tree"]
    _check_fingerprint(path, payload["fingerprint"], _fingerprint(module, single))
    _check_weights(path, payload, module, check_weights)
    tree = tree_unflatten(template["tree"], payload["leaves"])
    ref = next((t for _, t in tree_leaves(template["tree"])), None)
    device = ref.device if ref is not None else "cpu"
    tree = tree_map_to(tree, device)
    module.set_state({"tree": tree, "age": payload["age"].to(device), "phase": payload["phase"],
                      "frame_shape": frame_shape})


def tree_map_to(tree: State, device: Any) -> State:
    from ..core._tree import tree_map

    return tree_map(lambda t: t.to(device), tree)


def _listify(shape: Any) -> Any:
    return [_listify(s) for s in shape] if isinstance(shape, (tuple, list)) else int(shape)


def _tupleify(shape: Any) -> Any:
    return tuple(_tupleify(s) for s in shape) if isinstance(shape, list) else shape

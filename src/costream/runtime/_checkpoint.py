"""Stream-state checkpoints: save running streams to disk and resume them bit-identically.

Files are written with ``torch.save`` and read back with ``torch.load(weights_only=True)``.
Each file records a fingerprint of the module (class, temporal geometry, state layout) and a
SHA-256 of every tensor; a corrupt or mismatched file is refused before anything is applied.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core._module import CoModule
from ..core._tree import State, tree_leaves, tree_unflatten
from ._engine import StreamEngine

FORMAT = "costream-streams/1"


def _fingerprint(module: CoModule, template: State) -> dict[str, Any]:
    t = module.temporal
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "temporal": [t.receptive_field, t.stride, t.padding, t.end_padding],
        "leaves": [[name, list(v.shape[1:]), str(v.dtype)] for name, v in tree_leaves(template)],
    }


def _digest(tensors: list[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a costream stream checkpoint ({FORMAT})")
    leaves = payload.get("leaves")
    if not isinstance(leaves, list) or _digest(leaves) != payload.get("sha256"):
        raise ValueError(f"{path} is corrupt: its tensors do not match the recorded checksum")
    return payload


def _check_fingerprint(path: Any, got: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("class", "temporal", "leaves"):
        if got.get(key) != expected[key]:
            raise ValueError(f"{path} was saved from a different module: {key} is "
                             f"{got.get(key)!r}, this module has {expected[key]!r}")


def save_engine(engine: StreamEngine, path: str | os.PathLike) -> None:
    """Save every stream slot of ``engine`` (open or not) to ``path``.

    Example:
        >>> import os, tempfile, torch, costream as cs
        >>> from costream.runtime import StreamEngine, load_engine, save_engine
        >>> engine = StreamEngine(cs.Conv1d(2, 3, 3), capacity=2, frame_shape=(2,))
        >>> slot = engine.open()
        >>> _ = engine.step({slot: torch.randn(2)})
        >>> path = os.path.join(tempfile.mkdtemp(), "engine.pt")
        >>> save_engine(engine, path)
        >>> restored = StreamEngine(cs.Conv1d(2, 3, 3), capacity=2, frame_shape=(2,))
        >>> load_engine(restored, path)
        >>> restored.ready(slot)
        False
    """
    state = engine.state_dict()
    leaves = [t.cpu() for _, t in tree_leaves(state["tree"])]
    _write(path, {"format": FORMAT, "kind": "engine",
                  "fingerprint": _fingerprint(engine.module, engine._fresh),
                  "frame_shape": list(engine.frame_shape), "capacity": engine.capacity,
                  "age": state["age"], "active": state["active"], "leaves": leaves,
                  "sha256": _digest(leaves)})


def load_engine(engine: StreamEngine, path: str | os.PathLike) -> None:
    """Resume the streams saved by :func:`save_engine` into ``engine`` (same module/config).

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
    tree = tree_unflatten(engine._fresh, payload["leaves"])
    engine.load_state_dict({"tree": tree, "age": payload["age"], "active": payload["active"]})


def save_stream(module: CoModule, path: str | os.PathLike) -> None:
    """Save the running streams of ``module`` (its :meth:`~CoModule.get_state`) to ``path``.

    Example:
        >>> import torch, tempfile, os, costream as cs
        >>> from costream.runtime import save_stream, load_stream
        >>> conv = cs.Conv1d(2, 2, 3)
        >>> _ = conv.forward_step(torch.randn(1, 2))
        >>> path = os.path.join(tempfile.mkdtemp(), "stream.pt")
        >>> save_stream(conv, path)
        >>> fresh = cs.Conv1d(2, 2, 3)
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
                  "frame_shape": _listify(state["frame_shape"]), "age": state["age"].cpu(),
                  "phase": state["phase"], "leaves": leaves, "sha256": _digest(leaves)})


def load_stream(module: CoModule, path: str | os.PathLike) -> None:
    """Resume the streams saved by :func:`save_stream` in ``module``.

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

"""Files written by ``costream convert``: ``model.pt`` (a ``state_dict``) and ``model.pt.json``.

The JSON spec names the ``package.module:function`` that builds the source ``torch.nn`` model,
the conversion options, the frame shape, the temporal geometry and the verification result. It
also protects the pair:

* ``weights_sha256``: SHA-256 of the bytes of ``model.pt`` (a truncated or replaced weights file
  is refused before ``torch.load`` reads it);
* ``structure``: a fingerprint of the converted module, every submodule's name and type and
  every state tensor's name, dtype and shape (a builder that now returns another network, even
  one with the same shapes, is refused);
* ``spec_sha256``: SHA-256 over all other fields (an edited or truncated JSON is refused).

Loading runs the builder the JSON names, which is code: :func:`load_converted` does so only when
the caller passes the builder or ``trust=True`` (``--trust`` on the command line), as
``torch.hub`` asks for ``trust_repo``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FORMAT", "ConvertedFileError", "load_converted", "save_converted",
           "structure_fingerprint"]

FORMAT = "costream-convert/2"
_REQUIRED = ("format", "source", "options", "frame_shape", "weights_sha256", "structure",
             "spec_sha256")


class ConvertedFileError(ValueError):
    """A ``costream convert`` file pair that is damaged, edited or not trusted."""


def structure_fingerprint(net: nn.Module) -> str:
    """SHA-256 over the names and types of ``net``'s modules and its state tensors' shapes.

    Example:
        >>> import torch
        >>> a = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> b = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
        >>> structure_fingerprint(a) == structure_fingerprint(b)
        False
    """
    h = hashlib.sha256()
    for name, m in net.named_modules():
        h.update(f"m|{name}|{type(m).__module__}.{type(m).__qualname__}\n".encode())
    for name, t in net.state_dict().items():
        h.update(f"t|{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    return h.hexdigest()


def _spec_sha256(spec: dict[str, Any]) -> str:
    body = {k: v for k, v in spec.items() if k != "spec_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_converted(net: nn.Module, path: str | Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Write ``net``'s ``state_dict`` to ``path`` and ``spec`` (plus checksums) to
    ``<path>.json``; return the spec as written.

    ``spec`` needs ``source`` (``package.module:function``), ``options`` (of
    :func:`costream.continual`) and ``frame_shape``; other fields are kept as they are.

    Example:
        >>> import os, tempfile, costream as cs
        >>> from costream.bench._converted import load_converted, save_converted
        >>> from costream.demo import build_tcn
        >>> net = cs.continual(build_tcn()).eval()
        >>> path = os.path.join(tempfile.mkdtemp(), "tcn.pt")
        >>> spec = save_converted(net, path, {"source": "costream.demo:build_tcn",
        ...                                   "options": {}, "frame_shape": [8]})
        >>> loaded, _ = load_converted(path, build_tcn)
        >>> loaded.receptive_field == net.receptive_field
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    out = {"format": FORMAT, **{k: v for k, v in spec.items() if k != "format"}}
    out["weights_sha256"] = _file_sha256(path)
    out["structure"] = structure_fingerprint(net)
    out["spec_sha256"] = _spec_sha256(out)
    Path(f"{path}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def read_spec(path: str | Path) -> dict[str, Any]:
    """The checked spec of the converted file ``path`` (``<path>.json``), builder not run."""
    path = Path(path)
    spec_path = Path(f"{path}.json")
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path}: not a model written by `costream convert`")
    try:
        spec = json.loads(spec_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConvertedFileError(f"{spec_path}: not valid JSON (truncated or edited?): "
                                 f"{err}") from None
    if not isinstance(spec, dict):
        raise ConvertedFileError(f"{spec_path}: expected a JSON object")
    if spec.get("format") != FORMAT:
        raise ConvertedFileError(f"{spec_path}: format {spec.get('format')!r} is not "
                                 f"{FORMAT!r}; convert the model again with this costream")
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise ConvertedFileError(f"{spec_path}: fields {missing} are missing")
    if _spec_sha256(spec) != spec["spec_sha256"]:
        raise ConvertedFileError(f"{spec_path}: spec checksum mismatch: the JSON was edited "
                                 f"after `costream convert` wrote it")
    if not path.exists():
        raise FileNotFoundError(f"{path}: the weights of {spec_path} are missing")
    if _file_sha256(path) != spec["weights_sha256"]:
        raise ConvertedFileError(f"{path}: weights checksum mismatch: the file is truncated or "
                                 f"is not the one `costream convert` wrote with {spec_path}")
    return spec


def load_converted(path: str | Path, build: Callable[[], nn.Module] | None = None, *,
                   trust: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by ``costream convert`` and load its weights.

    ``path`` holds the converted module's ``state_dict``; ``<path>.json`` the spec (see the
    module docstring). The source ``torch.nn`` model comes from ``build()`` if given, else from
    the ``module:function`` the spec names, which is imported and called only with
    ``trust=True`` (it runs code named by the file; do so only for files you trust). The result
    is converted with the spec's options, checked against the saved structure and loaded with
    ``torch.load(weights_only=True)``.

    Returns:
        the continual module (eval mode) and the spec.

    Raises:
        FileNotFoundError: no spec or no weights file.
        ConvertedFileError: the spec or weights were changed or damaged, the builder returns
            another network, or the builder would run untrusted.

    Example:
        >>> from costream.bench import load_converted
        >>> load_converted("no/such/model.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no/such/model.pt.json: not a model written by `costream convert`
    """
    from ..convert import continual
    from ._workloads import build_source

    spec = read_spec(path)
    if build is None:
        if not trust:
            raise ConvertedFileError(
                f"{path}.json names the builder {spec['source']!r}; loading it imports and runs "
                f"that code: pass the builder (load_converted(path, build)) or trust=True "
                f"(costream ... --trust) for a file you trust")
        model = build_source(spec["source"])
    else:
        model = build()
        if not isinstance(model, nn.Module):
            raise TypeError(f"build() returned {type(model).__name__}, not a torch.nn.Module")
    net = continual(model, **spec["options"])
    if structure_fingerprint(net) != spec["structure"]:
        raise ConvertedFileError(
            f"{path}: the builder {spec['source']!r} now returns a network of another structure "
            f"(module types or tensor shapes) than the one that was converted")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval(), spec


class _SlidingWindows(nn.Module):
    """A torch encoder (layer) on every window of ``window`` tokens of a costream-layout clip
    ``(B, d, T)``, in the layout the encoder expects (``batch_first`` or not); returns the
    newest token's output of each window, ``(B, d, T - window + 1)``."""

    def __init__(self, encoder: nn.Module, window: int) -> None:
        super().__init__()
        self.encoder, self.window = encoder, window
        layer = encoder if isinstance(encoder, nn.TransformerEncoderLayer) else encoder.layers[0]
        self.batch_first = bool(layer.self_attn.batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, _ = x.shape
        windows = x.unfold(2, self.window, 1)  # (B, d, T', n)
        count = windows.shape[2]
        tokens = windows.permute(0, 2, 3, 1).reshape(b * count, self.window, d)  # (N, n, d)
        if self.batch_first:
            out = self.encoder(tokens)[:, -1]
        else:  # (n, N, d)
            out = self.encoder(tokens.transpose(0, 1).contiguous())[-1]
        return out.reshape(b, count, d).transpose(1, 2)


def window_reference(source: nn.Module, window: int | None) -> nn.Module:
    """The offline reference of ``continual(source, temporal_window=window)``: ``source`` with
    every ``torch.nn`` Transformer encoder (layer) applied to sliding windows of ``window``
    tokens in its own layout (``source`` itself is not changed).

    Example:
        >>> import torch, costream as cs
        >>> from costream.bench._converted import window_reference
        >>> from costream.testing import assert_streaming_equivalent
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).double().eval()
        >>> x = torch.randn(2, 8, 9, dtype=torch.float64)
        >>> assert_streaming_equivalent(cs.continual(layer, temporal_window=4), x,
        ...                             window_reference(layer, 4))
    """
    kinds = (nn.TransformerEncoder, nn.TransformerEncoderLayer)
    if window is None:
        return source
    if isinstance(source, kinds):
        return _SlidingWindows(source, window)
    if not any(isinstance(m, kinds) for m in source.modules()):
        return source
    import copy

    out = copy.deepcopy(source)
    replaced: list[str] = []
    for name, m in list(out.named_modules()):
        if isinstance(m, kinds) and not any(name.startswith(r + ".") for r in replaced):
            parent_name, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent_name), attr, _SlidingWindows(m, window))
            replaced.append(name)
    return out

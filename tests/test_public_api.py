"""The public namespace: sorted, documented, and free of optional heavy imports."""

from __future__ import annotations

import subprocess
import sys

import costream

OPTIONAL = ("matplotlib", "onnx", "torch_pruning")


def test_all_is_sorted_and_unique() -> None:
    names = list(costream.__all__)
    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_every_public_name_exists_and_is_documented() -> None:
    undocumented = []
    for name in costream.__all__:
        assert hasattr(costream, name), f"costream.{name} is listed in __all__ but missing"
        obj = getattr(costream, name)
        if name == "__version__":
            assert isinstance(obj, str) and obj
            continue
        if not (getattr(obj, "__doc__", None) or "").strip():
            undocumented.append(name)
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_import_does_not_load_optional_packages() -> None:
    code = (
        "import sys, costream\n"
        f"loaded = [m for m in {OPTIONAL!r} if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "", f"import costream loaded {out.stdout.strip()}"

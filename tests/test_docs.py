"""Every public name is documented with an example, and every public package has an API page."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("costream", "costream.testing", "costream.runtime", "costream.export",
            "costream.models", "costream.bench", "costream.prune", "costream.prune.adapters",
            "costream.prune.hf", "costream.audio", "costream.serve")


def _public(package: str) -> list[tuple[str, object]]:
    module = importlib.import_module(package)
    return [(name, getattr(module, name)) for name in module.__all__ if name != "__version__"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_has_a_docstring_with_an_example(package: str) -> None:
    module = importlib.import_module(package)
    missing = []
    for name, obj in _public(package):
        if inspect.isclass(obj) or inspect.isroutine(obj):
            doc = obj.__doc__ or ""  # its own docstring, not one inherited
        else:  # a constant: documented (with an example) in its package's docstring
            mentioned = re.search(rf"\b{name}\b", module.__doc__ or "")
            doc = (module.__doc__ or "") if mentioned else ""
        if ">>>" not in doc:
            missing.append(name)
    assert not missing, f"{package}: public names without a docstring example: {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_package_has_an_api_page(package: str) -> None:
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    assert re.search(rf"^::: {re.escape(package)}$", pages, flags=re.M), package


def test_every_doc_page_is_in_the_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    docs = ROOT / "docs"
    pages = [p.relative_to(docs).as_posix() for p in docs.rglob("*.md")]
    assert pages
    assert [p for p in pages if p not in config] == []


def test_deployment_guide_runs(tmp_path, monkeypatch) -> None:
    """The guide's examples run in order, in one namespace, and hold what they assert."""
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    page = ROOT / "docs" / "deployment.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
    assert namespace["engine"].active == [0]
    assert namespace["y"].shape == (1, 8)

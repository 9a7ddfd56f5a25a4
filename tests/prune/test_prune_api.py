"""The public namespaces of ``costream.prune``: sorted, documented, and every example runs."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import costream.prune
import costream.prune.adapters

PACKAGES = (costream.prune, costream.prune.adapters)
MODULES = sorted(
    f"{pkg.__name__}.{info.name}" for pkg in PACKAGES for info in pkgutil.iter_modules(
        pkg.__path__) if info.name.startswith("_"))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_is_sorted_and_documented(package) -> None:
    names = list(package.__all__)
    assert names == sorted(names) and len(names) == len(set(names))
    for name in names:
        obj = getattr(package, name)
        if isinstance(obj, dict):
            continue
        assert (obj.__doc__ or "").strip(), f"{package.__name__}.{name} has no docstring"


@pytest.mark.parametrize("name", [p.__name__ for p in PACKAGES] + MODULES)
def test_doctest_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0

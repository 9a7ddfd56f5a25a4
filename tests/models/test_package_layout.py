"""The zoo is split by family (video, skeleton, features) with no import cycle inside it."""

from __future__ import annotations

import ast
from pathlib import Path

import costream.models as zoo

ROOT = Path(zoo.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of ``costream.models`` that ``path`` imports, at the top or inside functions."""
    package = _module_name(path) if path.name == "__init__.py" else \
        _module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            if target.startswith("models"):
                out.add(target)
    return out


def test_no_import_cycle_between_the_registry_and_the_models() -> None:
    graph = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}
    assert "models.video._x3d" in graph and "models.skeleton._stgcn" in graph
    assert "models.features._oadtr" in graph
    assert graph["models._registry"] == set()  # the registry imports no model and no loader

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return [*path[path.index(nxt):], nxt]
            found = cycle_from(nxt, [*path, nxt])
            if found:
                return found
        return None

    assert [c for c in (cycle_from(m, [m]) for m in sorted(graph)) if c] == []


def test_public_names_stay_in_costream_models() -> None:
    for name in ("X3D", "ResNet3D", "STGCN", "OadTR", "CoOadTR", "create_model",
                 "load_checkpoint", "skeleton_graph", "load_thumos_features",
                 "kinetics400_classes"):
        assert name in zoo.__all__ and hasattr(zoo, name)
    assert len(zoo.kinetics400_classes()) == 400  # the data file moved with its module

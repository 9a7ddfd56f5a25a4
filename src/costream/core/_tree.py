"""Helpers for state pytrees: nested tuples, lists and dicts of tensors (and ``None``).

Every tensor leaf of a continual module's state has the batch (stream) dimension first, so a
per-stream operation (reset, gather, scatter) is one ``torch.where`` or index per leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

State = Any
"""A state pytree: ``None``, a tensor, or a tuple/list/dict of state pytrees."""


def tree_map(fn: Callable[..., Any], tree: State, *rest: State) -> State:
    """Apply ``fn`` to every tensor leaf of ``tree`` (and the matching leaves of ``rest``)."""
    if isinstance(tree, Tensor):
        return fn(tree, *rest)
    if tree is None or isinstance(tree, (int, float, bool, str)):
        return tree
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        out = [tree_map(fn, v, *(r[i] for r in rest)) for i, v in enumerate(tree)]
        return type(tree)(out)
    raise TypeError(
        f"state pytrees hold tensors, tuples, lists and dicts, not {type(tree).__name__}")


def tree_leaves(tree: State, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """Yield ``(path, tensor)`` for every tensor leaf, paths joined with ``.``."""
    if isinstance(tree, Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from tree_leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (tuple, list)):
        for i, v in enumerate(tree):
            yield from tree_leaves(v, f"{prefix}.{i}" if prefix else str(i))


def tree_where(mask: Tensor, new: State, old: State) -> State:
    """Per stream: take ``new`` where ``mask`` (shape ``(batch,)``) is true, else ``old``."""

    def pick(a: Tensor, b: Tensor) -> Tensor:
        m = mask.view(mask.shape + (1,) * (a.dim() - 1))
        return torch.where(m, a, b)

    return tree_map(pick, new, old)


def tree_check(expected: State, given: State, what: str = "state") -> None:
    """Raise ``ValueError`` naming the first leaf whose structure, shape, dtype differs."""
    exp = dict(tree_leaves(expected))
    got = dict(tree_leaves(given)) if _is_tree(given) else None
    if got is None:
        raise ValueError(f"{what} is not a state pytree (got {type(given).__name__})")
    missing = sorted(set(exp) - set(got))
    extra = sorted(set(got) - set(exp))
    if missing or extra:
        raise ValueError(
            f"{what} does not match this module: missing {missing}, unexpected {extra}")
    for k, e in exp.items():
        g = got[k]
        if g.shape != e.shape or g.dtype != e.dtype:
            raise ValueError(
                f"{what} leaf '{k}': expected shape {tuple(e.shape)} {e.dtype}, "
                f"got {tuple(g.shape)} {g.dtype}"
            )


def _is_tree(x: Any) -> bool:
    return x is None or isinstance(x, (Tensor, tuple, list, dict))


def tree_unflatten(template: State, leaves: list[Tensor]) -> State:
    """Rebuild a pytree shaped like ``template`` from its tensor leaves in
    :func:`tree_leaves` order."""
    it = iter(leaves)
    out = tree_map(lambda _: next(it), template)
    if next(it, None) is not None:
        raise ValueError("more leaves than the template holds")
    return out


def tree_index(tree: State, index: Tensor) -> State:
    """The streams ``index`` (a 1-D index tensor) of every leaf."""
    return tree_map(lambda t: t.index_select(0, index), tree)


def tree_index_copy(tree: State, index: Tensor, src: State) -> State:
    """Write ``src``'s streams into rows ``index`` of ``tree`` (in place); returns ``tree``."""
    tree_map(lambda t, s: t.index_copy_(0, index, s), tree, src)
    return tree

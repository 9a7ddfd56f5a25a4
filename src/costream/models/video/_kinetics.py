"""Kinetics-400 class names (Kay et al., arXiv 1705.06950), in the index order of the published
checkpoints of PyTorchVideo and PySlowFast (alphabetical)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("kinetics400.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 400:
        raise RuntimeError(f"kinetics400.txt holds {len(names)} class names, expected 400")
    return names


def kinetics400_classes() -> list[str]:
    """The 400 Kinetics-400 class names; index ``i`` names output ``i`` of the zoo classifiers.

    Example:
        >>> from costream.models import kinetics400_classes
        >>> names = kinetics400_classes()
        >>> len(names), names[0], names[-1]
        (400, 'abseiling', 'zumba')
    """
    return list(_names())

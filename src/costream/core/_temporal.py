"""Temporal geometry of a continual module and its composition rules.

A module maps an input stream to an output stream. Output ``j`` reads the input frames
``j * stride - padding ... j * stride - padding + receptive_field - 1``; ``end_padding`` frames are
appended when a finite stream is flushed. The output becomes due once its last input frame has
arrived, i.e. ``delay = receptive_field - 1 - padding`` steps after its first frame.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Temporal:
    """Receptive field, stride and padding of a stream-to-stream map (all in input frames).

    Args:
        receptive_field: number of input frames one output depends on.
        stride: input frames per output.
        padding: frames of start padding (negative: frames cropped at the start).
        end_padding: frames of end padding appended by ``forward_steps(..., pad_end=True)``.

    Example:
        >>> from costream import Temporal
        >>> conv = Temporal(receptive_field=3, stride=1, padding=1, end_padding=1)
        >>> conv.delay, conv.then(conv).receptive_field, conv.then(conv).delay
        (1, 5, 2)
    """

    receptive_field: int = 1
    stride: int = 1
    padding: int = 0
    end_padding: int = 0

    def __post_init__(self) -> None:
        # numpy integers (as PyTorchVideo builds geometry) become Python ints: the stepping code
        # tells an int age from a tensor of ages with isinstance(..., int)
        if not (type(self.receptive_field) is type(self.stride) is type(self.padding)
                is type(self.end_padding) is int):  # the common case costs one test per step
            for f in fields(self):
                object.__setattr__(self, f.name, as_int(getattr(self, f.name), f.name))

    @property
    def delay(self) -> int:
        """Steps between an output's first input frame and the step that emits it."""
        return self.receptive_field - 1 - self.padding

    @property
    def extent(self) -> int:
        """Output length change: ``T_out = (T_in + extent - 1) // stride + 1``."""
        return self.padding + self.end_padding - (self.receptive_field - 1)

    def out_length(self, t_in: int) -> int:
        """Number of outputs the offline module produces for ``t_in`` input frames."""
        return max(0, (t_in + self.extent - 1) // self.stride + 1)

    def then(self, nxt: Temporal) -> Temporal:
        """The geometry of ``self`` followed by ``nxt``."""
        s = self.stride
        rf = self.receptive_field + (nxt.receptive_field - 1) * s
        pad = self.padding + nxt.padding * s
        extent = self.extent + nxt.extent * s
        return Temporal(rf, s * nxt.stride, pad, extent - pad + rf - 1)


def as_int(value: Any, what: str) -> int:
    """``value`` as a Python ``int`` (numpy and other integer-likes accepted, floats refused).

    Example:
        >>> import numpy as np
        >>> from costream.core._temporal import as_int
        >>> type(as_int(np.int64(3), "stride"))
        <class 'int'>
    """
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r} "
                        f"({type(value).__name__})") from None


def as_ints(value: Any) -> Any:
    """Integer-likes, also inside tuples and lists, as Python ints; other values (``'same'``,
    ``None``) as they are."""
    if isinstance(value, (tuple, list)):
        return type(value)(as_ints(v) for v in value)
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        return value
    return operator.index(value)


IDENTITY = Temporal()

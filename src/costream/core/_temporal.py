"""Temporal geometry of a continual module and its composition rules.

A module maps an input stream to an output stream. Output ``j`` reads the input frames
``j * stride - padding ... j * stride - padding + receptive_field - 1``; ``end_padding`` frames are
appended when a finite stream is flushed. The output becomes due once its last input frame has
arrived, i.e. ``delay = receptive_field - 1 - padding`` steps after its first frame.
"""

from __future__ import annotations

from dataclasses import dataclass


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


IDENTITY = Temporal()

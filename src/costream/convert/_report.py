"""The one report of everything in a model that cannot stream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Blocker:
    """One operation that cannot stream: where it is, what it is, and why."""

    path: str    # module path ("" for the model itself)
    op: str      # the operation (module class, function or method name)
    line: str    # "file:line" of the source line, where known
    reason: str

    def __str__(self) -> str:
        where = f"'{self.path}'" if self.path else "the model itself"
        line = f" ({self.line})" if self.line else ""
        return f"{where}: {self.op}{line}: {self.reason}"


class NotStreamableError(TypeError):
    """Raised by :func:`costream.continual` with every operation that cannot stream.

    ``blockers`` lists them (module path, op, source line, reason); the message shows them all.

    Example:
        >>> import torch, costream as cs
        >>> class Norm(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = torch.nn.Conv1d(2, 2, 3)
        ...         self.norm = torch.nn.GroupNorm(1, 2)
        ...     def forward(self, x):
        ...         return self.norm(self.conv(x))
        >>> try:
        ...     cs.continual(Norm(), example=torch.randn(1, 2, 8))
        ... except cs.NotStreamableError as err:
        ...     print(err.blockers[0].path, err.blockers[0].op)
        norm GroupNorm
    """

    def __init__(self, model: str, blockers: list[Blocker]) -> None:
        self.blockers = list(blockers)
        lines = "\n".join(f"  - {b}" for b in self.blockers)
        n = len(self.blockers)
        super().__init__(f"cannot make {model} continual: {n} operation"
                         f"{'s' if n > 1 else ''} cannot stream:\n{lines}")

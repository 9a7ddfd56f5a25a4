"""``continual(model)``: convert a ``torch.nn`` model into a continual one, keeping its weights.

Resolution order for each module: a handler registered for its type
(:func:`register_handler`), then point-wise modules (kept unchanged), then tracing of its
``forward`` with ``torch.fx`` into a continual graph module.
"""

from ._registry import _HANDLERS, continual, convert_child, register_handler
from ._report import Blocker, NotStreamableError

__all__ = ["Blocker", "NotStreamableError", "_HANDLERS", "continual", "convert_child",
           "register_handler"]

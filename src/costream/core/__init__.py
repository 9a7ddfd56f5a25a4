"""The streaming contract: the continual module base, state pytrees and call modes."""

from ._mode import call_mode, current_call_mode
from ._module import CoModule
from ._temporal import Temporal
from ._tree import State, tree_leaves, tree_map, tree_where

__all__ = ["CoModule", "State", "Temporal", "call_mode", "current_call_mode", "tree_leaves",
           "tree_map", "tree_where"]

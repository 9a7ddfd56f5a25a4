"""Reusable contract assertions for continual modules (use them in your own tests)."""

from ._equivalence import assert_streaming_equivalent, tolerances

__all__ = ["assert_streaming_equivalent", "tolerances"]

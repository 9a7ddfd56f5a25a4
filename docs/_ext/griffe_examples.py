"""A griffe extension for the API pages: render ``Example:`` sections as examples.

costream's docstrings head their doctests ``Example:`` (singular). Griffe's Google parser only
treats ``Examples:`` as an examples section (code, highlighted as a Python console session) and
turns any other title into an admonition of Markdown text, where doctest output such as
``[True, False]`` reads as a link. This extension renames the section before parsing.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headers to ``Examples:`` in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)

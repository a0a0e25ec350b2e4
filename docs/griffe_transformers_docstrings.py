"""Griffe extension for the API reference: read modeling_barlow's transformers-style docstrings as
Google style. transformers writes "Example:" (Google style reads "Examples:", whose `>>>` lines it
renders as code) and ends some argument lines with ";" or "." where Google style wants ":"."""

from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
# `pixel_values (`torch.FloatTensor` of shape `(...)`);` as the first line of an argument
_ARGUMENT = re.compile(r"^(\s+\w+ \(`[^\n]*\))[;.]\s*$", re.MULTILINE)


class TransformersDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ARGUMENT.sub(r"\1:", value)

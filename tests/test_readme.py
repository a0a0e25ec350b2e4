"""Every ```python block of README.md runs as written, in order, in a fresh folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_snippets():
    assert len(BLOCKS) >= 5


def test_readme_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md block {index}", "exec"), namespace)
        except Exception as error:  # name the failing block, not just the exception
            pytest.fail(f"README block {index} failed: {error!r}\n{block}")

"""No code or documentation of ours uses transformers' deprecated checkpointing names (#31).

transformers 5.25 warns on `gradient_checkpointing_enable` and `is_gradient_checkpointing` and removes
them in v6; a user copying our README or our code must get the names that stay."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPRECATED = re.compile(r"\b(gradient_checkpointing_enable|gradient_checkpointing_disable|is_gradient_checkpointing)\b")
# transformers' common test of that name is overridden (skipped) by our tester: a definition, not a use.
OVERRIDE = re.compile(r"def test_gradient_checkpointing_enable_disable\(")


def _our_files() -> list[Path]:
    folders = ["modeling_barlow", "training", "hub", "barlow_cli", "examples", "benchmarks", "tests"]
    files = [path for folder in folders for path in (ROOT / folder).rglob("*.py")]
    return files + [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "model_card.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_no_deprecated_checkpointing_names():
    uses = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _our_files() if path.exists() and path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if DEPRECATED.search(line) and not OVERRIDE.search(line)
    ]
    assert not uses, "use activation_checkpointing_enable / is_activation_checkpointing:\n" + "\n".join(uses)

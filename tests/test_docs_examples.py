"""Every example of README.md and docs/ runs on its own (issue #35).

Sybil reads the Markdown (fenced blocks, and the HTML comments before them, which render invisibly);
each runnable block runs in a fresh process, in a fresh folder, with a fresh HF_HOME and
HF_HUB_OFFLINE=1, so nothing it uses can come from another block, this test process or the network.

The convention, written in the Markdown as an HTML comment on the line before a block:

- a ```python block runs unless it says `<!-- example: skip="the reason" -->`;
- a ```bash block runs only when it says `<!-- example: run -->` (most show commands on your data);
- `<!-- example: name=NAME -->` names a block, and `<!-- example: needs=NAME -->` runs that block
  of the same page (and what it needs, in turn) first, in the same folder, each in its own process:
  a block shares only files with the blocks it needs. Several words combine:
  `<!-- example: name=eval needs=pretrain run -->`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sybil import Document, Region
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, RawFencedCodeBlockLexer


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
TIMEOUT_S = 600

_FENCES = RawFencedCodeBlockLexer(info_pattern=re.compile(r"(?P<language>[\w+-]*)[^\n]*$\n", re.MULTILINE))
_DIRECTIVES = DirectiveInHTMLCommentLexer(directive="example")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    source: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def name(self) -> str | None:
        return self.options.get("name")

    @property
    def runs(self) -> bool:
        if self.language == "python":
            return "skip" not in self.options
        return self.language in SHELLS and "run" in self.options


def _fences(document: Document):
    for region in _FENCES(document):
        yield Region(region.start, region.end, parsed=("block", region.lexemes["language"], str(region.lexemes["source"])))


def _directives(document: Document):
    for region in _DIRECTIVES(document):
        yield Region(region.start, region.end, parsed=("directive", region.lexemes["arguments"]))


def _options(arguments: str, where: str) -> dict[str, str]:
    options = {}
    for word in shlex.split(arguments):
        key, _, value = word.partition("=")
        if key not in {"name", "needs", "run", "skip"}:
            raise ValueError(f"{where}: unknown example option {key!r} (name=, needs=, run, skip=)")
        options[key] = value
    return options


def parse_page(page: Path) -> list[Block]:
    """The page's fenced blocks, in order, each with the options of the `example:` comment before it."""
    document = Document.parse(str(page), _fences, _directives)
    blocks, pending = [], None
    for example in document.examples():
        kind, *rest = example.parsed
        # (the directive's region ends before its closing "-->")
        if pending is not None and not re.fullmatch(r"\s*(--+>)?\s*", document.text[pending.end:example.start]):
            raise ValueError(f"{page.name}:{pending.line}: an example: comment must come right before a block")
        if kind == "directive":
            pending = example
            continue
        language, source = rest
        options = _options(pending.parsed[1], f"{page.name}:{pending.line}") if pending is not None else {}
        pending = None
        blocks.append(Block(page, example.line, language, source, options))
    if pending is not None:
        raise ValueError(f"{page.name}:{pending.line}: an example: comment with no block after it")
    return blocks


BLOCKS = [block for page in PAGES for block in parse_page(page)]
RUNNABLE = [block for block in BLOCKS if block.runs]


def chain(block: Block) -> list[Block]:
    """The blocks `block` needs, transitively, earliest first (not `block` itself)."""
    named = {b.name: b for b in BLOCKS if b.page == block.page and b.name}
    needed: list[Block] = []
    current = block
    while "needs" in current.options:
        current = named[current.options["needs"]]
        needed.insert(0, current)
    return needed


def _environment(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTEST", "TRANSFORMERS_"))}
    # The commands (barlow-pretrain, ...) are this interpreter's console scripts.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home), MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false")
    return env


def _run(block: Block, folder: Path, scratch: Path) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    script = scratch / ("block.py" if block.language == "python" else "block.sh")
    script.write_text(block.source, encoding="utf-8")
    command = [sys.executable, str(script)] if block.language == "python" else ["bash", "-euo", "pipefail", str(script)]
    result = subprocess.run(
        command, cwd=folder, env=_environment(scratch / "hf_home"), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if result.returncode != 0:
        pytest.fail(
            f"{block.id} exited with {result.returncode}\n--- block ---\n{block.source}\n"
            f"--- stderr (end) ---\n{result.stderr[-6000:]}\n--- stdout (end) ---\n{result.stdout[-2000:]}",
            pytrace=False,
        )


# What each block left behind, per worker process, keyed by the text of the block and of the blocks it
# needs: a block that needs another starts from a copy of the folder that block (and what it needs)
# produced, and a block repeated word for word (the stand-in encoder of several pages, a README example
# that a page repeats) runs once per worker.
_DONE: dict[tuple[str, ...], Path] = {}


def _key(block: Block) -> tuple[str, ...]:
    return tuple(f"{step.language}\n{step.source}" for step in [*chain(block), block])


def _prepared(block: Block, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in which `block` and the blocks it needs have run, each once."""
    if _key(block) not in _DONE:
        needed = chain(block)
        folder = tmp_path_factory.mktemp("example")
        if needed:
            shutil.rmtree(folder)
            shutil.copytree(_prepared(needed[-1], tmp_path_factory), folder, symlinks=True)
        _run(block, folder, tmp_path_factory.mktemp("scratch"))
        _DONE[_key(block)] = folder
    return _DONE[_key(block)]


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_example_runs(block: Block, tmp_path_factory: pytest.TempPathFactory) -> None:
    _prepared(block, tmp_path_factory)


def test_conventions() -> None:
    """Names are unique per page, every `needs` names an earlier block of its page, skips give a
    reason, and the README still opens with the two commands (CI and the project's rules read them)."""
    problems = []
    for page in PAGES:
        blocks = [block for block in BLOCKS if block.page == page]
        names = [block.name for block in blocks if block.name]
        problems += [f"{page.name}: name {name!r} used twice" for name in set(names) if names.count(name) > 1]
        seen: set[str] = set()
        for block in blocks:
            need = block.options.get("needs")
            if need is not None and need not in seen:
                problems.append(f"{block.id}: needs {need!r}, which no earlier block of the page is named")
            if "skip" in block.options and not block.options["skip"].strip():
                problems.append(f"{block.id}: skip= must give the reason")
            if "run" in block.options and block.language not in SHELLS:
                problems.append(f"{block.id}: run marks shell blocks (python blocks run by default)")
            if block.name:
                seen.add(block.name)
    assert not problems, "\n".join(problems)
    first = [block for block in BLOCKS if block.page == ROOT / "README.md"][0]
    assert first.language == "bash" and first.source.startswith("make demo") and "\nmake test" in first.source
    assert len(RUNNABLE) >= 10


def test_the_readme_followed_in_one_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A reader who runs the README's examples one after another in one folder gets no collision (an
    output folder that a later command refuses to overwrite, exit 2) and no example that undoes another.
    The first block's own run (a fresh folder, as here) is reused; the others run after it."""
    first, *rest = [block for block in BLOCKS if block.page == ROOT / "README.md" and block.runs]
    assert not chain(first) and rest
    folder = tmp_path_factory.mktemp("readme")
    shutil.rmtree(folder)
    shutil.copytree(_prepared(first, tmp_path_factory), folder, symlinks=True)
    for block in rest:
        _run(block, folder, tmp_path_factory.mktemp("scratch"))


def test_the_getting_started_pages_start_with_pretraining() -> None:
    """The site's reading order: pretraining writes the encoder that the features and fine-tuning
    pages then use (their stand-in, saved only where no encoder exists, is for readers who start there)."""
    order = re.findall(r"getting-started/([\w-]+\.md)", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert order == ["pretraining.md", "features.md", "fine-tuning.md"], order

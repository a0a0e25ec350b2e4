"""MkDocs hook: the results page includes benchmarks/RESULTS.md (pymdownx.snippets), whose links and
images point into benchmarks/results/ relative to that file. The results page sits at the root of
the site, so those files are published under results/ there, and the included links resolve
unchanged."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and path.suffix in {".png", ".json", ".jsonl"}:
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files

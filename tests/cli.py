"""Running the commands as users do: the installed console scripts in a subprocess, or `main()` in
process for speed, reading back what the command wrote (its exit status is what `main` raises)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: where pip installed the console scripts


def script(name: str, *args: str, env: dict | None = None, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed console script ``name`` (e.g. ``barlow-pretrain``) offline and capture its output."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=environment, **kwargs)


def returning(main: Callable[[list[str]], None], result_file: str) -> Callable[[list[str]], dict]:
    """``main`` (which returns None, as console scripts must) as a function that returns the JSON
    ``result_file`` it wrote into ``--output_dir``."""

    def run(argv: list[str]) -> dict:
        assert main(argv) is None  # anything else would be printed, with status 1, by the console script
        output_dir = Path(argv[argv.index("--output_dir") + 1])
        return json.loads((output_dir / result_file).read_text())

    return run

"""Fetch the common model tests of the installed transformers (they ship in its sdist, not its wheel).

    python tests/fetch_transformers_tests.py      # run by `make test` and `make compat` at set-up

The sdist of exactly the installed version comes through pip (the tests import
`transformers.testing_utils` names that change between minor releases), and its `tests/` folder is
extracted to `<venv>/transformers-tests/<version>/tests`. Nothing is fetched when that folder exists.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def sdist_tests_dir(version: str | None = None, prefix: str = sys.prefix) -> Path:
    """Where the tests of transformers `version` (default: the installed one) live for this venv."""
    if version is None:
        from importlib.metadata import version as installed

        version = installed("transformers")
    return Path(prefix) / "transformers-tests" / version / "tests"


def fetch(version: str | None = None) -> Path:
    """Download and extract the sdist's tests unless already there; returns their folder."""
    target = sdist_tests_dir(version)
    if (target / "test_modeling_common.py").is_file():
        return target
    version = target.parent.name
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"transformers=={version}", "-d", download],
            check=True,
        )
        (archive,) = Path(download).glob("transformers-*.tar.gz")
        prefix = f"transformers-{version}/tests/"
        staging = target.parent / ".partial"
        with tarfile.open(archive) as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(f"transformers-{version}/"):]
            sdist.extractall(staging, members=members, filter="data")
        # Renamed into place last, so an interrupted fetch is retried rather than half-used.
        (staging / "tests").rename(target)
        staging.rmdir()
    return target


if __name__ == "__main__":
    print(fetch(sys.argv[1] if len(sys.argv) > 1 else None))

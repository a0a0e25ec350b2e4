"""The drift check's record (`make compat`): which versions the newest releases were, against the locked
set in constraints.txt, and how the whole suite went on them, read from pytest's junit xml.

    .venv-compat/bin/python benchmarks/compat.py --junit .venv-compat/junit.xml --output benchmarks/results/compat.json

Run with the python of the environment that was tested: the versions are read from its installed
distributions.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def locked_versions(constraints: Path) -> dict[str, str]:
    """name -> version of each `name==version` line of a constraints file."""
    pins = {}
    for line in constraints.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)\s*(#.*)?", line)
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def junit_outcomes(junit: Path) -> tuple[dict[str, int], list[str], float, str | None]:
    """(counts of passed/failed/errors/skipped, the failing tests by node id, pytest's time in s, when
    it started).

    The counts are the testsuite totals pytest writes, the numbers of its summary line with each of
    transformers' subtests counted as a test (the xml has no testcase element for every test)."""
    root = ElementTree.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts = {
        "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
        "failed": total["failures"],
        "errors": total["errors"],
        "skipped": total["skipped"],
    }
    failing = [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for case in root.iter("testcase")
        if any(child.tag in ("failure", "error") for child in case)
    ]
    return counts, failing, sum(float(suite.get("time", 0)) for suite in suites), suites[0].get("timestamp")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, required=True, help="pytest's --junitxml output")
    parser.add_argument("--constraints", type=Path, default=Path("constraints.txt"), help="the locked set")
    parser.add_argument("--output", type=Path, required=True, help="where to write the JSON record")
    args = parser.parse_args(argv)

    locked = locked_versions(args.constraints)
    versions = {name: {"tried": installed_version(name), "locked": pin} for name, pin in locked.items()}
    # Extras outside the suite (mutation testing) are locked but not installed for it.
    not_installed = sorted(name for name, v in versions.items() if v["tried"] is None)
    newer = sorted(name for name, v in versions.items() if v["tried"] not in (None, v["locked"]))
    counts, failing, seconds, started = junit_outcomes(args.junit)
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "pytest_started": started,
        "python": platform.python_version(),
        "versions": versions,
        "differ_from_locked": newer,
        "not_installed": not_installed,
        "tests": counts,
        "failing": failing,
        "pytest_seconds": round(seconds, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
          f"{counts['skipped']} skipped; differ from the lock: {', '.join(newer) or 'none'} -> {args.output}")


if __name__ == "__main__":
    sys.exit(main())

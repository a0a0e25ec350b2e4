"""The output-folder policy, as HF's trainers have it: a run never mixes with an earlier one.

A folder that holds an earlier run's files is refused unless the command is told to overwrite
it (which first removes that run's files, and only those) or to resume it. Problems with the
folder itself (a file, not writable) are found before any work starts. A command that fails
before writing anything into a folder it made takes the empty folder away again
(:func:`remove_empty_folders_made`, called by ``run_command``)."""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .command import UsageError

__all__ = ["prepare_output_dir", "remove_empty_folders_made"]

logger = logging.getLogger(__name__)

# The folders prepare_output_dir created in this process, parents before children.
_folders_made: list[Path] = []


def remove_empty_folders_made() -> None:
    """Remove the folders :func:`prepare_output_dir` created in this process that are still empty,
    deepest first. Folders that existed before, and anything with a file in it, stay."""
    while _folders_made:
        try:
            _folders_made.pop().rmdir()
        except OSError:  # something was written there (or another process removed it): keep it
            pass


def _earlier_files(folder: Path, run_files: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if any(fnmatch.fnmatch(p.name, pattern) for pattern in run_files))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output_dir(
    folder: str | os.PathLike,
    run_files: Sequence[str],
    *,
    overwrite: bool = False,
    resume: bool = False,
    option: str = "--output_dir",
    overwrite_option: str = "--overwrite_output_dir",
    resume_hint: str | None = None,
    holds: str = "holds an earlier run",
) -> Path:
    """Create ``folder`` (with its parents) and check that the run may write there.

    Args:
        folder: the output folder.
        run_files: glob patterns of the files and folders a run of this command writes (e.g.
            ``"checkpoint-*"``); ``("*",)`` for a folder that must be empty.
        overwrite: remove the earlier run's files first (only those matching ``run_files``;
            other files stay), on the main process of a launch.
        resume: the run continues the one in the folder; its files stay.
        option, overwrite_option, resume_hint, holds: how the message names the options and
            what the folder holds.

    Raises:
        UsageError: the folder is a file, cannot be created or written, or holds an earlier
            run and neither ``overwrite`` nor ``resume`` is given. Nothing is changed then.
    """
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {folder} is a file; give a folder (it is created if missing).")
    missing = [p for p in reversed((path, *path.parents)) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        _folders_made.extend(missing)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"{option} {folder} cannot be written ({reason}); choose a folder you can write to.") from None
    earlier = _earlier_files(path, run_files)
    if earlier and not resume:
        if not overwrite:
            shown = ", ".join(p.name for p in earlier[:5]) + (", ..." if len(earlier) > 5 else "")
            ways = [f"pass {overwrite_option} to replace it"]
            if resume_hint:
                ways.append(resume_hint)
            raise UsageError(
                f"{option} {folder} {holds} ({shown}). Choose another folder, or {' or '.join(ways)}."
            )
        if _is_main_process():
            for item in earlier:
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
            logger.info(f"{overwrite_option}: removed the earlier run's {len(earlier)} files and folders from {path}.")
    return path

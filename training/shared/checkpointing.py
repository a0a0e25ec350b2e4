"""Atomic training checkpoints: accelerate's `save_state` plus where the loop stood.

A checkpoint is written to a hidden temporary folder and renamed into place only when complete,
so an interrupted save is never taken for `latest`. Older checkpoints beyond `save_total_limit`
are deleted only once the new one is complete. Resuming from `latest` takes the newest checkpoint
that loads: a damaged one (a truncated file, say) is named and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

from barlow_cli import UsageError
from modeling_barlow import BarlowTwinsConfig, create_image_processor

__all__ = [
    "Checkpointer",
    "TrainerState",
    "append_history",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "truncate_history",
]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Where the training loop stood when a checkpoint was written."""

    global_step: int = 0
    epoch: int = 0
    examples_in_epoch: int = 0  # raw examples this process consumed in `epoch`
    # Batches of `epoch` this process took from each DataLoader worker; each process saves its own.
    worker_batches: list[int] = field(default_factory=list)
    skipped_images: int = 0
    wall_time_s: float = 0.0  # seconds in the training loop up to this checkpoint, resumed runs included


def _worker_batches_file(folder: Path, process_index: int) -> Path:
    return folder / f"worker_batches_{process_index}.json"


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    state: TrainerState,
    save_extra: Callable[[Path], None] | None = None,
    save_total_limit: int | None = None,
) -> Path:
    """Save model, optimizer, registered objects (the scheduler) and RNG states, atomically.

    Every process must call this (accelerate gathers what it needs); the main process renames the
    finished folder to `checkpoint-{global_step}`. `save_extra(folder)` runs on the main process
    before the rename, e.g. to add the config that lets `from_pretrained` load the folder. With
    `save_total_limit` N, only the newest N checkpoints are kept (HF's option of that name)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state.global_step}"
    partial = output_dir / f".checkpoint-{state.global_step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    _worker_batches_file(partial, accelerator.process_index).write_text(json.dumps(state.worker_batches))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The worker counts are per process: in worker_batches_<process>.json, not here.
        shared = {key: value for key, value in asdict(state).items() if key != "worker_batches"}
        (partial / STATE_FILE).write_text(json.dumps(shared, indent=2))
        if save_extra is not None:
            save_extra(partial)
        if final.exists():  # a checkpoint of the same step from an earlier run
            shutil.rmtree(final)
        partial.rename(final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[save_total_limit:]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class Checkpointer:
    """The run's checkpoints: `save()` writes one for `state` now, with the training time so far
    (a resumed run's earlier time included) and, beside the weights, the config and image
    processor, so that from_pretrained, barlow-eval and barlow-finetune load the folder."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, state: TrainerState,
                 config: BarlowTwinsConfig, save_total_limit: int | None = None) -> None:
        self.accelerator, self.output_dir, self.state = accelerator, Path(output_dir), state
        self.config, self.save_total_limit = config, save_total_limit
        self.resumed_wall_time, self.started = state.wall_time_s, time.perf_counter()

    @property
    def wall_time_s(self) -> float:
        """Seconds of training, earlier (resumed) parts included."""
        return self.resumed_wall_time + time.perf_counter() - self.started

    def save(self) -> Path:
        self.state.wall_time_s = round(self.wall_time_s, 2)
        return save_checkpoint(self.accelerator, self.output_dir, self.state, save_extra=self._save_config,
                               save_total_limit=self.save_total_limit)

    def _save_config(self, folder: Path) -> None:
        self.config.save_pretrained(folder)
        create_image_processor(self.config).save_pretrained(folder)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, newest (highest step) first."""
    candidates = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            candidates.append((int(match.group(1)), path))
    return [path for _, path in sorted(candidates, reverse=True)]


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[0] if found else None


class CheckpointMismatch(UsageError):
    """The checkpoint was saved by a run whose model has other shapes than this run's: resuming
    needs the options it was trained with (a usage error, exit status 2)."""


def load_checkpoint(
    accelerator: Accelerator,
    checkpoint: str | Path,
    output_dir: str | Path,
    check_compatible: Callable[[Path], None] | None = None,
) -> tuple[Path, TrainerState]:
    """Restore a checkpoint given as a folder, or as 'latest': the newest one in `output_dir`
    that loads. A damaged checkpoint is logged and skipped for the one before it;
    `check_compatible(folder)` (raising `CheckpointMismatch`) runs before each is loaded.

    Raises:
        FileNotFoundError: no complete checkpoint (or not a checkpoint folder).
        CheckpointMismatch: the checkpoint belongs to another model.
        ValueError: the named checkpoint is damaged, or every one in `output_dir` is.
    """
    if str(checkpoint) == "latest":
        candidates = list_checkpoints(output_dir)
        if not candidates:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}.")
    else:
        candidates = [Path(checkpoint)]
        if not (candidates[0] / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint}: not a complete checkpoint folder.")
    damaged = []
    for path in candidates:
        if check_compatible is not None:
            check_compatible(path)
        try:
            state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
            accelerator.load_state(str(path))
            worker_file = _worker_batches_file(path, accelerator.process_index)
            # (none in checkpoints from before it was kept: the loader then assumes even turns)
            state.worker_batches = json.loads(worker_file.read_text()) if worker_file.is_file() else []
        except CheckpointMismatch:
            raise
        except Exception as error:  # noqa: BLE001 - any file that does not load makes the checkpoint unusable
            if "size mismatch" in str(error):
                raise CheckpointMismatch(
                    f"{path} holds a model of other shapes than this run's (the backbone, its options or the "
                    "projector differ): pass the options it was trained with, or start a new run."
                ) from None
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            damaged.append(f"{path.name} ({reason})")
            logger.warning(f"Checkpoint {path} is damaged and was skipped: {reason}")
            continue
        return path, state
    raise ValueError(f"No checkpoint could be loaded: {'; '.join(damaged)}.")


def append_history(output_dir: str | Path, entry: dict, accelerator=None) -> None:
    """Add ``entry`` as one line of ``output_dir/log_history.jsonl`` (the main process writes it)."""
    if accelerator is None or accelerator.is_main_process:
        with open(Path(output_dir) / "log_history.jsonl", "a") as history:
            history.write(json.dumps(entry) + "\n")


def truncate_history(path: str | Path, step: int) -> dict:
    """Cut a log history (JSON lines, each with a ``step``) back to ``step``, where a resumed run
    continues: what the interrupted run logged after its checkpoint would otherwise appear twice.

    Returns the last entry kept, without its step (the metrics as they stood), or {} if none. A
    torn last line (a run killed while writing it) is dropped. The file is replaced atomically."""
    path = Path(path)
    if not path.is_file():
        return {}
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("step", step + 1) <= step:
            kept.append(entry)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    os.replace(partial, path)
    return {key: value for key, value in kept[-1].items() if key != "step"} if kept else {}

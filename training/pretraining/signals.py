"""Stopping a run cleanly on SIGTERM (what cluster schedulers send before they kill) or Ctrl-C.

The handler only records the request; the training loop finishes the step under way, agrees
with the other processes to stop at the same step, writes a checkpoint and exits non-zero. A
second Ctrl-C stops at once (the checkpoints already written are complete: saves are atomic).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

__all__ = ["StopRequests", "ignore_interrupts"]

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """A context manager that turns SIGTERM and SIGINT into a request the loop reads between steps.

    Example:
        >>> with StopRequests() as stop:
        ...     while not stop.requested:
        ...         ...  # one training step
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.signal_name = name
        logger.warning(f"Received {name}: stopping after the current step, with a checkpoint "
                       f"(press Ctrl-C again to stop at once).")


def ignore_interrupts(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group, and a worker that
    died of it would fail the main process's next read; the main process stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

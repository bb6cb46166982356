"""A debugging aid: log every step of a trio task that held the event loop longer than a threshold.

Every FUSE request is answered on the one event loop, so a task step that runs N ms without an await
delays every request by up to N ms (Synapse's reactor waits on those requests). Set
S3CACHEFS_DEBUG_SLOW_STEPS=MS in the daemon's environment to log, at WARNING, each step longer than MS
milliseconds with its task and the line where it next awaited (the end of the slow stretch), and
each garbage collection longer than MS, in whatever thread it ran: a collection holds the GIL, so the
loop waits for it even between its steps, where no step shows it. Off by default: it adds two clock
reads to every task step.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from typing import Any

import trio

log = logging.getLogger(__name__)

ENV = "S3CACHEFS_DEBUG_SLOW_STEPS"
_TRIO_DIR = os.path.dirname(trio.__file__)


class SlowSteps(trio.abc.Instrument):
    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._started = 0.0
        self._cpu = 0.0
        self._collections = SlowCollections(threshold)

    def before_run(self) -> None:
        gc.callbacks.append(self._collections)

    def after_run(self) -> None:
        gc.callbacks.remove(self._collections)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()
        self._cpu = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.perf_counter() - self._started
        if took < self.threshold:
            return
        # CPU time well under the wall time: the loop's thread was waiting (for the GIL held by a
        # worker thread, or for a CPU), not working.
        cpu = time.thread_time() - self._cpu
        # The innermost suspended frame outside trio itself: follow the await chain down.
        frame = None
        coro: object = task.coro
        while coro is not None:
            f = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if f is not None and _TRIO_DIR not in f.f_code.co_filename:
                frame = f
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        where = "?"
        if frame is not None:
            where = f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
        log.warning(
            "slow step: task %s held the event loop %.1f ms (%.1f ms of CPU); next await at %s",
            task.name,
            took * 1000,
            cpu * 1000,
            where,
        )


class SlowCollections:
    """A gc callback logging collections longer than the threshold (see the module's docstring)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._started: dict[int, float] = {}  # per thread: a collection runs in the thread that triggered it

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        me = threading.get_ident()
        if phase == "start":
            self._started[me] = time.perf_counter()
            return
        started = self._started.pop(me, None)
        if started is None:
            return
        took = time.perf_counter() - started
        if took >= self.threshold:
            log.warning(
                "slow garbage collection: generation %d took %.1f ms in thread %s (%d objects freed)",
                info["generation"],
                took * 1000,
                threading.current_thread().name,
                info["collected"],
            )


def from_env() -> list[trio.abc.Instrument]:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return []
    try:
        ms = float(value)
    except ValueError:
        log.warning("%s=%r is not a number of milliseconds; ignored", ENV, value)
        return []
    log.info("logging event-loop steps and garbage collections over %g ms (%s)", ms, ENV)
    return [SlowSteps(ms / 1000)]

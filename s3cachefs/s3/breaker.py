"""The deadline of one S3 operation and the circuit breaker (see client.S3._run)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .errors import CircuitOpen

if TYPE_CHECKING:
    pass


log = logging.getLogger(__name__)


_MiB = 1024 * 1024
# One S3 operation may take s3_deadline plus this per MiB it moves: 1 MiB/s is slower than any link a
# media store should sit on, so only a hung or unreachable S3 misses it.
DEADLINE_PER_MIB = 1.0
# While the circuit is open, the probe (S3.run) asks S3 this often, each time for at most
# PROBE_DEADLINE: S3 coming back is noticed within about a second, for one small LIST a second.
PROBE_EVERY = 1.0
PROBE_DEADLINE = 3.0
# Without the probe, the first call this long after the circuit opened (or after the last trial
# failed) is let through as a trial; while S3 is still hung, that caller waits a whole deadline.
HALF_OPEN_AFTER = PROBE_EVERY


class Breaker:
    """The circuit breaker in front of S3, so that a hung or unreachable S3 costs one caller a
    deadline and every other caller nothing, and abandoned worker threads cannot fill the limiter.

    closed    every call goes to S3.
    open      entered when a call misses its deadline or cannot connect (refused, connect timeout).
              Every call fails at once with CircuitOpen, before it takes a worker thread. Left when
              S3 answers anything (an error response too: this guards against silence, not errors):
              - the probe, S3.run, asks it every PROBE_EVERY s from a thread and client of its own;
              - without the probe (not started by the composition root), the first call
                HALF_OPEN_AFTER s after the circuit opened or the last trial failed goes to S3 as
                the trial (half-open; the others keep failing at once), and its outcome decides.
              A call that was already on its way when the circuit opened and then gets an answer
              closes it as well.
    Event loop only (no locks); logs once when the circuit opens and once when it closes.
    """

    def __init__(self) -> None:
        self.is_open = False
        self.probing = False  # S3.run is running
        self.opened_at = 0.0
        self.reason = ""
        self._next_trial = 0.0
        self._trial = False
        self._opened = trio.Event()

    def admit(self, what: str) -> bool:
        """Raise CircuitOpen if the call must not go to S3; True if it goes as the half-open trial."""
        if not self.is_open:
            return False
        if not self.probing and not self._trial and trio.current_time() >= self._next_trial:
            self._trial = True
            return True
        raise CircuitOpen(f"{what}: S3 unreachable; circuit open ({self.reason})")

    def trial_done(self) -> None:
        self._trial = False

    def unreachable(self, reason: str) -> None:
        now = trio.current_time()
        self._next_trial = now + HALF_OPEN_AFTER
        if self.is_open:
            return
        self.is_open = True
        self.opened_at = now
        self.reason = reason
        self._opened.set()
        log.warning("S3 unreachable (%s): circuit open, S3 calls fail at once until it answers", reason)

    def answered(self, by: str) -> None:
        if not self.is_open:
            return
        self.is_open = False
        self._opened = trio.Event()
        log.warning(
            "S3 answers again (%s): circuit closed after %.1f s", by, trio.current_time() - self.opened_at
        )

    async def wait_open(self) -> None:
        while not self.is_open:
            await self._opened.wait()


@dataclass
class Deadline:
    """When one S3 call must be over, on trio's clock: s3_deadline after it started plus
    DEADLINE_PER_MIB per MiB it moves, never later than `until` (the deadline of the operation it is
    part of). A GET learns its size from the response: moves() extends the deadline then."""

    start: float
    base: float
    until: float
    nbytes: int = 0
    scope: trio.CancelScope | None = None

    @property
    def at(self) -> float:
        return min(self.until, self.start + self.base + self.nbytes / _MiB * DEADLINE_PER_MIB)

    def moves(self, nbytes: int) -> None:
        """Event loop only."""
        self.nbytes = nbytes
        if self.scope is not None:
            self.scope.deadline = self.at

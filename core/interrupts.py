"""Stop requests that land on a step boundary.

A scheduler's signal (SLURM's time-limit USR2, ``scancel``'s SIGTERM) can
arrive anywhere, e.g. after the optimizer stepped but before that step's
metrics reached MLflow. Raised there, the checkpoint would record a step whose
metrics were never logged, and the resumed run would leave a hole in the
history. Signal handlers therefore hand their exception to ``STEP_BOUNDARY``:
while training holds it, the exception waits for ``at_boundary()``, where the
step is complete (updated, logged, checkpointed); anywhere else (data
preparation, evaluation) it is raised at once, as a plain handler would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class StepBoundary:
    """Defers an interrupt raised by a signal handler to the next completed step while training holds it."""

    def __init__(self) -> None:
        self._held = False
        self._pending: BaseException | None = None

    def interrupt(self, exc: BaseException) -> None:
        """Raise ``exc`` now, or, while a step is in flight, at the step's end (the first request wins)."""
        if not self._held:
            raise exc
        if self._pending is None:
            self._pending = exc

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Inside: interrupts wait for ``at_boundary()``; one still waiting at exit is raised then."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
        self.at_boundary()

    def at_boundary(self) -> None:
        """A step is complete: raise the interrupt that arrived during it, if any."""
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc

    @property
    def pending(self) -> bool:
        """Whether an interrupt is waiting for the step's end."""
        return self._pending is not None


STEP_BOUNDARY = StepBoundary()

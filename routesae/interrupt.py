"""Ctrl-C during training: finish the step, checkpoint, and say how to continue."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Interrupt:
    """Ctrl-C as a flag checked between steps, so a checkpoint never holds half a step.

    The first Ctrl-C sets ``requested``; a second one interrupts at once (``forced``), and then
    no checkpoint is written from the half-done step.
    """

    def __init__(self) -> None:
        self.hits = 0

    @property
    def requested(self) -> bool:
        return self.hits > 0

    @property
    def forced(self) -> bool:
        return self.hits > 1

    def _handler(self, signum: int, frame: Any) -> None:
        self.hits += 1
        if self.forced:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[Interrupt]:
        """Catch SIGINT while active (a no-op outside the main thread, where signals cannot be caught)."""
        try:
            previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

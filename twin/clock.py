"""Injected clocks: the core never reads the wall clock; whatever needs "now" is given one.

* :class:`SystemClock`: the real time, for the live service (staleness, watchdogs).
* :class:`ManualClock`: advanced by hand, for tests.
* :class:`ReplayClock`: maps event time to wall time at a speed, for paced replays.

Times are integer milliseconds since the Unix epoch (UTC), like the contract's ``ts_ms``;
``monotonic_s`` is for measuring durations only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Clock", "ManualClock", "ReplayClock", "SystemClock"]


class Clock(Protocol):
    """Something that tells the time."""

    def now_ms(self) -> int:
        """Return the current time, ms since the epoch (UTC)."""
        ...

    def monotonic_s(self) -> float:
        """Return a monotonic time in seconds, for durations."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a manual clock advances instead)."""
        ...


class SystemClock:
    """The machine's clock."""

    def now_ms(self) -> int:
        """Return the wall-clock time in ms since the epoch."""
        return time.time_ns() // 1_000_000

    def monotonic_s(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Sleep for real."""
        time.sleep(max(0.0, seconds))


@dataclass
class ManualClock:
    """A clock that moves only when told to.

    Examples:
        >>> clock = ManualClock(1_000)
        >>> clock.sleep(1.5)
        >>> clock.now_ms()
        2500
    """

    t_ms: int = 0
    _mono: float = field(default=0.0, repr=False)

    def now_ms(self) -> int:
        """Return the clock's time."""
        return self.t_ms

    def monotonic_s(self) -> float:
        """Return the clock's monotonic time."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.t_ms += round(seconds * 1000)
        self._mono += seconds

    def sleep(self, seconds: float) -> None:
        """Advance instead of waiting."""
        self.advance(max(0.0, seconds))


@dataclass
class ReplayClock:
    """Map event time to wall time: event time runs ``speed`` times faster than the wall.

    The first event seen anchors the mapping; :meth:`wait_until_ms` sleeps until an event
    time is due. ``now_ms`` returns the event time that corresponds to the wall clock now.
    """

    speed: float
    _anchor_event_ms: int | None = None
    _anchor_wall_s: float = 0.0

    def __post_init__(self) -> None:
        """Check the speed."""
        if self.speed <= 0:
            msg = "replay speed must be positive"
            raise ValueError(msg)

    def anchor(self, event_ms: int) -> None:
        """Tie ``event_ms`` to the wall clock's now."""
        self._anchor_event_ms = event_ms
        self._anchor_wall_s = time.monotonic()

    def now_ms(self) -> int:
        """Return the event time corresponding to the wall clock now."""
        if self._anchor_event_ms is None:
            return time.time_ns() // 1_000_000
        return self._anchor_event_ms + round((time.monotonic() - self._anchor_wall_s) * self.speed * 1000)

    def monotonic_s(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Sleep for real."""
        time.sleep(max(0.0, seconds))

    def wait_until_ms(self, event_ms: int) -> float:
        """Sleep until ``event_ms`` is due; return how late it was (s, >= 0)."""
        if self._anchor_event_ms is None:
            self.anchor(event_ms)
            return 0.0
        due = self._anchor_wall_s + (event_ms - self._anchor_event_ms) / 1000.0 / self.speed
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
            return 0.0
        return -delay

"""Progress on the log line: step / total, percent, elapsed time and an ETA from a smoothed step time."""

from __future__ import annotations

import time


def hms(seconds: float) -> str:
    """1d02:03:04 / 02:03:04 for a duration in seconds."""
    s = int(round(max(seconds, 0.0)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


class Progress:
    """ETA = steps left x an exponential average of the seconds per step (weight `beta` per step).

    The first logged window of a (re)start holds the start-up (worker spawn, first allocations,
    kernel selection): it is the estimate only until a later window replaces it."""

    def __init__(self, start_step: int, total: int, beta: float = 0.9):
        self.total, self.beta, self.last_step = total, beta, start_step
        self.t0 = time.perf_counter()
        self.step_time: float | None = None
        self._startup = True

    def update(self, step: int, window_step_time: float) -> None:
        n = max(step - self.last_step, 1)
        self.last_step = step
        if self.step_time is None:  # the start-up window: the only estimate there is
            self.step_time = window_step_time
            return
        if self._startup:  # the first window after start-up replaces it
            self.step_time, self._startup = window_step_time, False
            return
        a = 1.0 - self.beta ** n  # n steps in this window, each weighted as one
        self.step_time = (1 - a) * self.step_time + a * window_step_time

    def eta_s(self, step: int) -> float:
        return (self.total - step) * (self.step_time or 0.0)

    def text(self, step: int) -> str:
        pct = 100.0 * step / max(self.total, 1)
        return (f"{pct:.1f}% elapsed {hms(time.perf_counter() - self.t0)} "
                f"eta {hms(self.eta_s(step)) if self.step_time is not None else '?'}")

"""Progress lines for long phases: how far, how long so far, and an estimate of the time left.

Two shapes: ``Progress`` for a loop whose length is known (pre-training steps, feature batches,
clients answering), and ``ticker`` for one opaque call (dequantizing a backbone, fitting LDA),
where the estimate comes from a prior figure measured on a reference machine. Lines go to
Flower's logger, so they show once in ``flwr run --stream`` and in the SuperLink's log.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

log = logging.getLogger("flwr.fedgen_edge")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """``update()`` once per unit of work; a line at most every ``every_s`` seconds and one at
    the end: ``what: 120/400 steps, 31s, about 72s left``. A phase shorter than ``every_s``
    prints nothing (a per-round evaluation should not add a line per round)."""

    def __init__(self, what: str, total: int, unit: str = "", every_s: float = 10.0,
                 clock=time.monotonic) -> None:
        self.what, self.total, self.unit, self.every_s, self.clock = what, total, unit, every_s, clock
        self.done = 0
        self.t0 = self.last = clock()

    def eta_s(self) -> float | None:
        """Seconds left at the rate so far (None before the first unit is done)."""
        if self.done <= 0:
            return None
        return (self.clock() - self.t0) / self.done * (self.total - self.done)

    def line(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        elapsed = self.clock() - self.t0
        if self.done >= self.total:
            return f"{self.what}: {self.done}/{self.total}{unit} done in {_duration(elapsed)}"
        eta = self.eta_s()
        left = "" if eta is None else f", about {_duration(eta)} left"
        return f"{self.what}: {self.done}/{self.total}{unit}, {_duration(elapsed)}{left}"

    def update(self, n: int = 1, **extra: object) -> None:
        self.done += n
        now = self.clock()
        finished = self.done >= self.total and now - self.t0 >= self.every_s
        if finished or (self.done < self.total and now - self.last >= self.every_s):
            self.last = now
            more = "".join(f", {k.replace('_', ' ')} {v}" for k, v in extra.items())
            log.info("%s%s", self.line(), more)


@contextmanager
def ticker(what: str, expected_s: float, every_s: float = 10.0):
    """Around one call that cannot report its own progress: a line every ``every_s`` seconds
    with the time so far and the time left against ``expected_s`` (a measured prior), then the
    real duration."""
    stop = threading.Event()
    t0 = time.monotonic()
    log.info("%s: about %s", what, _duration(expected_s))

    def tick() -> None:
        while not stop.wait(every_s):
            elapsed = time.monotonic() - t0
            left = (f"about {_duration(expected_s - elapsed)} left" if elapsed < expected_s
                    else f"longer than the {_duration(expected_s)} estimated")
            log.info("%s: %s, %s", what, _duration(elapsed), left)

    thread = threading.Thread(target=tick, name=f"ticker: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        log.info("%s: done in %s", what, _duration(time.monotonic() - t0))

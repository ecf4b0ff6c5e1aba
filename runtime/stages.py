"""Several ``Pipeline.generate`` runs as one request (the hires fix's two passes, base + refiner): one progress
callback over all their steps, a stop in one run remembered so that the next is skipped (A1111's interrupt during
the first pass answers the first pass's image), and their timings summed."""

from __future__ import annotations

import time


class Stages:
    """The progress of runs of ``total`` steps in all: ``at(offset)`` is the callback of the run that starts at
    step ``offset``; ``stopped`` says whether a callback returned False (the runs after it are skipped)."""

    def __init__(self, callback, total: int):
        self.callback, self.total, self.stopped = callback, total, False

    def at(self, offset: int):
        if self.callback is None:
            return None

        def report(done: int, _total: int):
            go = self.callback(offset + done, self.total)
            if go is False:
                self.stopped = True
            return go

        return report


def summed_timings(first: dict, second: dict, t0: float) -> dict[str, float]:
    """The timings of two runs of one request (seconds per part, added) and the request's ``total`` since ``t0``."""
    timings = {k: first.get(k, 0.0) + second.get(k, 0.0) for k in first.keys() | second.keys()}
    timings["total"] = time.perf_counter() - t0
    return timings

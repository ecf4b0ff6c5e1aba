"""The engine thread of ``sdtrt serve``: one thread runs the engines (one process per GPU), requests wait for it on
the event loop; compatible txt2img requests that arrive within a short window share one engine call."""

from __future__ import annotations

import time


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests: answered 503 with Retry-After."""


class Job:
    """One request's work for the engine thread; its result goes back to the event loop that waits for it."""

    def __init__(self, loop, fn, images: int, key=None, req=None, plan=None):
        self.loop, self.fn, self.images, self.key = loop, fn, images, key
        self.req, self.plan = req, plan  # what a merged engine call needs of each request
        self.future = loop.create_future()
        self.cancelled = False  # the client went away or timed out: skipped if not started

    def _settle(self, ok: bool, value) -> None:
        def settle():
            if not self.future.done():
                (self.future.set_result if ok else self.future.set_exception)(value)

        self.loop.call_soon_threadsafe(settle)


class EngineWorker:
    """The one thread that runs the engines. Jobs run in arrival order; a job with a batching key waits up to the
    window for later jobs with the same key and runs with them as one engine call (``merge``), up to ``max_batch``
    images (a number, or a function of the key: each model has its own)."""

    def __init__(self, merge, window_s: float, max_batch: int):
        import threading
        from collections import deque

        self.merge, self.window_s, self.max_batch = merge, window_s, max_batch
        self.jobs: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="sdtrt-engine", daemon=True)
        self.thread.start()

    def put(self, job: Job) -> None:
        with self.cond:
            self.jobs.append(job)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()

    def _group(self, first: Job) -> list[Job]:
        """``first`` and the compatible jobs that arrive within the window (called with the lock held)."""
        group, size = [first], first.images
        limit = self.max_batch(first.key) if callable(self.max_batch) else self.max_batch
        deadline = time.monotonic() + self.window_s
        while size < limit:
            for job in [j for j in self.jobs if j.key == first.key and not j.cancelled]:
                if size + job.images <= limit:
                    self.jobs.remove(job)
                    group.append(job)
                    size += job.images
            left = deadline - time.monotonic()
            if left <= 0 or size >= limit:
                break
            self.cond.wait(left)
        return group

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.jobs and not self.stopped:
                    self.cond.wait()
                if self.stopped:
                    return
                job = self.jobs.popleft()
                if job.cancelled:
                    continue
                group = self._group(job) if job.key is not None and self.window_s > 0 else [job]
            try:
                results = self.merge(group) if len(group) > 1 else [job.fn()]
            except BaseException as ex:  # noqa: BLE001  (handed to the request that asked, as its error)
                for j in group:
                    j._settle(False, ex)
                continue
            for j, result in zip(group, results):
                j._settle(True, result)

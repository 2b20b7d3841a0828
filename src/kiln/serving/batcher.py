"""A dynamic batcher like Triton's: requests wait in one FIFO queue and a free worker turns its head into a batch.

The worker takes the oldest request, then the requests behind it in order while the batch stays within
`max_batch` images (it never skips one that does not fit: FIFO order is what keeps the tail bounded), and
waits for more to arrive until `max_queue_delay_ms` after the *oldest* request arrived. A batch leaves early
when it is full (or the next request would not fit), or when no more requests will come. One worker forms a
batch at a time, as Triton's scheduler does: two workers waiting on the same head would split a batch.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

from kiln.config.views import ShapeProfile
from kiln.core.errors import KilnError
from kiln.core.settings import describe, parse
from kiln.serving.arrivals import check_sizes


@dataclass(frozen=True)
class BatcherSettings:
    max_batch: int = field(metadata={"doc": "most images in one inference"})
    max_queue_delay_ms: float = field(metadata={"doc": "longest the oldest queued request waits for company; 0: no wait"})
    workers: int = field(default=1, metadata={"doc": "inferences in flight at once (Triton's instance count)"})

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None, where: str) -> BatcherSettings:
        missing = [k for k in ("max_batch", "max_queue_delay_ms") if k not in (raw or {})]
        if missing:
            raise KilnError(f"{where} needs {' and '.join(missing)}; keys: {describe(cls)}")
        return parse(cls, raw, where)

    def check(self, where: str) -> None:
        if self.max_batch < 1:
            raise KilnError(f"{where}.max_batch must be a batch size >= 1, got {self.max_batch}")
        if not math.isfinite(self.max_queue_delay_ms) or self.max_queue_delay_ms < 0:
            raise KilnError(
                f"{where}.max_queue_delay_ms must be >= 0 (0: batch only what is already queued), got {self.max_queue_delay_ms}"
            )
        if self.workers < 1:
            raise KilnError(f"{where}.workers must be >= 1 (inferences in flight at once), got {self.workers}")

    def check_against(self, profile: ShapeProfile, sizes: Mapping[int, float], where: str) -> None:
        """Refuse settings the engine or the traffic cannot live with, before any load is sent."""
        self.check(where)
        if not profile.contains(self.max_batch):
            raise KilnError(
                f"{where}.max_batch {self.max_batch} is outside the target's profile [{profile.min}, {profile.max}]: "
                "the engine could not run a full batch; lower max_batch or widen the profile"
            )
        largest = max(check_sizes(sizes, f"{where} served sizes"))
        if self.max_batch < largest:
            raise KilnError(
                f"{where}.max_batch {self.max_batch} is smaller than the largest request ({largest} images): "
                f"that request could never be scheduled; set max_batch >= {largest} or drop size {largest} from the distribution"
            )


@dataclass
class Queued:
    index: int
    arrival: float  # time.perf_counter() at the request's scheduled arrival
    size: int


class DynamicBatcher:
    """The queue and the batching rule; workers call `next_batch()` until it returns None."""

    def __init__(self, settings: BatcherSettings) -> None:
        self.settings = settings
        self._cond = threading.Condition()
        self._queue: deque[Queued] = deque()
        self._forming = False  # a worker holds the head of the queue and is waiting for it to fill
        self._closed = False  # no more requests will arrive: drain, then stop
        self._aborted = False  # stop now, leaving the queue as it is

    def put(self, item: Queued) -> None:
        with self._cond:
            self._queue.append(item)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _fitting(self) -> tuple[int, int]:
        """(requests, images) of the longest queue prefix within max_batch."""
        count = images = 0
        for item in self._queue:
            if images + item.size > self.settings.max_batch:
                break
            count, images = count + 1, images + item.size
        return count, images

    def next_batch(self) -> list[Queued] | None:
        """The next batch, in arrival order; None once the queue is closed and empty, or aborted."""
        delay_s = self.settings.max_queue_delay_ms / 1e3
        with self._cond:
            while True:
                if self._aborted:
                    return None
                if self._queue and not self._forming:
                    break
                if self._closed and not self._queue:
                    return None
                self._cond.wait()
            self._forming = True
            try:
                while True:
                    count, images = self._fitting()
                    full = images >= self.settings.max_batch or count < len(self._queue)
                    left = self._queue[0].arrival + delay_s - time.perf_counter()
                    if full or self._closed or self._aborted or left <= 0:
                        break
                    self._cond.wait(left)  # woken by each arrival, or at the deadline
                if self._aborted:
                    return None
                if count == 0:  # unreachable once check_against has passed: a request larger than max_batch
                    raise KilnError(f"a request of {self._queue[0].size} images is larger than max_batch {self.settings.max_batch}")
                return [self._queue.popleft() for _ in range(count)]
            finally:
                self._forming = False
                self._cond.notify_all()  # the next worker may take the new head

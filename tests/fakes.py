"""A session with a known service time, for the serving tests: sleeping takes no CPU from what else runs."""

from __future__ import annotations

import threading
import time
from typing import Mapping

import numpy as np


class FakeSession:
    """Sleeps a known service time per batch and returns zeros; can be told to fail on its n-th call."""

    input_names = ["input"]
    output_names = ["output"]

    def __init__(self, base_ms: float, per_image_ms: float = 0.0, fail_on: int | None = None) -> None:
        self.base_ms, self.per_image_ms, self.fail_on = base_ms, per_image_ms, fail_on
        self.calls = 0
        self.batches: list[int] = []
        self.took_ms: list[float] = []  # each call's real time in the sleep: what a true rate is computed from
        self._lock = threading.Lock()

    def service_ms(self, batch: int) -> float:
        return self.base_ms + self.per_image_ms * batch

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(feeds["input"])
        with self._lock:
            self.calls += 1
            self.batches.append(batch)
            if self.fail_on is not None and self.calls >= self.fail_on:
                raise RuntimeError("engine fell over")
        t0 = time.perf_counter()
        time.sleep(self.service_ms(batch) / 1e3)
        took = (time.perf_counter() - t0) * 1e3
        with self._lock:
            self.took_ms.append(took)
        return {"output": np.zeros((batch, 2), np.float32)}

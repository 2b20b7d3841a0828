"""Did the machine hold its speed while the open-loop search ran? A slow-down kiln cannot see as load (another VM's
steal time, a throttled CPU) lowers every rate of a search; measured here once before and once after it, and inside
every probe from the engine's own single-image inferences."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kiln.runtimes import Session
from kiln.serving.contention import timed


class SteadyCheck:
    """Did the machine hold its speed through the search? The engine's closed-loop median at the main batch, timed
    just before the open-loop probes and again after them: a machine slowed by a neighbour with no load kiln can see
    (another VM's steal, a throttled CPU) makes every rate of the search low, and the record then says so."""

    TOLERANCE = 1.10  # a slow-down beyond 10% is more than these machines' run-to-run noise at a fixed load
    # Between probes: single-image inferences beside the load generator and the batcher (more of them at higher rates)
    PROBE_TOLERANCE = 1.25
    PROBE_MIN = 10  # single-image inferences a probe needs for its median to count

    def __init__(self, session: Session, feeds: Mapping[str, Any], seconds: float = 0.5) -> None:
        self.session, self.feeds, self.seconds = session, feeds, seconds
        self.before = float(np.median(timed(session, feeds, seconds)))
        self.probes: list[tuple[float, float]] = []  # (offered rate, median ms of its single-image inferences)

    def probe(self, rate: float, batch: np.ndarray, compute_ms: np.ndarray) -> None:
        """A probe's requests (the batch each rode in, its inference's ms): the median of those that ran alone. The
        search ends seconds to minutes after the check before it; a host that slows and recovers in between (seen
        here: the same engine's inferences 20 then 27 ms a minute apart) shows only here."""
        alone = compute_ms[batch == 1]
        if len(alone) >= self.PROBE_MIN:
            self.probes.append((rate, float(np.median(alone))))

    def after(self) -> dict[str, Any]:
        after = float(np.median(timed(self.session, self.feeds, self.seconds)))
        change = after / self.before
        out: dict[str, Any] = {"before_p50_ms": self.before, "after_p50_ms": after, "change": change}
        whys = []
        if not 1 / self.TOLERANCE <= change <= self.TOLERANCE:
            whys.append(
                f"the engine's closed-loop median moved from {self.before:.4g} to {after:.4g} ms ({change:.2f}x) between the start "
                "and the end of the open-loop search: the machine's speed changed under it, so its rates are not this engine's "
                "alone (run again on a quiet machine)"
            )
        if len(self.probes) >= 2:
            (fast_rate, fast), (slow_rate, slow) = min(self.probes, key=lambda p: p[1]), max(self.probes, key=lambda p: p[1])
            out["probe_spread"] = slow / fast
            if slow / fast > self.PROBE_TOLERANCE:
                whys.append(
                    f"inside the search the engine's single-image inferences took {fast:.4g} ms (median, probe at "
                    f"{fast_rate:.4g} requests/s) and {slow:.4g} ms (at {slow_rate:.4g}), {slow / fast:.2f}x apart: the "
                    "machine's speed changed during the search, so its rates are not this engine's alone (run again on a "
                    "quiet machine)"
                )
        out["steady"] = not whys
        if whys:
            out["why"] = "; ".join(whys)
        return out

"""Did the machine hold its speed while the open-loop search ran? A slow-down kiln cannot see as load (another VM's
steal time, a throttled CPU) lowers every rate of a search; measured here, once before and once after it."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kiln.runtimes import Session
from kiln.serving.contention import timed


class SteadyCheck:
    """Did the machine hold its speed through the search? The engine's closed-loop median at the main batch, timed
    just before the open-loop probes and again after them: a machine slowed by a neighbour with no load kiln can see
    (another VM's steal, a throttled CPU) makes every rate of the search low, and the record then says so."""

    SECONDS = 0.5
    TOLERANCE = 1.10  # a slow-down beyond 10% is more than these machines' run-to-run noise at a fixed load

    def __init__(self, session: Session, feeds: Mapping[str, Any]) -> None:
        self.session, self.feeds = session, feeds
        self.before = float(np.median(timed(session, feeds, self.SECONDS)))

    def after(self) -> dict[str, Any]:
        after = float(np.median(timed(self.session, self.feeds, self.SECONDS)))
        change = after / self.before
        steady = 1 / self.TOLERANCE <= change <= self.TOLERANCE
        out: dict[str, Any] = {"before_p50_ms": self.before, "after_p50_ms": after, "change": change, "steady": steady}
        if not steady:
            out["why"] = (
                f"the engine's closed-loop median moved from {self.before:.4g} to {after:.4g} ms ({change:.2f}x) between the start "
                "and the end of the open-loop search: the machine's speed changed under it, so its rates are not this engine's "
                "alone (run again on a quiet machine)"
            )
        return out

"""How a headline figure of two runs compares: the change, and whether it is within the measured noise.

The metrics files (`reports/metrics/<target>.json`) carry `ms_per_image_spread_pct`: the spread of the timed
iterations at the main batch (the interquartile range over 1.349 x the median, in percent of the median; kiln.measure.benchmark).
ms/image and images/s come from those iterations, so a change in them no larger than the larger of the two runs'
spreads is within noise, not a change. Figures without a spread (older metrics files, served traffic, accuracy) are
compared as they are. The report's "Compared with ..." section and `kiln experiments` both use this.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

SPREAD_KEY = "ms_per_image_spread_pct"
SPREAD_OF = ("ms_per_image", "images_per_s")  # the figures the spread is of


def noise_pct(key: str, before: Mapping[str, Any], now: Mapping[str, Any]) -> float | None:
    """The noise band of `key` between two metrics files, in percent; None where they carry no spread for it."""
    if key not in SPREAD_OF:
        return None
    spreads = [m[SPREAD_KEY] for m in (before, now) if isinstance(m.get(SPREAD_KEY), (int, float)) and math.isfinite(m[SPREAD_KEY])]
    return max(spreads) if spreads else None


def compare(key: str, before: Mapping[str, Any], now: Mapping[str, Any], higher_better: bool) -> dict[str, Any] | None:
    """{"change_pct", "noise_pct", "within_noise", "better"} for `key`, or None when either side lacks it."""
    old, new = before.get(key), now.get(key)
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)) or isinstance(old, bool) or isinstance(new, bool):
        return None
    change = (new - old) / old * 100 if old else (0.0 if new == old else math.inf)
    noise = noise_pct(key, before, now)
    return {
        "change_pct": change,
        "noise_pct": noise,
        "within_noise": noise is not None and abs(change) <= noise,
        "better": (new > old) == higher_better and new != old,
    }


def describe(c: Mapping[str, Any]) -> str:
    """'+3.2%, within noise (spread 4.1%)', '-50.0% (better)', '+8.0% (worse)'."""
    if c["within_noise"]:
        return f"{c['change_pct']:+.1f}%, within noise (spread {c['noise_pct']:.2g}%)"
    return f"{c['change_pct']:+.1f}% ({'better' if c['better'] else 'worse'})"

"""A shape profile and batcher settings for a target, from the traffic it serves and its measured latency per batch.

The rule, in the order it is applied (each step is one sentence in the returned "why"):

- min: the smallest served request size: the batcher never forms a smaller batch.
- max: the largest measured batch whose single inference takes at most half the objective, and never below the
  largest served size (a request cannot be split). Half: the other half is for waiting in the queue and the
  batching delay; a batch that eats the whole objective alone only meets it when nobody else is waiting.
- opt: the smallest measured batch in [min, max] whose ms/image is within 10% of the best ms/image there: where
  per-image cost flattens. Under load the batcher forms batches up to max_batch, but beyond the knee a bigger
  batch buys little throughput and costs latency, so that is the shape worth tuning the engine for.
- batcher: max_batch = max (any batch that fits in half the objective may form under heavy load), and
  max_queue_delay_ms = (objective - latency(max)) / 2, floored at 0: a request that waits the whole delay and then
  rides in the largest batch still has half the slack left for the batch running ahead of it.

- extra profiles, for a runtime whose engine holds several (TensorRT): each served size that carries at least
  a fifth of the requests and is not opt gets a profile of its own (min = opt = max = that size), listed
  before the main one (a batch runs on the first profile that holds it), so the common requests run on kernels
  chosen for their shape instead of the main profile's (TensorRT tunes a profile's kernels for its opt: a size
  above opt is as far from it as one below).

Latency at an unmeasured batch is interpolated linearly between measured ones; beyond the largest measured batch
it grows in proportion to the batch (no further gain per image: the cautious guess).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

from kiln.config.views import ShapeProfile, check_target_name
from kiln.core.errors import KilnError
from kiln.serving.arrivals import check_sizes

KNEE = 1.10  # within 10% of the best ms/image counts as flat


def _measured(latency_ms_by_batch: Mapping[int, float]) -> dict[int, float]:
    if not latency_ms_by_batch:
        raise KilnError("no measured latency per batch size: benchmark the target first (reports/runs/<target>.json, latency)")
    out = {}
    for b, ms in latency_ms_by_batch.items():
        if (
            isinstance(b, bool)
            or not isinstance(b, (int, np.integer))
            or b < 1
            or not isinstance(ms, (int, float))
            or not math.isfinite(ms)
            or ms <= 0
        ):
            raise KilnError(f"latency per batch: batch {b!r} -> {ms!r} ms is not a batch size with a positive latency")
        out[int(b)] = float(ms)
    return dict(sorted(out.items()))


def latency_at(measured: Mapping[int, float], batch: float) -> float:
    """Milliseconds for one inference of `batch` (a mean batch may be fractional), from the measured batches (see the
    module docstring)."""
    sizes = sorted(measured)
    if batch in measured:
        return measured[batch]
    if batch < sizes[0]:
        return measured[sizes[0]]
    if batch > sizes[-1]:
        return measured[sizes[-1]] * batch / sizes[-1]
    below = max(b for b in sizes if b < batch)
    above = min(b for b in sizes if b > batch)
    return measured[below] + (measured[above] - measured[below]) * (batch - below) / (above - below)


MAIN_SHARE = 0.2  # a served size with this share of the requests earns a profile of its own, where the engine can hold several


def recommend_profile(
    sizes: Mapping[int, float],
    latency_ms_by_batch: Mapping[int, float],
    slo_ms: float,
    current: ShapeProfile,
    target_name: str,
    profiles: int = 1,
    inputs: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """{"profile": {min, opt, max}, "batcher": {max_batch, max_queue_delay_ms, workers}, "why", "warnings" (the
    sentences of why that put the objective at risk), "override", "changed"},
    and "extra_profiles" with "profiles_override" when the runtime's engines hold `profiles` > 1 shape profiles
    (`inputs`: each input's per-sample shape, to spell out the option)."""
    check_target_name(target_name)
    dist = check_sizes(sizes, f"targets.{target_name}.serve")
    measured = _measured(latency_ms_by_batch)
    if not math.isfinite(slo_ms) or slo_ms <= 0:
        raise KilnError(f"the latency objective must be a positive number of milliseconds, got {slo_ms!r}")
    served = [b for b, share in dist.items() if share > 0]
    smallest, largest = min(served), max(served)
    why = [f"min {smallest}: the smallest served request."]
    warnings = []  # the sentences of `why` that say the objective is at risk: the report shows these per target

    fitting = [b for b, ms in measured.items() if ms <= slo_ms / 2]
    top = max([largest, *fitting])
    if top == largest and latency_at(measured, largest) > slo_ms / 2:
        why.append(
            f"max {top}: the largest served request, although one inference of it takes {latency_at(measured, largest):.3g} ms, "
            f"more than half the {slo_ms:g} ms objective: expect queueing to break it under load."
        )
        warnings.append(why[-1])
    else:
        why.append(
            f"max {top}: the largest batch whose inference ({latency_at(measured, top):.3g} ms) fits in half the {slo_ms:g} ms objective."
        )
    if latency_at(measured, largest) > slo_ms:
        why.append(f"no setting meets the objective for {largest}-image requests: one inference alone is over {slo_ms:g} ms.")
        warnings.append(why[-1])

    per_image = {b: ms / b for b, ms in measured.items() if smallest <= b <= top}
    if per_image:
        best = min(per_image.values())
        opt = min(b for b, v in per_image.items() if v <= KNEE * best)
        why.append(
            f"opt {opt}: the smallest batch within 10% of the best ms/image in [{smallest}, {top}] "
            f"({per_image[opt]:.3g} vs {best:.3g} ms/image); bigger batches buy little throughput for their latency."
        )
    else:
        opt = smallest
        why.append(f"opt {opt}: no batch in [{smallest}, {top}] was measured, so the smallest served size.")

    delay = max(0.0, (slo_ms - latency_at(measured, top)) / 2)
    why.append(f"batcher: max_batch {top}, max_queue_delay_ms {delay:.3g} (half the objective left after the largest batch's inference).")
    profile = ShapeProfile(smallest, opt, top)
    t = target_name
    record: dict[str, Any] = {
        "profile": profile.to_params(),
        "batcher": {"max_batch": top, "max_queue_delay_ms": round(delay, 3), "workers": 1},
        "why": " ".join(why),
        "warnings": warnings,
        "changed": profile != current,
        "current": current.to_params(),
        "override": f"kiln params targets.{t}.profile.min={smallest} targets.{t}.profile.opt={opt} targets.{t}.profile.max={top}",
    }
    if profiles > 1:
        common = sorted((b for b, share in dist.items() if share >= MAIN_SHARE and b != opt), key=lambda b: -dist[b])[: profiles - 1]
        extra = [ShapeProfile(b, b, b) for b in sorted(common)]
        if extra:
            record["extra_profiles"] = [p.to_params() for p in extra]
            record["why"] += " " + " ".join(
                f"extra profile {p.opt}: {dist[p.opt]:.0%} of requests are {p.opt} image(s), "
                f"{'below' if p.opt < opt else 'above'} opt {opt}; "
                "a profile of its own, listed first, gives them kernels chosen for their shape."
                for p in extra
            )
            if inputs:
                spelled = [
                    {name: {k: [getattr(p, k), *shape] for k in ("min", "opt", "max")} for name, shape in inputs.items()}
                    for p in (*extra, profile)
                ]
                record["profiles_override"] = f"targets.{t}.options.profiles: {json.dumps(spelled, separators=(',', ':'))}"
    return record


def rate_step(open_loop: Mapping[str, Any]) -> float | None:
    """The lowest offered rate above an open-loop record's max rate at the SLO that failed the objective (its
    search's probes and confirmations): a rate the setting was measured not to hold. None when none failed."""
    rate = open_loop.get("max_rate_at_slo") or 0.0
    search = open_loop.get("search") or {}
    failed = [r for r, _, ok in [*(search.get("tried") or []), *(search.get("confirmed") or [])] if not ok and r > rate]
    return min(failed) if failed else None


def judge_recommendation(open_loop: Mapping[str, Any]) -> dict[str, Any] | None:
    """Whether an open-loop record's recommended batcher was measured better than the current one on the same
    engine in the same run: it must hold a rate within the objective at which the current batcher failed (a gap
    smaller than the rate search's step tells nothing). {"better", "current_rate", "recommended_rate" (None when
    not measured), "why", "apply" (the `kiln params` command, only when better)}; None without a
    recommendation."""
    rec = open_loop.get("recommended")
    if not rec:
        return None
    current, rb = open_loop["batcher"], rec.get("batcher") or {}
    cur_rate, rec_rate = open_loop.get("max_rate_at_slo") or 0.0, open_loop.get("recommended_max_rate_at_slo")
    out: dict[str, Any] = {"better": False, "current_rate": cur_rate, "recommended_rate": rec_rate, "apply": None}
    same = rb.get("max_batch") == current.get("max_batch") and rb.get("max_queue_delay_ms") == current.get("max_queue_delay_ms")
    stands = f"the current setting stands (max_batch {current['max_batch']}, max_queue_delay_ms {current['max_queue_delay_ms']:g})"
    if same:
        out["why"] = f"{stands}: the recommended batcher is the current one"
        return out
    if rec_rate is None:
        out["why"] = f"{stands}: the recommended batcher was not measured in this run" + (
            f" ({open_loop['recommended_note']})" if open_loop.get("recommended_note") else ""
        )
        return out
    step = rate_step(open_loop)
    both = f"{rec_rate:.1f} requests/s within the objective with the recommended batcher against {cur_rate:.1f} with the current one"
    if rec_rate > cur_rate and (step is None or rec_rate >= step * (1 - 1e-9)):
        out["better"] = True
        out["why"] = "measured better: " + both + (f", which failed at {step:.1f}" if step is not None else "")
        args = rec["override"].removeprefix("kiln params ").split() if rec.get("changed") and rec.get("override") else []
        if rb.get("max_batch") != current.get("max_batch") or args:
            args.append(f"serving.max_batch={rb['max_batch']}")
        if rb.get("max_queue_delay_ms") != current.get("max_queue_delay_ms"):
            args.append(f"serving.max_queue_delay_ms={rb['max_queue_delay_ms']:.4g}")
        out["apply"] = "kiln params " + " ".join(args)
    elif rec_rate > cur_rate:
        out["why"] = f"{stands}: {both}, a gap within the rate search's step (the current one failed only at {step:.1f})"
    else:
        out["why"] = f"{stands}: {both}"
    return out

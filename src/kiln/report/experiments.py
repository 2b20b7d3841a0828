"""`kiln experiments`: the experiments `dvc exp show` knows, as one short table.

`dvc exp show` puts every param and metric in a column of its own; with a dozen targets that is
hundreds of columns. This prints one row per experiment and target, with the params that differ
between experiments and the headline metrics only.

    kiln experiments                   # every experiment of the workspace's commit
    kiln experiments --target openvino --all-commits
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping, Sequence

from kiln.core.paths import METRICS
from kiln.report.changes import SPREAD_KEY, compare

METRICS_PREFIX = f"{METRICS.as_posix()}/"
COLUMNS = (
    # (metrics key, label, format, higher is better; None: the change is not shown)
    ("ms_per_image", "ms/image", ".4g", False),
    ("images_per_s", "images/s", ".1f", True),
    ("top1_agreement", "top-1 agreement", ".4f", None),
    ("served_images_per_s", "served images/s", ".1f", True),
)


def _flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, Mapping):
        for k, v in data.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], data


def rows_from_show(show: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten `dvc exp show --json` into {name, params: {dotted: value}, metrics: {target: {...}}} per revision."""
    rows = []

    def add(rev: Mapping[str, Any], fallback: str) -> None:
        data = rev.get("data") or {}
        if not data:
            return
        params = dict(_flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}))
        metrics = {
            path[len(METRICS_PREFIX) :].removesuffix(".json"): m.get("data") or {}
            for path, m in (data.get("metrics") or {}).items()
            if path.startswith(METRICS_PREFIX)
        }
        label = str(rev.get("name") or rev.get("rev") or data.get("rev") or fallback)
        rows.append({"name": label[:7] if len(label) == 40 else label, "params": params, "metrics": metrics})

    for commit in show:
        add(commit, commit.get("rev", "?"))
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev, "?")
    return rows


def changed_params(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = sorted({k for r in rows for k in r["params"]})
    return [k for k in keys if len({json.dumps(r["params"].get(k), sort_keys=True) for r in rows}) > 1]


def table(rows: Sequence[Mapping[str, Any]], targets: Sequence[str] = ()) -> str:
    """One row per experiment and target. Each target's first row (the workspace, or the first commit listed) is
    its reference: later rows show their change against it, or "within noise" where the metrics carry a spread
    (`ms_per_image_spread_pct`) at least as large as the change (kiln.report.changes)."""
    varying = changed_params(rows)
    header = ["experiment", "params that differ", "target", *(label for _, label, _, _ in COLUMNS), "spread"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(COLUMNS) + 1)]
    reference: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for row in rows:
        params = ", ".join(f"{k}={row['params'].get(k)}" for k in varying) or "-"
        for target, m in sorted(row["metrics"].items()):
            if (targets and target not in targets) or not m:
                continue
            ref = reference.setdefault(target, (row["name"], m))[1]
            cells = []
            for key, _, spec, higher_better in COLUMNS:
                value = m.get(key)
                cell = format(value, spec) if isinstance(value, (int, float)) else ""
                c = compare(key, ref, m, higher_better) if ref is not m and higher_better is not None else None
                if c is not None and cell:
                    cell += " (within noise)" if c["within_noise"] else f" ({c['change_pct']:+.1f}%)"
                cells.append(cell)
            spread = m.get(SPREAD_KEY)
            cells.append(f"±{spread:g}%" if isinstance(spread, (int, float)) else "")
            lines.append("| " + " | ".join([row["name"], params, target, *cells]) + " |")
    if reference:
        firsts = ", ".join(sorted({name for name, _ in reference.values()}))
        lines += [
            "",
            f"Changes are against each target's first row ({firsts}). Spread: of the timed iterations at the main batch, "
            "in percent; a change in ms/image or images/s no larger than the larger spread of the two rows is within noise.",
        ]
    return "\n".join(lines) + "\n"

"""The data `dvc plots` draws, the static PNG of the main chart, and the `kiln plots` commands.

The page `dvc plots show` writes (vega inlined, no network) is built by kiln.report.plots_page.

    kiln plots template [--out plots/offline.html]
    kiln plots png reports/plots reports/latency.png
    kiln plots latency-csv reports/plots reports/latency.csv

Everything heavy (matplotlib, vl_convert) is imported inside the function that needs it.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Mapping, Union

from kiln.core.atomic import atomic_path, write_text

PathLike = Union[str, "os.PathLike[str]"]

LATENCY_COLUMNS = ("batch", "ms_per_image", "images_per_s", "p50_ms", "p99_ms")


# --------------------------------------------------------------------------- plot data


def plot_csvs(source: Mapping[str, PathLike] | PathLike) -> dict[str, Path]:
    """{target: csv} from a mapping, or from a folder of `<target>.csv` (reports/plots/), sorted by name."""
    if isinstance(source, Mapping):
        return {str(k): Path(v) for k, v in source.items()}
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of per-target plot CSVs")
    return {p.stem: p for p in sorted(folder.glob("*.csv"))}


def read_latency(path: PathLike) -> list[dict[str, float]]:
    """Rows of one per-target CSV (batch,ms_per_image,images_per_s,...) as numbers, sorted by batch."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                parsed = {k: float(v) for k, v in row.items() if k and v not in (None, "")}
            except ValueError as exc:
                raise ValueError(f"{path}: not a number in row {row}: {exc}") from None
            if "batch" in parsed and "ms_per_image" in parsed:
                rows.append(parsed)
    return sorted(rows, key=lambda r: r["batch"])


def latency_table(source: Mapping[str, PathLike] | PathLike) -> tuple[list[dict[str, object]], list[str]]:
    """(rows of the long table target,batch,..., targets whose CSV holds no rows)."""
    rows: list[dict[str, object]] = []
    empty = []
    for target, path in plot_csvs(source).items():
        data = read_latency(path) if Path(path).is_file() else []
        if not data:
            empty.append(target)
        for r in data:
            rows.append({"target": target, **{k: (int(v) if k == "batch" else v) for k, v in r.items()}})
    return rows, empty


def latency_csv(source: Mapping[str, PathLike] | PathLike) -> str:
    """The long table `dvc plots` draws one line per target from: target,batch,ms_per_image,images_per_s,p50_ms,p99_ms."""
    rows, _ = latency_table(source)
    extra = sorted({k for r in rows for k in r} - {"target", *LATENCY_COLUMNS})
    columns = ["target", *LATENCY_COLUMNS, *extra]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: _fmt(r.get(c)) for c in columns})
    return buf.getvalue()


def write_latency_csv(source: Mapping[str, PathLike] | PathLike, out: PathLike) -> Path:
    """Write `latency_csv(source)` to `out` (atomically), e.g. reports/plots/ -> reports/latency.csv."""
    write_text(out, latency_csv(source))
    return Path(out)


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


# --------------------------------------------------------------------------- static PNG


def render_latency_png(
    source: Mapping[str, PathLike] | PathLike,
    out_png: PathLike,
    *,
    title: str = "ms per image against batch size",
    subtitle: str | None = None,
    dpi: int = 150,
) -> Path:
    """The main chart as a PNG (README, CI comments): ms per image against batch size, one line per target.

    `source` is {target: csv} or a folder of `<target>.csv` (reports/plots/). Targets whose CSV holds
    no rows (skipped on this machine) are named under the chart. Log-2 batch axis, ticks at the
    measured batch sizes; legend ordered fastest first at the largest batch. With no rows at all
    the PNG says so (the report stage declares it as an output). Written atomically; the same data
    gives the same bytes (no version or date in the PNG's metadata).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import FixedLocator, NullLocator

    rows, empty = latency_table(source)
    series: dict[str, list[dict[str, object]]] = {}
    for r in rows:
        series.setdefault(str(r["target"]), []).append(r)
    if not series:
        fig = Figure(figsize=(8.0, 4.6), dpi=dpi)
        fig.text(
            0.5,
            0.5,
            f"{title}\n\nno target was measured" + (f" ({', '.join(sorted(empty))} skipped)" if empty else ""),
            ha="center",
            va="center",
            fontsize=11,
            color="#444",
            wrap=True,
        )
        return _save_png(fig, out_png, dpi)

    def end_latency(item: tuple[str, list[dict[str, object]]]) -> float:
        return float(item[1][-1]["ms_per_image"])  # rows are sorted by batch

    ordered = sorted(series.items(), key=end_latency)
    batches = sorted({int(r["batch"]) for r in rows})

    fig = Figure(figsize=(8.0, 4.6), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    cmap = _palette(len(ordered))
    markers = "osD^vP*Xh<>"
    for i, (target, data) in enumerate(ordered):
        ax.plot(
            [int(r["batch"]) for r in data],
            [float(r["ms_per_image"]) for r in data],
            marker=markers[i % len(markers)],
            markersize=5,
            linewidth=1.8,
            color=cmap[i],
            label=target,
        )
    if len(batches) > 1:
        ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(batches))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in batches])
    if len(batches) > 1:
        lo, hi = batches[0], batches[-1]
        ax.set_xlim(lo / 2**0.25, hi * 2**0.25)
    ax.set_ylim(bottom=0, top=max(float(r["ms_per_image"]) for r in rows) * 1.08)
    ax.set_xlabel("batch size (images per call)")
    ax.set_ylabel("ms per image (lower is better)")
    ax.set_title(title if not subtitle else f"{title}\n{subtitle}", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(title="target (fastest first)", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if empty:
        fig.text(0.01, 0.005, "not measured: " + ", ".join(sorted(empty)), fontsize=7, color="#666", ha="left", va="bottom")
        fig.get_layout_engine().set(rect=(0, 0.035, 1, 0.965))  # room for the note
    return _save_png(fig, out_png, dpi)


def _save_png(fig, out_png: PathLike, dpi: int) -> Path:
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    return out


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]

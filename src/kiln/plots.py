"""DVC plots that render with no network, and the static PNG of the main chart.

`dvc plots show` / `dvc plots diff` write an HTML page whose default template loads vega, vega-lite
and vega-embed from a CDN (dvc-render's `VegaRenderer.SCRIPTS`, filled into the template's
`{scripts}` placeholder). `build_html_template` writes a page instead that inlines the three
libraries from `plots/node_modules` (installed by `npm ci --prefix plots` from the pinned
`plots/package-lock.json`) and has no `{scripts}` placeholder, so DVC's CDN tags never enter the
page. DVC requires only `{plot_divs}` (and fills `{refresh_tag}` when present).

The page also carries a small script that, once the charts have drawn, writes what it found into
`<script id="kiln-plots-status" type="application/json">` (one entry per chart: whether it drew,
its size and its position) and shows a visible message when vega failed to load. The tests read it
from headless Chromium's DOM.

    python -m kiln.plots template [--out plots/offline.html] [--node-modules plots/node_modules]
    python -m kiln.plots png reports/plots reports/latency.png
    python -m kiln.plots latency-csv reports/plots reports/latency.csv

Everything heavy (matplotlib) is imported inside the function that needs it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence, Union

from .atomic import atomic_path, write_text

PathLike = Union[str, "os.PathLike[str]"]

# Relative to the project root, where the stages run (as kiln.paths).
PLOTS_DIR = Path("plots")
NODE_MODULES = PLOTS_DIR / "node_modules"
HTML_TEMPLATE = PLOTS_DIR / "offline.html"
VEGA_TEMPLATES = PLOTS_DIR / "templates"

# Load order matters: vega-lite needs the global `vega`, vega-embed needs both.
PACKAGES = ("vega", "vega-lite", "vega-embed")
# What DVC replaces in an HTML template (dvc_render.html.HTML.embed): with str.replace, over the
# whole page, inlined libraries included. `{scripts}` is left out of our page on purpose.
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
LATENCY_COLUMNS = ("batch", "ms_per_image", "images_per_s", "p50_ms", "p99_ms")


class PlotsSetupError(RuntimeError):
    """The npm packages are missing or are not what the template can inline."""


# --------------------------------------------------------------------------- offline HTML template


def package_script(name: str, node_modules: PathLike = NODE_MODULES) -> tuple[str, Path]:
    """(version, path) of the browser build of npm package `name`: the file a CDN serves for it.

    jsDelivr serves a bare `npm/<name>@<version>` URL (what DVC's template loads) from the
    package.json's `jsdelivr` field, else `unpkg`, else `browser`; the same file is read here.
    """
    pkg_dir = Path(node_modules) / name
    manifest = pkg_dir / "package.json"
    if not manifest.is_file():
        raise PlotsSetupError(
            f"{manifest} not found: install the pinned vega packages with `npm ci --prefix {Path(node_modules).parent}`"
        )
    meta = json.loads(manifest.read_text(encoding="utf-8"))
    for field in ("jsdelivr", "unpkg", "browser"):
        rel = meta.get(field)
        if isinstance(rel, str) and (pkg_dir / rel).is_file():
            return meta["version"], pkg_dir / rel
    raise PlotsSetupError(f"{name}@{meta.get('version')}: no browser build named in {manifest} (jsdelivr/unpkg/browser)")


def inline_script(js: str, name: str = "script") -> str:
    """`js` made safe to sit inside an inline <script> element of a DVC HTML template."""
    js = re.sub(r"\n?//# sourceMappingURL=\S*\s*$", "\n", js)  # the .map is not shipped in the page
    for placeholder in DVC_PLACEHOLDERS:
        if placeholder in js:  # DVC's str.replace would splice plots (or CDN tags) into the library
            raise PlotsSetupError(f"{name} contains {placeholder!r}, which DVC replaces in HTML templates")
    # The HTML parser ends a script at `</script` whatever the JS means by it; `<!--` can switch it
    # into the "escaped" state. `<\/` and `<\!` mean the same inside JS strings and regexes.
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    return js.replace("<!--", "<\\!--")


# Runs after DVC's plot divs (each calls vegaEmbed at parse time). Reports per chart whether vega
# drew into it; a page whose libraries did not load says so on screen instead of staying blank.
_STATUS_SCRIPT = r"""
(function () {
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message || e)); });
  function charts() {
    return Array.prototype.filter.call(document.querySelectorAll("body > div[id]"), function (d) {
      return d.id !== "kiln-plots-message";
    });
  }
  function drawn(div) {
    var view = div.querySelector("svg.marks, canvas.marks");
    if (!view) return null;
    var r = view.getBoundingClientRect();
    var marks = view.tagName.toLowerCase() === "svg"
      ? view.querySelectorAll("path, line, rect, circle, text, symbol").length : null;
    return {renderer: view.tagName.toLowerCase(), width: Math.round(r.width), height: Math.round(r.height),
            x: Math.round(r.left + window.scrollX), y: Math.round(r.top + window.scrollY), svg_elements: marks};
  }
  function report(final) {
    var list = charts(), out = [], done = true;
    list.forEach(function (div) {
      var d = drawn(div);
      if (!d || !d.width || !d.height) done = false;
      out.push({id: div.id, drawn: !!(d && d.width && d.height), view: d});
    });
    if (!done && !final) return false;
    var status = {libraries: {vega: typeof vega !== "undefined" ? vega.version : null,
                              vegaLite: typeof vegaLite !== "undefined" ? vegaLite.version : null,
                              vegaEmbed: typeof vegaEmbed !== "undefined" ? vegaEmbed.version : null},
                  charts: out, errors: errors, complete: done};
    document.getElementById("kiln-plots-status").textContent = JSON.stringify(status);
    if (!status.libraries.vega || !status.libraries.vegaLite || !status.libraries.vegaEmbed) {
      var m = document.getElementById("kiln-plots-message");
      m.textContent = "kiln: vega did not load in this page, so the plots cannot draw. Rebuild the template: "
        + "npm ci --prefix plots && python -m kiln.plots template";
      m.style.display = "block";
    }
    return true;
  }
  var tries = 0;
  function poll() { if (!report(++tries >= 50)) setTimeout(poll, 100); }
  window.addEventListener("load", function () { setTimeout(poll, 50); });
})();
"""

_PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Generated by `python -m kiln.plots template` from plots/node_modules ({versions}).
         Offline: the libraries are inlined, and DVC's CDN <script> tags have no placeholder here.
         Do not edit or commit; re-generate instead. -->
{scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
        body > div[id] {{ margin: 12px 0 28px 0; }}
        #kiln-plots-message {{ display: none; padding: 12px; border: 2px solid #c00; color: #c00; }}
    </style>
</head>
<body>
    <div id="kiln-plots-message"></div>
    {{plot_divs}}
    <script id="kiln-plots-status" type="application/json">{{}}</script>
    <script>{status_script}</script>
</body>
</html>
"""


def build_html_template(node_modules: PathLike = NODE_MODULES) -> str:
    """The offline HTML template: vega, vega-lite and vega-embed inlined from `node_modules`."""
    tags, versions = [], []
    for name in PACKAGES:
        version, path = package_script(name, node_modules)
        js = inline_script(path.read_text(encoding="utf-8"), f"{name}@{version}")
        rel = path.relative_to(Path(node_modules) / name).as_posix()
        tags.append(f'    <script data-package="{name}@{version}" data-file="{rel}">\n{js}\n    </script>')
        versions.append(f"{name}@{version}")
    page = _PAGE.format(versions=", ".join(versions), scripts="\n".join(tags), status_script=_STATUS_SCRIPT)
    # The page must hold each DVC placeholder exactly where we put it, and nothing that loads from the web.
    if page.count("{plot_divs}") != 1 or "{scripts}" in page:
        raise PlotsSetupError("the template must hold `{plot_divs}` once and no `{scripts}`")
    return page


def write_html_template(out: PathLike = HTML_TEMPLATE, node_modules: PathLike = NODE_MODULES) -> Path:
    """Write the offline template to `out` (atomically); return its path."""
    write_text(out, build_html_template(node_modules))
    return Path(out)


def script_sources(html: str) -> list[str]:
    """The `src` of every <script> element in `html` (an offline page has none)."""
    return re.findall(r"<script\b[^>]*\bsrc\s*=\s*[\"']?([^\"'\s>]+)", html, flags=re.IGNORECASE)


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
        fig.text(0.5, 0.5, f"{title}\n\nno target was measured" + (f" ({', '.join(sorted(empty))} skipped)" if empty else ""),
                 ha="center", va="center", fontsize=11, color="#444", wrap=True)
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
            [int(r["batch"]) for r in data], [float(r["ms_per_image"]) for r in data],
            marker=markers[i % len(markers)], markersize=5, linewidth=1.8, color=cmap[i], label=target,
        )
    if len(batches) > 1:
        ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(batches))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in batches])
    if len(batches) > 1:
        lo, hi = batches[0], batches[-1]
        ax.set_xlim(lo / 2 ** 0.25, hi * 2 ** 0.25)
    ax.set_ylim(bottom=0, top=max(float(r["ms_per_image"]) for r in rows) * 1.08)
    ax.set_xlabel("batch size (images per call)")
    ax.set_ylabel("ms per image (lower is better)")
    ax.set_title(title if not subtitle else f"{title}\n{subtitle}", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(title="target (fastest first)", fontsize=8, title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    if empty:
        fig.text(0.01, 0.005, "not measured: " + ", ".join(sorted(empty)),
                 fontsize=7, color="#666", ha="left", va="bottom")
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


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.plots", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("template", help="write the offline HTML template for `dvc plots show/diff`")
    t.add_argument("--out", default=str(HTML_TEMPLATE))
    t.add_argument("--node-modules", default=str(NODE_MODULES))
    p = sub.add_parser("png", help="render the latency chart from a folder of <target>.csv to a PNG")
    p.add_argument("source", help="folder of per-target CSVs, e.g. reports/plots")
    p.add_argument("out", help="PNG to write, e.g. reports/latency.png")
    c = sub.add_parser("latency-csv", help="write the long latency table (target,batch,...) for `dvc plots`")
    c.add_argument("source")
    c.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.command == "template":
            out = write_html_template(args.out, args.node_modules)
            print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, no network needed")
        elif args.command == "png":
            print(render_latency_png(args.source, args.out))
        else:
            print(write_latency_csv(args.source, args.out))
    except (PlotsSetupError, FileNotFoundError, ValueError) as exc:
        print(f"kiln.plots: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

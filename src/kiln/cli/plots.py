"""`kiln plots`: the offline plot page for `dvc plots show`, the latency chart and its CSV (kiln.report.plots)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kiln.report.plots import render_latency_png, write_latency_csv
from kiln.report.plots_page import HTML_TEMPLATE, PlotsSetupError, library_versions, write_html_template


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln plots", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("template", help="write the offline HTML template for `dvc plots show/diff`")
    t.add_argument("--out", default=str(HTML_TEMPLATE))
    p = sub.add_parser("png", help="render the latency chart from a folder of <target>.csv to a PNG")
    p.add_argument("source", help="folder of per-target CSVs, e.g. reports/plots")
    p.add_argument("out", help="PNG to write, e.g. reports/latency.png")
    c = sub.add_parser("latency-csv", help="write the long latency table (target,batch,...) for `dvc plots`")
    c.add_argument("source")
    c.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.command == "template":
            out = write_html_template(args.out)
            v = library_versions()
            print(
                f"{out}: {out.stat().st_size / 1e6:.1f} MB, vega {v['vega']}, vega-lite {v['vega-lite']} and vega-embed "
                f"{v['vega-embed']} inlined (from vl-convert-python {v['vl-convert-python']}), no network needed"
            )
        elif args.command == "png":
            print(render_latency_png(args.source, args.out))
        else:
            print(write_latency_csv(args.source, args.out))
    except (PlotsSetupError, FileNotFoundError, ValueError) as exc:
        print(f"kiln.report.plots: {exc}", file=sys.stderr)
        return 1
    return 0

"""report: reports/benchmark.md and reports/summary.csv from the metrics of the targets in params (and only those)."""

import json
import logging

from kiln.config.slices import load_stage_params
from kiln.core import paths
from kiln.core.atomic import write_text
from kiln.pipeline.stage import run_stage
from kiln.report.markdown import load_results, render, stale_result_files, summary_csv, summary_rows
from kiln.report.plots import render_latency_png, write_latency_csv
from kiln.report.plots_page import HTML_TEMPLATE, PlotsSetupError, ensure_html_template
from kiln.report.sections import committed_metrics
from kiln.report.serving import curve_csv, curve_rows
from kiln.report.tuning import roofline
from kiln.report.verdict import verdict, verdict_lines


def main() -> None:
    log = logging.getLogger("kiln.report.markdown")
    params = load_stage_params("report")
    names = list(params.get("targets") or {})
    # A target set that shrank leaves the removed targets' files behind; they must not count anywhere
    # (the plots read every file in reports/plots/).
    for stale in stale_result_files(names, paths.METRICS, paths.RUNS, paths.PLOTS):
        log.info("removing %s: its target is no longer in params", stale)
        stale.unlink()
    results = load_results(names, paths.METRICS, paths.RUNS)
    validate = json.loads(paths.VALIDATE.read_text()) if paths.VALIDATE.is_file() else None
    export = json.loads(paths.EXPORT_MANIFEST.read_text()) if paths.EXPORT_MANIFEST.is_file() else None
    baseline = (params.get("report") or {}).get("baseline", "torch-eager")
    missing = [n for n in names if n not in results]
    previous = committed_metrics(names, paths.METRICS)
    rows = summary_rows(results, baseline, roofline({n: r for n, r in results.items() if not r["run"].get("skipped")}))
    write_text(paths.SUMMARY_CSV, summary_csv(rows))
    write_text(paths.SERVING_CSV, curve_csv(curve_rows({n: r for n, r in results.items() if not r["run"].get("skipped")})))
    plot_csvs = {n: paths.PLOTS / f"{n}.csv" for n in names}  # missing files count as "not measured"
    write_latency_csv(plot_csvs, paths.LATENCY_CSV)
    render_latency_png(plot_csvs, paths.LATENCY_PNG)
    write_text(paths.BENCHMARK_MD, render(results, validate, baseline, export, missing, previous, "HEAD", params.get("study")))
    log.info("%s: %d targets", paths.BENCHMARK_MD, len(results))
    if results:
        log.info("%s", verdict_lines(verdict(results))[0])  # the report's first line: the engine to ship and why
    # The page `dvc plots show` needs (.dvc/config), for a user who installed with pip and never ran
    # ./setup.sh. Not a declared output: it holds no result, and the plots can be drawn from any
    # revision's data. Without it the report is still good, so a failure here is a warning.
    try:
        if ensure_html_template():
            log.info("%s: built, for `dvc plots show` and `dvc plots diff`", HTML_TEMPLATE)
    except PlotsSetupError as exc:
        log.warning("%s", exc)


if __name__ == "__main__":
    run_stage(main)

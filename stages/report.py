"""report: reports/benchmark.md from the metrics of the targets in params (and only those)."""

import json
import logging

from kiln import paths
from kiln.atomic import write_text
from kiln.config import load_params
from kiln.report import load_results, render
from kiln.stage import run_stage


def main() -> None:
    params = load_params()
    names = list(params.get("targets") or {})
    results = load_results(names, paths.METRICS, paths.RUNS)
    validate = json.loads(paths.VALIDATE.read_text()) if paths.VALIDATE.is_file() else None
    export = json.loads(paths.EXPORT_MANIFEST.read_text()) if paths.EXPORT_MANIFEST.is_file() else None
    baseline = (params.get("report") or {}).get("baseline", "torch-eager")
    missing = [n for n in names if n not in results]
    write_text(paths.BENCHMARK_MD, render(results, validate, baseline, export, missing))
    logging.getLogger("kiln.report").info("%s: %d targets", paths.BENCHMARK_MD, len(results))


if __name__ == "__main__":
    run_stage(main)

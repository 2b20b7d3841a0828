"""Merge the results of per-hardware-class pipeline runs into this checkout (the fan-out's final job).

Each class job runs `dvc repro` for its own targets on hardware of that class, `dvc push`es, and
hands on its `dvc.lock` and `reports/` (a CI artifact). This script, run in the final job's checkout:

- copies each class's `calibrate@<t>`, `build@<t>` and `benchmark@<t>` entries into ./dvc.lock, so
  every class's engines can be pulled from the remote with the merged lock file;
- copies each class's per-target files (reports/metrics/<t>.json, reports/runs/<t>.json,
  reports/plots/<t>.csv: git-tracked, `cache: false`) into ./reports;
- refuses two classes that disagree about a shared stage (export, validate, ...): the classes must
  have started from the same shared outputs (the fan-out's first job), or their engines would come
  from different graphs.

`configure` and `report` are not merged: the final job re-runs them on the composed target set
(`dvc repro --single-item configure report`).

    python scripts/merge_results.py results/cpu results/gpu

where results/<class>/ holds that class job's dvc.lock and reports/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

PER_TARGET = ("calibrate", "build", "benchmark")
RERUN_HERE = ("configure", "report")  # the final job runs these itself
TARGET_FILES = (("metrics", ".json"), ("runs", ".json"), ("plots", ".csv"))


class MergeError(Exception):
    pass


def load_lock(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MergeError(f"{path}: no such file (each class result needs the dvc.lock its job wrote)")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return data


def merge(base: dict[str, Any], results: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged lock data, and for each per-target stage taken from a class result, that class's name."""
    stages: dict[str, Any] = dict(base.get("stages") or {})
    base_stages = dict(stages)
    taken: dict[str, tuple[str, Any]] = {}
    for name, lock in results.items():
        for stage, entry in (lock.get("stages") or {}).items():
            if stage in RERUN_HERE or base_stages.get(stage) == entry:
                continue
            if stage in taken and taken[stage][1] != entry:
                other = taken[stage][0]
                kind = "target" if stage.partition("@")[0] in PER_TARGET else "shared"
                raise MergeError(
                    f"{other} and {name} both changed the {kind} stage '{stage}', differently: "
                    + (
                        "a target belongs to one hardware class; list it in one class's target set only"
                        if kind == "target"
                        else "the classes must start from the same shared outputs (run the shared stages once, "
                        "push, and hand that dvc.lock to every class job)"
                    )
                )
            taken[stage] = (name, entry)
    for stage, (_, entry) in taken.items():
        stages[stage] = entry
    merged = dict(base)
    merged.setdefault("schema", "2.0")
    merged["stages"] = stages
    owners = {stage: name for stage, (name, _) in taken.items() if stage.partition("@")[0] in PER_TARGET}
    return merged, owners


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="one folder per class: its dvc.lock and reports/")
    parser.add_argument("--lock", type=Path, default=Path("dvc.lock"), help="the lock file to merge into (default: ./dvc.lock)")
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    try:
        base = load_lock(args.lock) if args.lock.is_file() else {}
        results = {str(d): load_lock(d / "dvc.lock") for d in args.results}
        merged, owners = merge(base, results)
    except MergeError as e:
        print(f"merge_results: error: {e}", file=sys.stderr)
        return 1
    targets: dict[str, set[str]] = {}
    for stage, name in owners.items():
        targets.setdefault(name, set()).add(stage.partition("@")[2])
    for name, names in sorted(targets.items()):
        for target in sorted(names):
            for folder, suffix in TARGET_FILES:
                src = Path(name) / "reports" / folder / f"{target}{suffix}"
                if src.is_file():
                    (args.reports / folder).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, args.reports / folder / src.name)
        print(f"{name}: {', '.join(sorted(names))}")
    tmp = args.lock.with_name(args.lock.name + ".tmp-merge")
    tmp.write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")
    tmp.replace(args.lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`kiln experiments`: the experiments `dvc exp show` knows, one row per experiment and target (kiln.report.experiments)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Sequence

from kiln.core.errors import KilnError
from kiln.report.experiments import rows_from_show, table


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kiln experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", default=[], help="only this target (repeatable)")
    parser.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")
    args = parser.parse_args(argv)
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["--all-commits"] if args.all_commits else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KilnError(f"`dvc {' '.join(cmd[3:])}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    rows = rows_from_show(json.loads(proc.stdout))
    if not rows:
        print("no experiments yet: `dvc exp run` (or `dvc repro`) first")
        return 0
    print(table(rows, args.target), end="")
    return 0

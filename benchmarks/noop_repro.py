"""A no-op `dvc repro` of kiln against one of a toy pipeline, timed side by side in the same run.

DVC's own per-stage work is most of a no-op, and the CPU moves the figure a lot, so kiln's cost is
judged against DVC itself: a toy pipeline of 12 trivial stages (one dep, one param, one out each).

    python benchmarks/noop_repro.py [--project .] [--rounds 5]

The project must have run `dvc repro` once (its dvc.lock up to date). Rounds alternate kiln and toy so
that a busy machine slows both alike; medians are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOY_STAGES = 12


def make_toy(root: Path) -> None:
    env = _env()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True, env=env)
    (root / "params.yaml").write_text("".join(f"p{i}: {i}\n" for i in range(TOY_STAGES)))
    stages = []
    for i in range(TOY_STAGES):
        (root / f"in{i}.txt").write_text(f"{i}\n")
        stages.append(f"  s{i}:\n    cmd: cp in{i}.txt out{i}.txt\n    deps: [in{i}.txt]\n    params: [p{i}]\n    outs: [out{i}.txt]\n")
    (root / "dvc.yaml").write_text("stages:\n" + "".join(stages))
    subprocess.run(["dvc", "repro", "-q"], cwd=root, check=True, env=env)


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def time_noop(project: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(["dvc", "repro"], cwd=project, env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage") and "probe" not in line]
    if result.returncode != 0 or ran:
        raise SystemExit(f"`dvc repro` in {project} was not a no-op (exit {result.returncode}; {ran[:3]}):\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".", type=Path)
    parser.add_argument("--rounds", default=5, type=int)
    args = parser.parse_args()
    project = args.project.resolve()
    stages = subprocess.run(["dvc", "stage", "list", "--all"], cwd=project, env=_env(), capture_output=True, text=True).stdout
    kiln_stages = len([line for line in stages.splitlines() if line.strip()])
    with tempfile.TemporaryDirectory() as tmp:
        toy = Path(tmp)
        make_toy(toy)
        time_noop(toy), time_noop(project)  # warm the file cache for both
        kiln, toys = [], []
        for _ in range(args.rounds):
            kiln.append(time_noop(project))
            toys.append(time_noop(toy))
    k, t = statistics.median(kiln), statistics.median(toys)
    print(f"| pipeline | stages | no-op `dvc repro`, median of {args.rounds} (s) | all rounds (s) |")
    print("|---|---:|---:|---|")
    print(f"| kiln ({project.name}) | {kiln_stages} | {k:.3f} | {', '.join(f'{x:.2f}' for x in kiln)} |")
    print(f"| toy | {TOY_STAGES} | {t:.3f} | {', '.join(f'{x:.2f}' for x in toys)} |")
    print(f"\nkiln / toy: {k / t:.2f}x (goal: at most 1.3x, and at most 1.5 s)")


if __name__ == "__main__":
    main()

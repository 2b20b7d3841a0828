"""Where the README's first command spends its time: `dvc repro` in a fresh clone, timed per stage.

    python benchmarks/stage_times.py [--setup] [--keep] [-- study=deep ...]

Clones this repository's HEAD into a temporary folder (committed work only, as a new user gets it), composes
params.yaml with the overrides after `--` (none: the embedded default, the quick study), runs `dvc repro` and
prints one row per stage: the wall time from DVC starting the stage to the next one (the interpreter, the
imports and DVC's own bookkeeping included) and the time the stage reported itself (kiln's "finished in"
line). With --setup the clone installs its own `.venv` through `./setup.sh` first and that is timed too (the
README's whole first command); without it the clone runs with this interpreter's environment.

Nothing else should run meanwhile: the script samples the machine's other load before and after and says so
when it was busy. The peak stage reuses a roof this machine measured before (~/.cache/kiln) unless you set
KILN_CACHE_DIR to an empty folder.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kiln.measure.machine_load import other_load  # noqa: E402
from kiln.runtimes import fingerprint  # noqa: E402

RUNNING = re.compile(r"^Running stage '([^']+)'")
FINISHED = re.compile(r"^kiln: (\S+) finished in ([\d.]+) s")


def cpu_model() -> str:
    """The CPU and its ISA features as the probe sees them (kiln.runtimes.fingerprint), and the cores."""
    return f"{fingerprint.describe_hardware(fingerprint.collect()['hardware'])}, {os.cpu_count()} cores"


def timed_repro(clone: Path, env: dict[str, str]) -> tuple[list[tuple[str, float, float | None]], float, int]:
    """[(stage, wall s, self-reported s)], total wall s, exit code: `dvc repro` streamed, each line timestamped."""
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    order: list[str] = []
    began: dict[str, float] = {}
    reported: dict[str, float] = {}
    for line in proc.stdout:
        now = time.perf_counter() - start
        sys.stdout.write(line) if os.environ.get("KILN_STAGE_TIMES_ECHO") else None
        if m := RUNNING.match(line):
            order.append(m.group(1))
            began[m.group(1)] = now
        elif m := FINISHED.match(line.strip()):
            reported[m.group(1)] = float(m.group(2))
    code = proc.wait()
    total = time.perf_counter() - start
    rows = []
    for i, stage in enumerate(order):
        end = began[order[i + 1]] if i + 1 < len(order) else total
        rows.append((stage, end - began[stage], reported.get(stage.split("/")[-1])))
    return rows, total, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="run ./setup.sh in the clone first and time it")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its reports/ and logs) and print where it is")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for `kiln params` (after --)")
    args = parser.parse_args()

    before = other_load(2.0)
    clone = Path(tempfile.mkdtemp(prefix="kiln-stage-times-")) / "kiln"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    setup_s = None
    if args.setup:
        t = time.perf_counter()
        subprocess.run(["./setup.sh"], cwd=clone, check=True, stdout=subprocess.DEVNULL)
        setup_s = time.perf_counter() - t
        bindir = clone / ".venv" / "bin"
    else:
        bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    if args.overrides:
        subprocess.run([str(bindir / "python"), "-m", "kiln", "params", *args.overrides], cwd=clone, env=env, check=True)
    rows, total, code = timed_repro(clone, env)
    after = other_load(2.0)

    print(f"\n`dvc repro` in a fresh clone, {' '.join(args.overrides) or 'the embedded default (quick study)'}; {cpu_model()}")
    print(f"other load before: {before.describe()}; after: {after.describe()}")
    print("\n| stage | wall s | in-stage s |\n|---|---:|---:|")
    for stage, wall, own in rows:
        print(f"| {stage} | {wall:.1f} | {'' if own is None else f'{own:.1f}'} |")
    if setup_s is not None:
        print(f"| ./setup.sh | {setup_s:.1f} | |")
    print(f"| **dvc repro, all** | **{total:.1f}** | |")
    if setup_s is not None:
        print(f"| **the README's first command** | **{setup_s + total:.1f}** | |")
    if before.busy or after.busy:
        print("\nthe machine was busy with other work: these times are high")
    if code != 0:
        print(f"\n`dvc repro` failed (exit {code}); the clone is kept at {clone}")
    if args.keep or code != 0:
        print(f"clone: {clone}")
    else:
        shutil.rmtree(clone.parent, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()

"""What every stage script shares: logging to the stage's log, and one clear line on a user error or a storage failure."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

SHELLS = frozenset({"sh", "dash", "bash", "zsh"})
# A folder: each stage writes the kiln modules it ran there (tests check that its code digest covers them).
TRACE = "KILN_TRACE_IMPORTS"


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process, from /proc; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return int(fields[1]), fields[19]


def _watched_ancestors() -> list[tuple[int, str]]:
    """The processes this stage lives for: the shell DVC runs the command through, and DVC itself."""
    out: list[tuple[int, str]] = []
    pid = os.getppid()
    for _ in range(3):
        stat = _stat(pid)
        if pid <= 1 or stat is None:
            break
        out.append((pid, stat[1]))
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            break
        if comm not in SHELLS:
            break
        pid = stat[0]
    return out


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))):
            children.setdefault(stat[0], []).append(int(entry.name))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def die_with_parent(interval_s: float = 0.5) -> None:
    """A stage whose `dvc repro` is killed (kill -9 leaves it no chance to stop its children) ends itself and
    every process it started, instead of running on as an orphan beside the next `dvc repro`. Linux only."""
    watched = _watched_ancestors()
    if not watched:
        return

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if any(_stat(pid) is None or _stat(pid)[1] != start for pid, start in watched):  # type: ignore[index]
                for pid in _descendants(os.getpid()):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                print("kiln: the pipeline that ran this stage is gone; stopping (no output was written)", file=sys.stderr)
                os._exit(137)

    threading.Thread(target=watch, name="kiln-die-with-parent", daemon=True).start()


def run_stage(main: Callable[[], None]) -> None:
    # Kiln's own progress at INFO; other libraries (onnxscript, DVC) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("kiln").setLevel(logging.INFO)
    if Path("/proc/self/stat").is_file():
        die_with_parent()
    started = time.perf_counter()
    try:
        from kiln.config.params import check_fresh

        check_fresh()
        main()
        # One line per stage in `dvc repro`'s output, the same wording every time: benchmarks/stage_times.py reads it.
        logging.getLogger("kiln").info("%s finished in %.1f s", stage_name(), time.perf_counter() - started)
    except KeyboardInterrupt:
        print("kiln: interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        from kiln.core.errors import user_message

        # A full disk or a failing one is named as such, whatever the library that hit it made of it.
        message = user_message(e)
        if message is None:
            raise
        print(f"kiln: error: {message}", file=sys.stderr)
        sys.exit(1)
    finally:
        if os.environ.get(TRACE):
            _write_trace(Path(os.environ[TRACE]))


def stage_name() -> str:
    """The stage as dvc.yaml names it: `stages/build.py onnxruntime` is build@onnxruntime."""
    return Path(sys.argv[0]).stem.replace("_", "-") + "".join(f"@{a}" for a in sys.argv[1:2])


def _write_trace(folder: Path) -> None:
    import json

    stage = stage_name()
    modules = sorted(name for name, module in sys.modules.items() if name.split(".")[0] == "kiln" and getattr(module, "__file__", None))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.json").write_text(json.dumps(modules))

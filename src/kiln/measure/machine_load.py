"""Is anything else using this machine's cores right now? A measurement taken beside other work is low.

Two cores shared with a test run or another pipeline gave a peak 2.5x below the machine's real one, and a
cached figure keeps such a mistake. `other_load` samples /proc/stat over a short window and subtracts
this process's own CPU time: what is left is other processes (and the hypervisor's steal), in cores.
Linux only; elsewhere it says it cannot tell.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

# Other work above this many cores' worth, while measuring, makes a figure suspect.
BUSY_CORES = 0.25


@dataclass(frozen=True)
class Load:
    cores: int
    others: float | None  # cores' worth of CPU time other processes (and steal) used in the window; None: unknown
    steal: float | None  # of which the hypervisor took (steal time), in cores

    @property
    def busy(self) -> bool:
        return self.others is not None and self.others > BUSY_CORES

    def describe(self) -> str:
        if self.others is None:
            return "unknown (no /proc/stat)"
        return f"{self.others:.2f} of {self.cores} cores used by other work" + (f" ({self.steal:.2f} stolen)" if self.steal else "")

    def to_dict(self) -> dict[str, object]:
        return {"cores": self.cores, "others": self.others, "steal": self.steal, "busy": self.busy}


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, steal) jiffies of all CPUs since boot."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    guest = sum(values[8:10]) if len(values) > 9 else 0  # counted in user/nice already
    return sum(values) - idle - guest, values[7] if len(values) > 7 else 0


def _process_jiffies(pid: int) -> int:
    """utime + stime of one process, in clock ticks; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _ancestors() -> list[int]:
    """This process's parents up to init: the `dvc repro` (and its shell) that runs a stage is not other work."""
    out, pid = [], os.getppid()
    while pid > 1 and len(out) < 8:
        out.append(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def other_load(seconds: float = 0.5) -> Load:
    """How many cores' worth of CPU other processes used over the next `seconds` (this process idles meanwhile).
    This process's ancestors are left out: DVC tidying up after the previous stage is the pipeline itself."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents = _ancestors()
    parents_before = sum(_process_jiffies(p) for p in parents)
    before, own_before, start = _cpu_jiffies(), sum(os.times()[:2]), time.monotonic()
    time.sleep(seconds)
    after, own_after, elapsed = _cpu_jiffies(), sum(os.times()[:2]), time.monotonic() - start
    if before is None or after is None:
        return Load(cores, None, None)
    parents_used = max(0, sum(_process_jiffies(p) for p in parents) - parents_before) / hz
    busy = (after[0] - before[0]) / hz - (own_after - own_before) - parents_used
    steal = (after[1] - before[1]) / hz
    online = os.cpu_count() or cores
    # /proc/stat counts every CPU of the machine; scale to the cores this process may use.
    scale = cores / online if online > cores else 1.0
    return Load(cores, max(0.0, busy / elapsed * scale), max(0.0, steal / elapsed * scale))


class LoadWatch:
    """The other processes' CPU use sampled before and after a measurement (`with LoadWatch() as load:`): a figure
    measured beside other work is low, and the record says so."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds
        self.before: Load | None = None
        self.after: Load | None = None

    def __enter__(self) -> "LoadWatch":
        self.before = other_load(self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.after = other_load(self.seconds)

    @property
    def busy(self) -> bool:
        return any(sample is not None and sample.busy for sample in (self.before, self.after))

    def describe(self) -> str:
        return "; ".join(f"{when}: {s.describe()}" for when, s in (("before", self.before), ("after", self.after)) if s is not None)

    def to_dict(self) -> dict[str, object]:
        return {
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
            "busy": self.busy,
        }

"""The peak stage's roof kept per machine across clones, and only when measured on a quiet machine."""

from __future__ import annotations

import subprocess
import sys

from kiln.measure import peak_cache
from kiln.measure.machine_load import other_load


def test_a_spinning_neighbour_makes_the_machine_busy():
    spin = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        load = other_load(1.0)
    finally:
        spin.kill()
        spin.wait()
    assert load.others is not None and load.others >= 0.5 and load.busy, load
    assert "cores used by other work" in load.describe()


def test_the_roof_is_kept_per_fingerprint_and_never_when_busy(tmp_path, monkeypatch):
    monkeypatch.setenv(peak_cache.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(peak_cache.KEEP_BUSY_ENV, raising=False)
    facts = {"peaks": {"fp32": {"macs_per_s": 1e11}}}
    assert peak_cache.load("machine A") is None
    assert peak_cache.store("machine A", facts, busy=True) is None  # a low roof must not outlive this clone
    assert peak_cache.load("machine A") is None
    path = peak_cache.store("machine A", facts, busy=False)
    assert path is not None and path.parent == tmp_path
    assert peak_cache.load("machine A") == {**facts, "reused_from": str(path)}
    assert peak_cache.load("machine B") is None  # another fingerprint: measured again
    monkeypatch.setenv(peak_cache.KEEP_BUSY_ENV, "1")
    assert peak_cache.store("machine B", facts, busy=True) is not None

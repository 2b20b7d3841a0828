"""The peak stage's measurement, kept per machine across clones of the project.

Measuring the roof takes ~25 s on two cores, and its answer depends only on what the stage depends on:
the machine and the runtimes' versions (artifacts/fingerprint.json). DVC's cache is per clone, so every
fresh clone (and every test project) measured again; this keeps one measurement per fingerprint in a
folder of the user's (KILN_CACHE_DIR, default ~/.cache/kiln). Only a measurement taken on a quiet machine
is kept (kiln.measure.machine_load): a roof measured beside other work is low, and a cache would keep the mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_ENV = "KILN_CACHE_DIR"
# "1": keep a measurement taken on a busy machine too (a test suite, whose roofline figures are not claims).
KEEP_BUSY_ENV = "KILN_PEAK_KEEP_BUSY"


def cache_file(fingerprint_text: str) -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kiln")
    return root / f"peak-{hashlib.sha256(fingerprint_text.encode()).hexdigest()[:16]}.json"


def load(fingerprint_text: str) -> dict[str, Any] | None:
    path = cache_file(fingerprint_text)
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {**facts, "reused_from": str(path)} if isinstance(facts, dict) and facts.get("peaks") else None


def store(fingerprint_text: str, facts: dict[str, Any], busy: bool) -> Path | None:
    """Keep `facts` for other clones on this machine; None (kept nowhere) when measured on a busy machine."""
    if busy and os.environ.get(KEEP_BUSY_ENV) != "1":
        return None
    from kiln.core.atomic import write_text

    path = cache_file(fingerprint_text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(facts, indent=1, sort_keys=True))
    except OSError:  # a read-only home: the stage's own output still holds the measurement
        return None
    return path

"""Write outputs so that an interrupted stage leaves nothing a later stage could take for good.

Everything goes to a temporary sibling first and is renamed into place only when
complete; a rename within one directory is atomic on POSIX file systems.

A process killed mid-write (SIGKILL, a power cut; Ctrl-C cleans up) leaves its temporary behind,
and a calibration's is tens of MB. Each write first removes the stale temporaries of the output it
writes, so every stage cleans exactly its own leftovers. A temporary is named after its owner,
`.<name>.tmp-<pid>@<host>-XXXXXXXX`, and is stale when that process is gone: two `dvc repro` in one
workspace (or two runs of the same stage) never remove each other's live work, however long a build
takes, which no age threshold can promise. A reused PID keeps a stale temporary (a leak, never a loss).
A temporary from another host (a workspace on a shared disk) or from a kiln before owners were
recorded cannot be checked that way and goes once untouched for a day.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)
UNCHECKABLE_STALE_AFTER_S = 24 * 3600
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@dataclass(frozen=True)
class FailedWrite:
    """The last write that failed in this process, with the free space when it failed: the temporary is
    removed right after, so a full disk looks empty again by the time the error is reported."""

    path: Path
    free: int | None
    error: BaseException


_last_failed: FailedWrite | None = None


def last_failed_write() -> FailedWrite | None:
    return _last_failed


def _prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{_prefix(path)}{os.getpid()}@{HOST}-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _last_touched(path: Path) -> float:
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.rglob("*")]
    return max(times)


def is_stale(tmp: Path, now: float | None = None) -> bool:
    """Whether `tmp`, a temporary sibling, belongs to no live writer (see the module's docstring)."""
    m = re.search(r"\.tmp-(\d+)@([0-9a-f]{8})-[^/]*$", tmp.name)
    if m and m[2] == HOST:
        return not _alive(int(m[1]))
    try:
        return (now or time.time()) - _last_touched(tmp) > UNCHECKABLE_STALE_AFTER_S
    except FileNotFoundError:
        return False  # its owner just renamed or removed it


def clean_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of `path` that no live process owns; returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in path.parent.glob(f"{glob.escape(_prefix(path))}*"):
        if is_stale(tmp):
            _remove(tmp, missing_ok=True)
            removed.append(tmp)
            log.info("removed %s, left by an interrupted write of %s", tmp, path)
    return removed


def _remove(path: Path, missing_ok: bool = False) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def _note_failure(final: Path, tmp: Path, error: BaseException) -> None:
    global _last_failed
    try:
        free: int | None = shutil.disk_usage(tmp.parent).free
    except OSError:
        free = None
    _last_failed = FailedWrite(final, free, error)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `path`, on failure it is removed."""
    final = Path(path)
    clean_stale(final)
    tmp = _tmp_sibling(final, is_dir)
    try:
        yield tmp
    except BaseException as e:
        _note_failure(final, tmp, e)
        _remove(tmp)
        raise
    # mkstemp/mkdtemp create private files; outputs are ordinary project files.
    os.chmod(tmp, 0o755 if is_dir else 0o644)
    if is_dir and final.exists():
        # Directories cannot be renamed over a non-empty target: move the old one aside first.
        old = _tmp_sibling(final, True)
        old.rmdir()
        final.rename(old)
        tmp.rename(final)
        _remove(old)
    else:
        os.replace(tmp, final)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _jsonable(data: Any) -> Any:
    """Non-finite floats (an engine that returns NaN) as the strings "nan"/"inf": valid JSON, still visible."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: _jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_jsonable(v) for v in data]
    return data


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")

"""Write outputs so that an interrupted stage leaves nothing a later stage could take for good.

Everything goes to a temporary sibling first and is renamed into place only when
complete; a rename within one directory is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `path`, on failure it is removed."""
    final = Path(path)
    tmp = _tmp_sibling(final, is_dir)
    try:
        yield tmp
    except BaseException:
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

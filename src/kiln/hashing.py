"""File digests, without importing any framework: the engine manifest and the export both record them."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative POSIX path -> sha256 of every file under `folder`, in sorted order, minus `exclude` (relative paths)."""
    root = Path(folder)
    return {rel: sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and (rel := p.relative_to(root).as_posix()) not in exclude}

"""File digests, without importing any framework: the engine manifest and the export both record them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest_files(named: Mapping[str, Path]) -> str:
    """One sha256 over (name, content digest) pairs, in the given order: what a stage depends on instead of the files."""
    h = hashlib.sha256()
    for name, path in named.items():
        h.update(name.encode() + b"\0" + hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()


def sha256_tree(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative POSIX path -> sha256 of every file under `folder`, in sorted order, minus `exclude` (relative paths)."""
    root = Path(folder)
    return {rel: sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and (rel := p.relative_to(root).as_posix()) not in exclude}

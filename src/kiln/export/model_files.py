"""The files a model is built from, digested for the cache: model.checkpoint, model.onnx, model.entrypoint's source, and
model.name where it is a file of the user's (an Ultralytics .pt or model YAML).

params.yaml names these files but does not hold them: a checkpoint retrained into the same path, or an
entrypoint module edited in place, changes no param. The probe (which runs on every `dvc repro`) writes
artifacts/model-files.json, which changes exactly when one of these files does; export, validate and
the builds of runtimes that build from the model depend on it.

An entrypoint's source is its module's file, or every Python file of its top-level package when that
package is the user's own (not installed under site-packages, where a version change re-runs the
probe's fingerprint instead). The module is found the way the stages import it (the project root
first, then sys.path), without importing it. Stdlib and PyYAML only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any, Mapping

# Re-hashing a large checkpoint on every `dvc repro` is wasted: a file whose size and mtime are unchanged
# keeps its digest (as DVC's own state does). Not an output of any stage.
STAT_CACHE = Path("artifacts/.model-files-stat.json")


def entrypoint_files(entrypoint: str, root: Path = Path(".")) -> list[Path]:
    """The source files of `module:function`; [] when the module cannot be found (configure names that)."""
    module = entrypoint.partition(":")[0]
    top, *rest = module.split(".")
    spec = PathFinder.find_spec(top, [str(root.resolve()), *sys.path])
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return []
    if spec.submodule_search_locations:  # a package
        package = Path(next(iter(spec.submodule_search_locations)))
        if "site-packages" not in package.parts and "dist-packages" not in package.parts:
            return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
        candidates = [package.joinpath(*rest).with_suffix(".py"), package.joinpath(*rest, "__init__.py")]
        return [p for p in candidates if p.is_file()][:1]
    return [Path(spec.origin)]


def _sha256(path: Path, cache: dict[str, Any]) -> str:
    st = path.stat()
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
        return str(hit["sha256"])
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    return h.hexdigest()


def model_files(model: Mapping[str, Any], root: Path = Path("."), cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """{checkpoint: {path, sha256}, entrypoint: {name: sha256}}: what the model is built from besides params."""
    cache = {} if cache is None else cache
    out: dict[str, Any] = {}
    for key in ("checkpoint", "onnx"):  # a file replaced in place changes no param
        if model.get(key):
            path = root / str(model[key])
            out[key] = {"path": str(model[key]), "sha256": _sha256(path, cache) if path.is_file() else None}
    name = str(model.get("name") or "")
    if name.endswith((".pt", ".yaml", ".yml")) and (root / name).is_file():  # an Ultralytics checkpoint or model YAML of the user's
        out["name"] = {"path": name, "sha256": _sha256(root / name, cache)}
    entrypoint = model.get("entrypoint")
    if entrypoint:
        files = entrypoint_files(str(entrypoint), root)
        base = root.resolve()
        out["entrypoint"] = {
            (p.resolve().relative_to(base).as_posix() if p.resolve().is_relative_to(base) else str(p)): _sha256(p, cache) for p in files
        }
    return out


def write_model_files(params_file: Path, out: Path, root: Path = Path(".")) -> None:
    """artifacts/model-files.json from params.yaml's model block, rewritten only when it changes."""
    import yaml

    from kiln.core.atomic import write_text

    params = yaml.safe_load(params_file.read_text(encoding="utf-8")) if params_file.is_file() else None
    model = (params or {}).get("model") or {}
    cache_path = root / STAT_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    known = dict(cache)
    text = json.dumps(model_files(model, root, cache), indent=1, sort_keys=True) + "\n"
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        write_text(out, text)
    if cache != known:
        write_text(cache_path, json.dumps(cache, sort_keys=True))

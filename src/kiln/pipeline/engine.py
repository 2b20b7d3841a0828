"""Engine folders: the runtime's files plus a manifest that says what they were built for.

A manifest records the target, requested and executed precision, profile, library
versions, hardware fingerprint, source ONNX hash and the sha256 of every engine file. Loading
checks it against this machine, so an engine never runs silently on hardware it was not built
for, and checks the files, so a truncated or replaced one is named as such instead of surfacing
as a runtime's parser error.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from kiln import __version__
from kiln.config.views import Target
from kiln.core.atomic import atomic_path
from kiln.core.errors import EngineMismatch, KilnError, summarize
from kiln.core.hashing import sha256_file, sha256_tree
from kiln.runtimes import BuildSource, Runtime, Session, fingerprint, get_runtime, runtime_info, skip_reason

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FILES = "files_sha256"  # relative path -> sha256 of each engine file, the manifest itself excepted
_unchecked_logged: set[Path] = set()


def library_versions(runtime: Runtime, machine: Mapping[str, Any]) -> dict[str, str]:
    """The versions of the libraries the runtime's engines depend on. Loading compares them with this machine's,
    so a library whose version is unknown would make that check compare nothing: refused."""
    if not runtime.libraries:
        raise KilnError(
            f"runtime '{runtime.name}' declares no libraries in kiln.runtimes.RUNTIMES: its engines could not be checked on load"
        )
    versions = {lib: machine["software"].get(lib) for lib in runtime.libraries}
    unknown = [lib for lib, version in versions.items() if version is None]
    if unknown:
        from kiln.runtimes.fingerprint import libraries

        names = {lib: libraries().get(lib, ()) for lib in unknown}
        raise KilnError(
            f"runtime '{runtime.name}' depends on {', '.join(unknown)}, but this machine's fingerprint has no version of "
            f"{'it' if len(unknown) == 1 else 'them'} (looked for the distributions {names}): install it, or declare the "
            f"distribution it ships as in kiln.runtimes.RUNTIMES, then re-run the probe (`dvc repro`)"
        )
    return {lib: str(version) for lib, version in versions.items()}


def build_engine(
    target: Target, source: BuildSource, engine_dir: str | Path, machine: Mapping[str, Any] | None = None, tuning: Any = None
) -> dict[str, Any]:
    """Build `target` into `engine_dir` (atomically) and return its manifest; a target with `tune: true` is then
    tuned (kiln.measure.tuning, with `tuning`: TuningSettings, default when None) and its manifest records the winner.

    An optional target this machine cannot run gets a manifest that says it was skipped, and why."""
    skipped = skip_reason(target)
    if skipped is None and runtime_info(target.runtime).from_model and source.model.onnx_only:
        skipped = (
            f"runtime '{target.runtime}' builds from the PyTorch model, and the model is only an ONNX file (model.onnx): "
            "give model.name or model.entrypoint too to build it"
        )
    runtime = get_runtime(target.runtime)
    machine = dict(machine or fingerprint.collect())
    engine_dir = Path(engine_dir)
    if skipped:
        manifest = {
            "kiln": __version__,
            "target": target.name,
            "runtime": target.runtime,
            "skipped": skipped,
            "precision": {"requested": target.precision, "executed": None},
            "hardware": machine["hardware"],
        }
        with atomic_path(engine_dir, is_dir=True) as tmp:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return manifest
    with atomic_path(engine_dir, is_dir=True) as tmp:
        start = time.perf_counter()
        extra = runtime.build(target, source, tmp)
        seconds = time.perf_counter() - start
        if target.tune:
            extra = _tune(runtime, target, source, tmp, extra, seconds, tuning)
        manifest = {
            "kiln": __version__,
            **_load_fields(target),
            "device": target.device,
            "precision": {"requested": target.precision, "executed": extra.pop("executed_precision", target.precision)},
            "versions": library_versions(runtime, machine),
            "hardware": machine["hardware"],
            "source_onnx_sha256": sha256_file(source.onnx_path),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(seconds, 3),
            **_calibration_info(source),
            **extra,
        }
        manifest[FILES] = sha256_tree(tmp, exclude=(MANIFEST,))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _load_fields(target: Target) -> dict[str, Any]:
    return {"target": target.name, "runtime": target.runtime, "profile": target.profile.to_params(), "options": target.options}


def _tune(
    runtime: Runtime, target: Target, source: BuildSource, folder: Path, extra: dict[str, Any], seconds: float, tuning: Any
) -> dict[str, Any]:
    """Search the runtime's knobs on the engine just built in `folder`; a winner that needed a build of its own
    replaces the folder's files. Returns the build fields of the engine kept, with the tuning record."""
    from kiln.measure.tuning import TuningSettings, tune_engine

    settings = tuning if tuning is not None else TuningSettings()
    log.info("%s: tuning %s's knobs for up to %g s", target.name, runtime.name, settings.budget_s)
    record, rebuilt, winner_extra = tune_engine(
        runtime, target, source, folder, {**extra, "_build_s": seconds}, settings, lambda t, e: {**_load_fields(t), **e}
    )
    if rebuilt is not None:
        for child in folder.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        for child in rebuilt.iterdir():
            shutil.move(str(child), folder / child.name)
        rebuilt.rmdir()
        extra = dict(winner_extra or {})
    log.info(
        "%s: tuned in %.1f s: %s (%.3f -> %.3f ms/image at batch %d)%s",
        target.name,
        record["seconds"],
        record["changed"] or "the default settings stay",
        record["default_ms_per_image"] or float("nan"),
        record["tuned_ms_per_image"] or float("nan"),
        record["batch"],
        f"; {record['stopped']}" if record.get("stopped") else "",
    )
    return {**extra, "tuning": record}


def _calibration_info(source: BuildSource) -> dict[str, Any]:
    from kiln.pipeline.calibrate import MARKER, read_marker

    if source.calibration_dir is None or not (source.calibration_dir / MARKER).is_file():
        return {}
    info = read_marker(source.calibration_dir)
    return {"calibration": info} if info.get("needed") else {}


def read_manifest(engine_dir: str | Path) -> dict[str, Any]:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise KilnError(f"{engine_dir} is not a kiln engine (no {MANIFEST}); build it with `dvc repro build@<target>`")
    return json.loads(path.read_text(encoding="utf-8"))


def check_compatible(manifest: Mapping[str, Any], machine: Mapping[str, Any]) -> None:
    """Refuse an engine built for other hardware or other library versions than this machine has."""
    rebuild = f"rebuild it here with `dvc repro build@{manifest.get('target', '<target>')}`"
    if manifest.get("hardware") != machine["hardware"]:
        raise EngineMismatch(
            f"engine '{manifest.get('target')}' was built for {fingerprint.describe_hardware(manifest.get('hardware') or {})}, "
            f"but this machine is {fingerprint.describe_hardware(machine['hardware'])}: {rebuild}"
        )
    for lib, built in (manifest.get("versions") or {}).items():
        here = machine["software"].get(lib)
        if built != here:
            raise EngineMismatch(f"engine '{manifest.get('target')}' was built with {lib} {built}, this machine has {here}: {rebuild}")


def check_files(engine_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """Refuse an engine whose files are missing or changed since the build (a truncated copy, a
    replaced file): each runtime would otherwise fail in its own words, naming no file or cause."""
    engine_dir = Path(engine_dir)
    recorded = manifest.get(FILES)
    if recorded is None:
        # Built before kiln recorded file hashes: still loads, unchecked.
        if engine_dir.resolve() not in _unchecked_logged:
            _unchecked_logged.add(engine_dir.resolve())
            log.info("engine %s has no file hashes in its manifest (built by an older kiln): its files are not checked", engine_dir)
        return
    # -s: this engine only; -f alone would also re-run the export, validation and calibration upstream.
    rebuild = f"rebuild it with `dvc repro -f -s build@{manifest.get('target', '<target>')}`"
    for rel, digest in recorded.items():
        path = engine_dir / rel
        if not path.is_file():
            raise KilnError(
                f"engine '{manifest.get('target')}' is incomplete: {path} is missing (it was there when the engine was built); {rebuild}"
            )
        if sha256_file(path) != digest:
            raise KilnError(
                f"engine '{manifest.get('target')}' is broken: {path} was changed after the build "
                f"(its sha256 no longer matches {engine_dir / MANIFEST}); {rebuild}"
            )


def load_engine(engine_dir: str | Path, target: Target, machine: Mapping[str, Any] | None = None) -> tuple[Session, dict[str, Any]]:
    """A ready session for the engine in `engine_dir`, after checking it was built for this machine and is intact."""
    manifest = read_manifest(engine_dir)
    if manifest.get("skipped"):
        raise KilnError(f"engine '{manifest.get('target')}' was skipped when built: {manifest['skipped']}")
    check_compatible(manifest, machine or fingerprint.collect())
    check_files(engine_dir, manifest)
    runtime = get_runtime(manifest["runtime"])
    from kiln.measure.tuning import tuned_target

    try:
        return runtime.load(Path(engine_dir), manifest, tuned_target(target, manifest)), manifest
    except KilnError:
        raise
    except Exception as e:
        # The runtime's own error, whole and chained: an unhashed (older) engine or a runtime's own limit.
        raise KilnError(
            f"{runtime.name} cannot load engine {engine_dir}: {type(e).__name__}: {summarize(e)}; "
            f"if its files were damaged, rebuild it with `dvc repro -f -s build@{manifest.get('target', '<target>')}`"
        ) from e

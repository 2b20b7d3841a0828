"""The pipeline's shape derived from params: which targets get a calibrate stage, what each build reads.

conf/config.yaml's `pipeline:` keys call these OmegaConf resolvers, in kiln's composition (`kiln params`)
and in DVC's (`dvc exp run`: hydra_plugins/kiln_resolvers.py registers them), so dvc.yaml's foreach
lists follow the targets without a second list to keep in step.
"""

from __future__ import annotations

from typing import Any, Mapping


def pipeline_calibrate(targets: Any) -> Any:
    """{target: runtime} for the targets whose precision needs calibration: one calibrate@<target> stage
    each (dvc.yaml's foreach). Other targets get no calibrate stage at all: a no-op repro is cheaper."""
    from omegaconf import OmegaConf

    return OmegaConf.create({name: t["runtime"] for name, t in _targets(targets).items() if _calibrated(t)})


def pipeline_build(targets: Any) -> Any:
    """{target: {runtime, calibration, model}}: what build@<target> depends on besides the graph. calibration:
    the calibrate stage's output for calibrated targets; model: the model's files for runtimes that build
    from the PyTorch model. Where a target has no such dependency, its own params slice (already one) stands in."""
    from omegaconf import OmegaConf

    from kiln.core.paths import CALIBRATION, MODEL_FILES, TARGET_PARAMS
    from kiln.runtimes import RUNTIMES

    out = {}
    for name, t in _targets(targets).items():
        own = TARGET_PARAMS / name / "build.json"
        calibration = CALIBRATION / name if _calibrated(t) else own
        info = RUNTIMES.get(str(t.get("runtime")))
        model = MODEL_FILES if info is not None and info.from_model else own
        out[name] = {"runtime": t.get("runtime"), "calibration": calibration.as_posix(), "model": model.as_posix()}
    return OmegaConf.create(out)


def _targets(targets: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    raw = OmegaConf.to_container(targets, resolve=True) if isinstance(targets, DictConfig) else targets
    return {str(k): dict(v or {}) for k, v in (raw or {}).items()} if isinstance(raw, dict) else {}


def _calibrated(target: Mapping[str, Any]) -> bool:
    from kiln.runtimes import is_calibrated

    return is_calibrated(str(target.get("runtime")), target.get("precision"))


RESOLVERS = {"kiln_pipeline_calibrate": pipeline_calibrate, "kiln_pipeline_build": pipeline_build}


def register_resolvers() -> None:
    """The resolvers conf/config.yaml's `pipeline:` keys use, for kiln's composition and DVC's
    (hydra_plugins/kiln_resolvers.py registers them in DVC's process)."""
    from omegaconf import OmegaConf

    for name, fn in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)

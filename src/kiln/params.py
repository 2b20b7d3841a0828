"""params.yaml is the Hydra composition of conf/; this module writes and checks it.

`dvc exp run` composes params.yaml itself (hydra.enabled in .dvc/config); a plain
`dvc repro` reads params.yaml as it is, and every stage refuses a params.yaml older than
conf/ (check_fresh), so after editing conf/ run:

    python -m kiln.params            # re-compose params.yaml from conf/
    python -m kiln.params --check    # exit 1 if params.yaml differs from conf/
    python -m kiln.params targets.openvino.threads=1   # with Hydra overrides
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .atomic import write_text
from .config import PARAMS_FILE
from .errors import KilnError, run_cli

CONFIG_DIR = "conf"
CONFIG_NAME = "config"
STAMP = "# composed by `python -m kiln.params` from conf/ "  # + "sha256:<digest of conf/> overrides: [...]"
# DVC sets this while it runs an experiment, after composing params.yaml from conf/ itself.
IN_EXPERIMENT = "DVC_EXP_BASELINE_REV"
ALLOW_STALE = "KILN_ALLOW_STALE_PARAMS"


def conf_digest(config_dir: str | Path = CONFIG_DIR) -> str:
    """A digest of every file under conf/: cheap enough to check before every stage."""
    root = Path(config_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stamped_yaml(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR) -> str:
    return f"{STAMP}sha256:{conf_digest(config_dir)} overrides: {list(overrides)}\n" + compose_yaml(overrides, config_dir)


def check_fresh(params_file: str | Path = PARAMS_FILE, config_dir: str | Path = CONFIG_DIR) -> None:
    """Refuse a params.yaml composed from an older conf/: a plain `dvc repro` would silently use stale values.

    params.yaml written by `python -m kiln.params` carries a digest of conf/; one written by DVC
    (`dvc exp run`, `dvc exp apply`) does not, and is judged by modification time instead."""
    params, conf = Path(params_file), Path(config_dir)
    if os.environ.get(IN_EXPERIMENT) or os.environ.get(ALLOW_STALE) or not params.is_file() or not conf.is_dir():
        return
    with params.open(encoding="utf-8") as f:
        first = f.readline()
    fix = (f"run `python -m kiln.params [overrides]` to re-compose it (hand edits of params.yaml are lost that way: "
           f"put them in conf/), or set {ALLOW_STALE}=1 to use it as it is")
    if first.startswith(STAMP):
        stamp = first[len(STAMP):].strip()
        if stamp.split()[0].removeprefix("sha256:") == conf_digest(conf):
            return
        # conf/ changed; what matters is whether the composition did (a new, unused target set does not count).
        overrides = ast.literal_eval(stamp.partition("overrides: ")[2] or "[]")
        current = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
        if compose(overrides, conf) != current:
            raise KilnError(f"{params} is stale: conf/ changed since it was composed ({stamp}); {fix}")
        return
    composed_at = params.stat().st_mtime
    newer = sorted(str(p) for p in conf.rglob("*.yaml") if p.stat().st_mtime > composed_at + 1)
    if newer:
        raise KilnError(f"{params} may be stale: {', '.join(newer[:3])} changed after it was written; {fix}")


def compose_yaml(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR, config_name: str = CONFIG_NAME) -> str:
    """The YAML `dvc exp run` would write: same composition, same dumper."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise KilnError(f"cannot compose {config_dir}/{config_name}.yaml with overrides {list(overrides)}: {e}{_hint(overrides, config_dir)}") from e
    return OmegaConf.to_yaml(cfg)


def _hint(overrides: Sequence[str], config_dir: str | Path) -> str:
    """Did-you-mean for an override whose key does not exist (a typo in a sweep)."""
    from .config import close_matches

    if not overrides:
        return ""
    try:
        known: Any = yaml.safe_load(compose_yaml((), config_dir))
    except KilnError:
        return ""
    hints = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        node, path = known, []
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if isinstance(node, dict):
                    hint = close_matches(part, node)
                    if hint:
                        hints.append(f"'{'.'.join([*path, part])}'{hint}")
                break
            node, path = node[part], [*path, part]
    return ("\n" + "; ".join(hints)) if hints else ""


def compose(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR) -> dict[str, Any]:
    return yaml.safe_load(compose_yaml(overrides, config_dir))


def stale_keys(params_file: str | Path = PARAMS_FILE, config_dir: str | Path = CONFIG_DIR) -> list[str]:
    """Top-level keys where params.yaml and the composition of conf/ disagree."""
    composed = compose(config_dir=config_dir)
    current = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    return sorted(k for k in set(composed) | set(current) if composed.get(k) != current.get(k))


# What each per-target stage reads from params, besides targets.<name>: the configure stage writes
# these slices to artifacts/targets/<name>/<stage>.json, and each stage depends on its own file.
SLICES = {
    "calibrate": ("model", "export", "calibration", "data"),
    "build": ("model", "export", "data.preprocess"),
    "benchmark": ("model", "export", "data.preprocess", "benchmark"),
}


def stage_slices(params: Mapping[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """The params each per-target stage of target `name` reads, as a params-shaped dict per stage."""
    out = {}
    for stage, keys in SLICES.items():
        sliced: dict[str, Any] = {"targets": {name: params["targets"][name]}}
        for key in keys:
            top, _, sub = key.partition(".")
            value = params.get(top)
            if sub:
                sliced.setdefault(top, {})[sub] = (value or {}).get(sub)
            else:
                sliced[top] = value
        out[stage] = sliced
    return out


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if "--check" in args:
        stale = stale_keys()
        if stale:
            print(f"{PARAMS_FILE} is stale: {', '.join(stale)} differ from conf/; run `python -m kiln.params`", file=sys.stderr)
            return 1
        print(f"{PARAMS_FILE} matches conf/")
        return 0
    write_text(PARAMS_FILE, stamped_yaml(args))
    print(f"wrote {PARAMS_FILE} from {CONFIG_DIR}/{CONFIG_NAME}.yaml" + (f" with {' '.join(args)}" if args else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)

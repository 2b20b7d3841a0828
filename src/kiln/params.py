"""params.yaml is the Hydra composition of conf/; this module writes and checks it.

`dvc exp run` composes params.yaml itself (hydra.enabled in .dvc/config); a plain
`dvc repro` reads params.yaml as it is, so after editing conf/ run:

    python -m kiln.params            # re-compose params.yaml from conf/
    python -m kiln.params --check    # exit 1 if params.yaml differs from conf/
    python -m kiln.params targets.openvino.threads=1   # with Hydra overrides
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from .atomic import write_text
from .config import PARAMS_FILE
from .errors import KilnError

CONFIG_DIR = "conf"
CONFIG_NAME = "config"


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
        raise KilnError(f"cannot compose {config_dir}/{config_name}.yaml with overrides {list(overrides)}: {e}") from e
    return OmegaConf.to_yaml(cfg)


def compose(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR) -> dict[str, Any]:
    return yaml.safe_load(compose_yaml(overrides, config_dir))


def stale_keys(params_file: str | Path = PARAMS_FILE, config_dir: str | Path = CONFIG_DIR) -> list[str]:
    """Top-level keys where params.yaml and the composition of conf/ disagree."""
    composed = compose(config_dir=config_dir)
    current = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    return sorted(k for k in set(composed) | set(current) if composed.get(k) != current.get(k))


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if "--check" in args:
        stale = stale_keys()
        if stale:
            print(f"{PARAMS_FILE} is stale: {', '.join(stale)} differ from conf/; run `python -m kiln.params`", file=sys.stderr)
            return 1
        print(f"{PARAMS_FILE} matches conf/")
        return 0
    write_text(PARAMS_FILE, compose_yaml(args))
    print(f"wrote {PARAMS_FILE} from {CONFIG_DIR}/{CONFIG_NAME}.yaml" + (f" with {' '.join(args)}" if args else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        sys.exit(1)

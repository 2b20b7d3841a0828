"""configure: check params (every check params alone decide: kiln.checks), then write each per-target stage's slice.

calibrate@, build@ and benchmark@<target> depend on their own slice
(artifacts/targets/<target>/<stage>.json) instead of tracking params.yaml themselves: DVC
parses params.yaml once per params dependency, and with three stages per target that was
most of a no-op `dvc repro`. A slice only changes when what its stage reads changes, so
editing one target still re-runs only that target's stages.
"""

import json
import logging

from kiln import paths
from kiln.atomic import atomic_path
from kiln.checks import check_params
from kiln.config import load_params
from kiln.params import stage_slices
from kiln.stage import run_stage


def main() -> None:
    params = load_params()
    targets = check_params(params)
    with atomic_path(paths.TARGET_PARAMS, is_dir=True) as tmp:
        for target in targets:
            (tmp / target.name).mkdir()
            for stage, sliced in stage_slices(params, target.name).items():
                (tmp / target.name / f"{stage}.json").write_text(json.dumps(sliced, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    logging.getLogger("kiln.configure").info("%d targets: %s", len(targets), ", ".join(t.name for t in targets))


if __name__ == "__main__":
    run_stage(main)

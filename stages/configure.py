"""configure: check params (every check params alone decide: kiln.pipeline.checks), then write each stage's slice.

This stage depends on all of params.yaml; every other stage depends on its own slice
(artifacts/params/<stage>.json, or artifacts/targets/<target>/<stage>.json per target) instead of
tracking params itself. What a stage reads is declared once, in kiln.config.slices: a slice only
changes when what its stage reads changes, so a change re-runs exactly the stages that read it
(and a no-op `dvc repro` parses params.yaml once, not once per stage).
"""

import logging

from kiln.config.batch_limit import clamp_batches
from kiln.config.slices import READS, global_slice, slice_text, target_slices
from kiln.config.views import load_params
from kiln.core import paths
from kiln.core.atomic import atomic_path
from kiln.pipeline.checks import check_params
from kiln.pipeline.stage import run_stage


def main() -> None:
    params, notes = clamp_batches(load_params())  # a model that takes few images per call: every batch size fits it
    for note in notes:
        logging.getLogger("kiln.configure").warning("%s", note)
    targets = check_params(params)
    with atomic_path(paths.STAGE_PARAMS, is_dir=True) as tmp:
        for stage in READS:
            (tmp / f"{stage}.json").write_text(slice_text(global_slice(params, stage)), encoding="utf-8")
    with atomic_path(paths.TARGET_PARAMS, is_dir=True) as tmp:
        for target in targets:
            (tmp / target.name).mkdir()
            for stage, sliced in target_slices(params, target.name).items():
                (tmp / target.name / f"{stage}.json").write_text(slice_text(sliced), encoding="utf-8")
    logging.getLogger("kiln.configure").info("%d targets: %s", len(targets), ", ".join(t.name for t in targets))


if __name__ == "__main__":
    run_stage(main)

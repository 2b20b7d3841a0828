"""probe: the hardware/software fingerprint that every build depends on, and each stage's code digest.

Runs on every `dvc repro` (always_changed); the fingerprint only changes when the machine does
(then exactly the engines re-build), a stage's code digest only when code that stage reaches does
(kiln.pipeline.codedeps), the model's files only when the checkpoint or the entrypoint's source does
(kiln.export.model_files). Imports no framework, so it takes milliseconds.
"""

from pathlib import Path

from kiln.core import paths
from kiln.core.atomic import write_json
from kiln.export.model_files import write_model_files
from kiln.pipeline import codedeps
from kiln.pipeline.stage import run_stage
from kiln.runtimes import fingerprint


def main() -> None:
    write_json(paths.FINGERPRINT, fingerprint.collect())
    codedeps.write_digests(paths.CODE)
    write_model_files(Path("params.yaml"), paths.MODEL_FILES)


if __name__ == "__main__":
    run_stage(main)

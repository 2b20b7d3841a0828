"""probe: the hardware/software fingerprint that every build depends on, and each stage's code digest.

Runs on every `dvc repro` (always_changed); the fingerprint only changes when the machine does
(then exactly the engines re-build), a stage's code digest only when code that stage reaches does
(kiln.codedeps). Imports no framework, so it takes milliseconds.
"""

from kiln import codedeps, fingerprint, paths
from kiln.atomic import write_json
from kiln.stage import run_stage


def main() -> None:
    write_json(paths.FINGERPRINT, fingerprint.collect())
    codedeps.write_digests(paths.CODE)


if __name__ == "__main__":
    run_stage(main)

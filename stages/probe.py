"""probe: the hardware/software fingerprint that every build depends on.

Runs on every `dvc repro` (always_changed); its output only changes when the machine
does, and then exactly the engines re-build. Imports no framework, so it takes milliseconds.
"""

from kiln import fingerprint, paths
from kiln.atomic import write_json
from kiln.stage import run_stage


def main() -> None:
    write_json(paths.FINGERPRINT, fingerprint.collect())


if __name__ == "__main__":
    run_stage(main)

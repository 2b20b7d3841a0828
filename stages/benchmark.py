"""benchmark@<target>: latency per batch size and accuracy against the eager fp32 reference, for one engine."""

import sys

from kiln.config.slices import load_stage_params
from kiln.pipeline.benchmark_target import benchmark_target, write_outputs
from kiln.pipeline.stage import run_stage


def main() -> None:
    from kiln.diagnose.debug import diagnose  # called only for an engine over its budget: where it departs from fp32

    name = sys.argv[1]
    write_outputs(name, benchmark_target(name, load_stage_params("benchmark", name), diagnose=diagnose))


if __name__ == "__main__":
    run_stage(main)

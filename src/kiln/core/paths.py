"""Where the stages read and write, relative to the project root. dvc.yaml names the same paths."""

from pathlib import Path

ARTIFACTS = Path("artifacts")
FINGERPRINT = ARTIFACTS / "fingerprint.json"
PEAK = ARTIFACTS / "peak.json"  # this machine's measured peak MAC/s per precision (the peak stage)
CODE = ARTIFACTS / "code"  # one digest per stage of the kiln code it reaches (kiln.pipeline.codedeps)
ONNX = ARTIFACTS / "model.onnx"
EXPORT_MANIFEST = ARTIFACTS / "export.json"
REFERENCE = ARTIFACTS / "reference.npz"
ENGINES = ARTIFACTS / "engines"
CALIBRATION = ARTIFACTS / "calibration"

REPORTS = Path("reports")
VALIDATE = REPORTS / "validate.json"
METRICS = REPORTS / "metrics"
RUNS = REPORTS / "runs"
PLOTS = REPORTS / "plots"
BENCHMARK_MD = REPORTS / "benchmark.md"
SUMMARY_CSV = REPORTS / "summary.csv"
TARGET_PARAMS = ARTIFACTS / "targets"  # per-target slices of params, one file per stage (kiln.config.slices)
STAGE_PARAMS = ARTIFACTS / "params"  # the other stages' slices of params
MODEL_FILES = ARTIFACTS / "model-files.json"  # digests of model.checkpoint and model.entrypoint's source (kiln.export.model_files)
CALIBRATION_DIGEST = ARTIFACTS / "data-calibration.json"  # digests of the image folders (the data stage)
SAMPLE_CALIBRATION_DIR = Path("data/calibration")  # where sample-data puts kiln's sample images
SAMPLE_EVAL_DIR = Path("data/eval")
EVAL_DIGEST = ARTIFACTS / "data-eval.json"
LATENCY_CSV = REPORTS / "latency.csv"  # every target's latency per batch size, for the plots
LATENCY_PNG = REPORTS / "latency.png"
CONTENTION = REPORTS / "contention"  # two engines side by side (`kiln contention`)
DEBUG = REPORTS / "debug"  # the debugger's per-target findings (`kiln debug`)
DEBUG_CSV = REPORTS / "debug.csv"  # every debugged target's SQNR along the graph, for the `debug` plot
SERVING_CSV = REPORTS / "serving.csv"  # open-loop p99 per offered rate and target, for the plots

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))  # tinymodels


def pytest_configure(config: pytest.Config) -> None:
    pin_xdist_worker()


# The longest files (seconds on one core of an AVX2 EPYC, the junit times of a two-worker run), longest first: handed
# out first under pytest-xdist (test.sh: --dist loadfile --no-loadscope-reorder), so that the run does not end with one
# worker alone on a long file while the other core idles. test_remote waits for test_experiments' shared build
# (conftest.mini_built): last, so that it finds it built instead of waiting beside it.
LONGEST_FIRST = (
    "test_model_zoo.py",  # 179
    "test_pipeline.py",  # 152
    "test_rcnn.py",  # 148
    "test_cache_contract.py",  # 104
    "test_torch_compile.py",  # 70
    "test_experiments.py",  # 70
    "test_workflow_fanout.py",  # 47
    "test_yolo.py",  # 41
    "test_params_guard.py",  # 35
    "test_onnx_in.py",  # 33
)
LAST = ("test_remote.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) + (1 if name in LAST else 0)

    items.sort(key=rank)  # stable: within a file, and among the rest, collection order


def pin_xdist_worker() -> None:
    """Under pytest-xdist, each worker (and every process it starts: DVC's stages) on cores of its own. Unpinned, each
    of two workers on two cores runs every runtime with two threads (kiln's default is the cores a process may use),
    and their thread pools spin-wait against each other: one R-CNN test's set-up took 203 s that way. Pinned, kiln,
    ONNX Runtime, OpenVINO and PyTorch see one core and use one thread. Runs before any test imports torch, whose
    OpenMP pool sizes itself when it loads."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:  # fewer cores than workers: sharing them is all there is
        return
    os.sched_setaffinity(0, cores[int(worker[2:]) % count :: count])


def tiny_model_params(entrypoint: str = "tinymodels:tiny_cnn", **extra: Any) -> dict[str, Any]:
    return {
        "name": None,
        "entrypoint": entrypoint,
        "checkpoint": None,
        "weights": None,
        "kwargs": {},
        "inputs": {"input": {"shape": [3, 16, 16], "dtype": "float32"}},
        "outputs": None,
        "seed": 0,
        "trained": False,  # kiln takes an entrypoint's weights as trained unless told: these are random
        **extra,
    }


@pytest.fixture
def tiny_spec():
    from kiln.config.views import ModelSpec

    return ModelSpec.from_params(tiny_model_params())


@pytest.fixture
def tiny_onnx(tmp_path, tiny_spec):
    """A tiny classifier exported to ONNX, with its spec."""
    from kiln.export.models import build_model
    from kiln.export.onnx import ExportSettings, export_onnx

    path = tmp_path / "model.onnx"
    manifest = export_onnx(build_model(tiny_spec), tiny_spec, ExportSettings(), path)
    return path, tiny_spec, manifest


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def venv_env() -> dict[str, str]:
    """The environment for subprocesses: this interpreter's bin first, so `python` and `dvc` are this venv's."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH", "")]))
    env["DVC_NO_ANALYTICS"] = "1"
    # DVC's tables wrap at the terminal's width (80 without one): a long temp path (xdist's popen-gw1/...) split across
    # lines reads as two words
    env["COLUMNS"] = "1000"
    return env


def in_ci() -> bool:
    """CI sets CI=true (GitHub Actions does, and .ci/run): there every declared capability must run."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> None:
    """A declared capability (a dependency in pyproject.toml, a tool .ci/run installs) cannot run here: a skip on a
    developer's machine, a failure in CI, where a broken install must not pass as a skip. Skips are for what a
    machine truly lacks (a GPU, TensorRT): those call pytest.skip themselves."""
    if in_ci():
        pytest.fail(f"CI: {reason} (a declared dependency or CI tool is missing: the install is broken)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str) -> Any:
    """Import a declared dependency, or unavailable(reason)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        unavailable(f"{reason} ({type(e).__name__}: {e})")


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The temp folder every pytest-xdist worker of this run shares (None without xdist: one process, one session)."""
    return tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)`'s result once per test run: without xdist in a fresh temp folder; under pytest-xdist (pyproject's
    `-n 2`) the first worker to ask builds it in the run's shared folder, holding a lock, and the others wait for it and
    get the same path. What is built this way is read only: tests copy it (copy_project)."""
    root = shared_root(tmp_path_factory)
    if root is None:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    done = root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            folder = root / name
            folder.mkdir()
            done.write_text(str(build(folder)))
    return Path(done.read_text())


@pytest.fixture(scope="session", autouse=True)
def peak_measured_once(tmp_path_factory):
    """Every test project's peak stage measures this machine once and reuses it (kiln.measure.peak_cache): the roof's
    figures are not what the tests check, so a measurement beside other tests is kept too."""
    from kiln.measure.peak_cache import CACHE_ENV, KEEP_BUSY_ENV

    saved = {k: os.environ.get(k) for k in (CACHE_ENV, KEEP_BUSY_ENV)}
    run_root = shared_root(tmp_path_factory)  # under pytest-xdist, one cache for every worker: measured once per run
    cache = run_root / "kiln-cache" if run_root else tmp_path_factory.mktemp("kiln-cache")
    cache.mkdir(exist_ok=True)
    os.environ[CACHE_ENV] = str(cache)
    os.environ[KEEP_BUSY_ENV] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def digits_trained(tmp_path_factory):
    """scikit-learn's digits as image folders and a TinyCNN trained on them (tests/digits.py), once per session: the
    int8, debug and cache-contract tests each need a trained classifier, and training is the slow part. Read only:
    a test that changes the model copies it first (tests/outlier.py does), and no test writes into the folders."""
    from digits import train, write_digits

    dirs = write_digits(tmp_path_factory.mktemp("digits") / "data")
    return {"dirs": dirs, "model": train(dirs["train"])}


# A small target set: the baseline and two fp32 runtimes (test_experiments' sweep, test_remote, the workflow's fan-out).
MINI = """\
torch-eager: {runtime: torch, precision: fp32, device: cpu, threads: null, profile: {min: 1, opt: 4, max: 8}, options: {}}
onnxruntime: {runtime: onnxruntime, precision: fp32, device: cpu, threads: null, profile: {min: 1, opt: 4, max: 8},
              options: {graph_optimization_level: all}}
openvino: {runtime: openvino, precision: fp32, device: cpu, threads: null, profile: {min: 1, opt: 4, max: 8},
           options: {performance_hint: LATENCY}}
"""


@pytest.fixture(scope="session")
def mini_built(tmp_path_factory):
    """The tiny model's project (test_pipeline.make_project) with the MINI target set, built by `dvc repro` and its
    results committed, as a user would before experiments or a push: built once per session, never changed. Tests
    start from their own copy (copy_project)."""
    return built_once(tmp_path_factory, "mini", build_mini)


def build_mini(folder: Path) -> Path:
    import yaml
    from test_pipeline import make_project, run, stages_run

    project = make_project(folder)
    (project / "conf" / "targets" / "mini.yaml").write_text(MINI)
    config = project / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("- targets: cpu", "- targets: mini"))
    run(["python", "-m", "kiln", "params"], project)
    first = run(["dvc", "repro"], project)
    built = {f"{s}@{t}" for s in ("build", "benchmark") for t in yaml.safe_load(MINI)}  # fp32 targets: no calibrate stage
    assert built | {"sample-data", "export", "validate", "report"} <= stages_run(first.stdout), first.stdout
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], project)
    return project


def copy_project(project: Path, into: Path) -> Path:
    """A copy of a built project (its git history, DVC cache and workspace), without DVC's per-checkout state in
    .dvc/tmp (its index and locks name the original's files): as if cloned with its cache."""
    copy = into / project.name
    shutil.copytree(project, copy, symlinks=True, ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else [])
    return copy

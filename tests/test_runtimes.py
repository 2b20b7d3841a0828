"""Every runtime behind the one protocol: build an engine folder, load it, infer; manifests checked on load."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest

from kiln.config.views import Target
from kiln.core.errors import EngineMismatch, KilnError
from kiln.data.inputs import make_inputs
from kiln.export.models import build_model
from kiln.export.validate import reference_outputs
from kiln.pipeline.engine import build_engine, load_engine, read_manifest
from kiln.runtimes import RUNTIMES, BuildSource, fingerprint

CPU_TARGETS = {
    "torch-eager": {"runtime": "torch", "threads": 1},
    "onnxruntime": {"runtime": "onnxruntime", "threads": 1},
    "openvino": {"runtime": "openvino", "threads": 1},
}


def target(name: str, **over) -> Target:
    return Target.from_params(name, {"targets": {name: {**CPU_TARGETS.get(name, {}), **over}}})


@pytest.mark.parametrize("name", list(CPU_TARGETS))
def test_build_load_infer_matches_eager(tmp_path, tiny_onnx, name):
    path, spec, _ = tiny_onnx
    t = target(name)
    manifest = build_engine(t, BuildSource(path, spec), tmp_path / name)
    assert manifest == read_manifest(tmp_path / name)
    assert manifest["target"] == name and manifest["runtime"] == t.runtime
    assert manifest["precision"]["requested"] == "fp32"
    assert manifest["precision"]["executed"] in ("fp32", "f32")
    assert manifest["hardware"] == fingerprint.collect()["hardware"]
    assert set(manifest["versions"]) >= {t.runtime if t.runtime != "torch" else "torch"}
    assert manifest["profile"] == {"min": 1, "opt": 8, "max": 32}

    session, _ = load_engine(tmp_path / name, t)
    ref = reference_outputs(build_model(spec), spec, ["output"], samples=6, seed=3)
    feeds = make_inputs(spec.inputs, 6, 3)
    got = session.infer(feeds)
    assert session.output_names == ["output"]
    np.testing.assert_allclose(got["output"], ref["output"], atol=1e-4, rtol=1e-3)


def test_onnxruntime_engine_holds_the_optimized_graph(tmp_path, tiny_onnx):
    import onnx

    path, spec, _ = tiny_onnx
    build_engine(target("onnxruntime"), BuildSource(path, spec), tmp_path / "e")
    optimized = onnx.load(str(tmp_path / "e" / "model.optimized.onnx"))
    exported = [n.op_type for n in onnx.load(str(path)).graph.node]
    # The exporter already folds BatchNorm; ONNX Runtime fuses each Relu into its Conv (a FusedConv, or an
    # NCHWc Conv with an activation attribute on AVX-512 CPUs, which then adds layout reorders).
    assert exported.count("Relu") == 2
    assert [n.op_type for n in optimized.graph.node].count("Relu") == 0
    assert any(n.domain.startswith("com.microsoft") for n in optimized.graph.node)


def test_openvino_ir_keeps_fp32_weights(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    build_engine(target("openvino"), BuildSource(path, spec), tmp_path / "e")
    model = ov.Core().read_model(str(tmp_path / "e" / "model.xml"))
    weights = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_real()]
    assert weights and all(op.get_output_element_type(0) == ov.Type.f32 for op in weights)


def test_openvino_low_precision_is_refused_or_really_executed(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    t = target("openvino", precision="bf16")
    if "BF16" in caps:
        manifest = build_engine(t, BuildSource(path, spec), tmp_path / "e")
        assert "bf16" in manifest["precision"]["executed"]
    else:
        with pytest.raises(KilnError, match=r"cannot execute bf16: its OPTIMIZATION_CAPABILITIES are .*silently run f32"):
            build_engine(t, BuildSource(path, spec), tmp_path / "e")
        assert not (tmp_path / "e").exists()


def test_engine_from_another_machine_is_refused(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    build_engine(target("onnxruntime"), BuildSource(path, spec), tmp_path / "e")
    manifest_path = tmp_path / "e" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["hardware"]["cpu"] = {"arch": "aarch64", "model": "Neoverse-V2", "features": ["asimd", "sve2"]}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(
        EngineMismatch,
        match=r"built for Neoverse-V2 \[asimd, sve2\], but this machine is .*rebuild it here with `dvc repro build@onnxruntime`",
    ):
        load_engine(tmp_path / "e", target("onnxruntime"))


def test_engine_from_other_library_versions_is_refused(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    build_engine(target("openvino"), BuildSource(path, spec), tmp_path / "e")
    manifest_path = tmp_path / "e" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["versions"]["openvino"] = "2023.0.0"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatch, match=r"built with openvino 2023.0.0, this machine has"):
        load_engine(tmp_path / "e", target("openvino"))


def test_not_an_engine_folder(tmp_path):
    with pytest.raises(KilnError, match="is not a kiln engine"):
        load_engine(tmp_path, target("openvino"))


def test_failed_build_leaves_no_engine_and_keeps_the_old_one(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    engine = tmp_path / "e"
    build_engine(target("onnxruntime"), BuildSource(path, spec), engine)
    before = read_manifest(engine)
    bad = target("onnxruntime", options={"graph_optimization_level": "ludicrous"})
    with pytest.raises(KilnError, match="graph_optimization_level 'ludicrous' is not one of"):
        build_engine(bad, BuildSource(path, spec), engine)
    assert read_manifest(engine) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# The runtimes whose libraries are declared dependencies and that run on any CPU: each must work here.
EVERYWHERE = {"torch", "onnxruntime", "openvino"}


@pytest.mark.parametrize("name", list(RUNTIMES))
def test_every_registered_runtime_runs_through_the_protocol_or_says_why_not(tmp_path, tiny_onnx, name):
    """Each runtime of the registry (a new one included, with no test of its own yet), driven only through the
    protocol: available here, it builds, loads and infers what eager PyTorch computes; not, it says why, and the
    build refuses with that reason and leaves nothing."""
    from kiln.runtimes import get_runtime

    path, spec, _ = tiny_onnx
    device = "cuda" if name == "tensorrt" else "cpu"
    t = Target.from_params(name, {"targets": {name: {"runtime": name, "device": device, "threads": 1}}})
    runtime = get_runtime(name)
    assert runtime.name == name and "fp32" in runtime.precisions
    reason = runtime.unavailable_reason(t)
    if reason is not None:
        assert name not in EVERYWHERE, f"{name} is a declared dependency that runs on any CPU, yet: {reason}"
        assert isinstance(reason, str) and reason.strip()
        with pytest.raises(KilnError) as refused:
            build_engine(t, BuildSource(path, spec), tmp_path / "e")
        assert reason in str(refused.value)
        assert not (tmp_path / "e").exists()
        return
    manifest = build_engine(t, BuildSource(path, spec), tmp_path / "e")
    assert manifest["runtime"] == name and manifest["precision"]["executed"]
    session, _ = load_engine(tmp_path / "e", t)
    assert session.input_names == ["input"] and session.output_names == ["output"]
    feeds = make_inputs(spec.inputs, 3, 5)
    ref = reference_outputs(build_model(spec), spec, ["output"], samples=3, seed=5)
    np.testing.assert_allclose(session.infer(feeds)["output"], ref["output"], atol=1e-4, rtol=1e-3)


def native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(fingerprint.collect()["hardware"]["cpu"]["features"]))


def test_torch_bf16_runs_where_native_and_is_refused_or_skipped_elsewhere(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    if native_bf16():
        manifest = build_engine(target("torch-eager", precision="bf16"), BuildSource(path, spec), tmp_path / "e")
        assert manifest["precision"]["executed"] == "bf16 autocast"
        session, _ = load_engine(tmp_path / "e", target("torch-eager", precision="bf16"))
        feeds = make_inputs(spec.inputs, 4, 3)
        ref = reference_outputs(build_model(spec), spec, ["output"], samples=4, seed=3)
        np.testing.assert_allclose(session.infer(feeds)["output"], ref["output"], atol=0.1, rtol=0.05)
        return
    with pytest.raises(KilnError, match=r"has no native bf16 .*mark the target `required: false` to skip it"):
        build_engine(target("torch-eager", precision="bf16"), BuildSource(path, spec), tmp_path / "e")
    assert not (tmp_path / "e").exists()
    optional = target("torch-eager", precision="bf16", required=False)
    manifest = build_engine(optional, BuildSource(path, spec), tmp_path / "e")
    assert "no native bf16" in manifest["skipped"] and manifest["precision"]["executed"] is None
    with pytest.raises(KilnError, match="was skipped when built: .*no native bf16"):
        load_engine(tmp_path / "e", optional)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickle_over(path):
    import pickle

    path.write_bytes(pickle.dumps({"not": "weights", "but": object}))


# Each runtime's file broken the way a copy or a hand gets it wrong; each runtime's own error names no cause.
BROKEN = {
    "onnxruntime": ("model.optimized.onnx", _truncate),
    "openvino": ("model.bin", _truncate),
    "torch-eager": ("state_dict.pt", _pickle_over),
}


def test_manifest_records_the_hash_of_every_engine_file(tmp_path, tiny_onnx):
    from kiln.core.hashing import sha256_file

    path, spec, _ = tiny_onnx
    manifest = build_engine(target("openvino"), BuildSource(path, spec), tmp_path / "e")
    files = {p.name: sha256_file(p) for p in (tmp_path / "e").iterdir() if p.name != "manifest.json"}
    assert manifest["files_sha256"] == files and set(files) == {"model.xml", "model.bin"}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_changed_engine_file_is_named_with_how_to_rebuild(tmp_path, tiny_onnx, name):
    path, spec, _ = tiny_onnx
    engine = tmp_path / name
    build_engine(target(name), BuildSource(path, spec), engine)
    file, damage = BROKEN[name]
    damage(engine / file)
    with pytest.raises(KilnError) as raised:
        load_engine(engine, target(name))
    assert str(raised.value) == (
        f"engine '{name}' is broken: {engine / file} was changed after the build "
        f"(its sha256 no longer matches {engine / 'manifest.json'}); rebuild it with `dvc repro -f -s build@{name}`"
    )
    (engine / file).unlink()
    with pytest.raises(KilnError, match=rf"engine '{name}' is incomplete: .*{file} is missing .*`dvc repro -f -s build@{name}`"):
        load_engine(engine, target(name))


def test_an_engine_without_file_hashes_still_loads_and_a_failed_load_keeps_the_runtime_error(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    engine = tmp_path / "openvino"
    build_engine(target("openvino"), BuildSource(path, spec), engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    del manifest["files_sha256"]  # as an engine built before kiln recorded them
    (engine / "manifest.json").write_text(json.dumps(manifest))
    session, _ = load_engine(engine, target("openvino"))
    assert session.infer(make_inputs(spec.inputs, 2, 0))["output"].shape == (2, 10)

    _truncate(engine / "model.bin")
    with pytest.raises(KilnError) as raised:
        load_engine(engine, target("openvino"))
    message = str(raised.value)
    assert message.startswith(f"openvino cannot load engine {engine}: RuntimeError: ")
    assert "Incorrect weights in bin file!" in message and "Exception from src/" not in message
    assert message.endswith("rebuild it with `dvc repro -f -s build@openvino`")
    assert isinstance(raised.value.__cause__, RuntimeError) and "Incorrect weights in bin file!" in str(raised.value.__cause__)


def test_every_registered_runtime_declares_what_kiln_needs():
    import dataclasses

    from kiln.core.settings import parse
    from kiln.runtimes import RUNTIMES, CalibratingRuntime, get_runtime

    for name, info in RUNTIMES.items():
        runtime = get_runtime(name)
        assert runtime.name == name and runtime.info is info
        assert runtime.precisions == info.precisions and set(info.calibrated) <= set(info.precisions)
        assert runtime.libraries and all(info.libraries[lib] for lib in runtime.libraries), f"{name} declares no distributions"
        # A runtime with calibrated precisions must be able to calibrate, and only then.
        assert isinstance(runtime, CalibratingRuntime) == bool(info.calibrated), name
        assert dataclasses.is_dataclass(runtime.options_type)
        parse(runtime.options_type, {}, f"targets.{name}.options")  # every option has a default
        if info.calibrated:
            parse(runtime.calibration_options_type, {}, f"targets.{name}.calibration.options")


def test_a_runtime_whose_libraries_are_unknown_fails_loudly():
    from types import SimpleNamespace

    from kiln.pipeline.engine import library_versions
    from kiln.runtimes import fingerprint

    machine = fingerprint.collect()
    assert library_versions(SimpleNamespace(name="onnxruntime", libraries=("onnxruntime",)), machine) == {
        "onnxruntime": machine["software"]["onnxruntime"]
    }
    with pytest.raises(KilnError, match=r"runtime 'fake' depends on nosuchlib, but this machine's fingerprint has no version of it"):
        library_versions(SimpleNamespace(name="fake", libraries=("nosuchlib",)), machine)
    with pytest.raises(KilnError, match=r"runtime 'bare' declares no libraries"):
        library_versions(SimpleNamespace(name="bare", libraries=()), machine)


TORCH_FREE = """
import sys, json
from pathlib import Path
sys.path.insert(0, str(Path({root!r}) / "stages"))
import build, benchmark  # the stage scripts' own imports
from kiln.accuracy.budgets import accuracy_against_reference
from kiln.measure.benchmark import BenchmarkSettings, benchmark_latency
from kiln.config.views import ModelSpec, Target
from kiln.pipeline.engine import build_engine, load_engine
from kiln.runtimes import BuildSource
from kiln.data.reference import load_reference
spec = ModelSpec.from_params(json.loads({spec!r}))
raw = {{"runtime": "onnxruntime", "threads": 1, "profile": {{"min": 1, "opt": 2, "max": 4}}}}
target = Target.from_params("ort", {{"targets": {{"ort": raw}}}})
build_engine(target, BuildSource(Path({onnx!r}), spec), Path({engine!r}))
session, _ = load_engine(Path({engine!r}), target)
accuracy_against_reference(session, load_reference({reference!r}), chunk=2)
settings = BenchmarkSettings(batch_sizes=(2,), warmup_iters=1, min_iters=2, min_time_s=0)
benchmark_latency(session, spec.inputs, target.profile, settings, progress=False)
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
"""


def test_building_and_benchmarking_an_onnxruntime_target_never_imports_torch(tmp_path, tiny_onnx):
    import json
    import subprocess
    import sys

    from conftest import ROOT, tiny_model_params, venv_env

    from kiln.data.inputs import make_inputs
    from kiln.data.reference import save_reference

    path, spec, _ = tiny_onnx
    feeds = make_inputs(spec.inputs, 4, 0)
    reference = {"inputs": feeds, "outputs": get_runtime_outputs(path, feeds), "labels": None, "source": "seeded"}
    save_reference(tmp_path / "reference.npz", reference)
    code = TORCH_FREE.format(
        root=str(ROOT),
        spec=json.dumps(tiny_model_params()),
        onnx=str(path),
        engine=str(tmp_path / "engine"),
        reference=str(tmp_path / "reference.npz"),
    )
    result = subprocess.run([sys.executable, "-c", code], env=venv_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


def get_runtime_outputs(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


CONFIGURE_TORCH_FREE = """
import sys, json, yaml
from pathlib import Path
sys.path.insert(0, str(Path({root!r}) / "stages"))
import configure  # the stage script's own imports
from kiln.config.views import Target
from kiln.pipeline.checks import check_params
from kiln.runtimes import get_runtime
params = yaml.safe_load((Path({root!r}) / "params.yaml").read_text())
params["targets"]["torch-aoti"] = {{**params["targets"]["torch-eager"], "options": {{"mode": "aoti"}}}}
targets = check_params(params)
skips = {{t.name: get_runtime(t.runtime).unavailable_reason(t) for t in targets if t.runtime == "torch"}}
print(json.dumps([sorted(skips), sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))]))
"""


def test_configure_and_a_cpu_torch_targets_skip_check_never_import_torch(tmp_path):
    # The configure stage runs on every params change, and a skipped bf16 target's stages decide on the CPU's flags:
    # importing torch (~2 s) for either is what kiln.runtimes.torch keeps out of the runtime object and its options.
    import json
    import subprocess
    import sys

    from conftest import ROOT, venv_env

    code = CONFIGURE_TORCH_FREE.format(root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=venv_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    checked, imported = json.loads(result.stdout.splitlines()[-1])
    assert {"torch-eager", "torch-bf16", "torch-aoti"} <= set(checked) and imported == []

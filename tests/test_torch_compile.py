"""torch runtime, modes compile (torch.compile + inductor) and aoti (torch.export + AOTInductor .pt2).

Compiles are slow on small machines: each engine is built once per module, on a tiny CNN, one thread.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model_params, venv_env

from kiln.config.views import ModelSpec, Target
from kiln.core.errors import KilnError
from kiln.data.inputs import make_inputs
from kiln.export.models import build_model
from kiln.export.validate import eager_outputs
from kiln.pipeline.engine import build_engine, load_engine, read_manifest
from kiln.runtimes import BuildSource, fingerprint

# compile: min 1 (dynamo specialises batch 1) up to 20 (CPU convolutions guard on batch >= 16): three graphs.
COMPILE = {
    "runtime": "torch",
    "threads": 1,
    "profile": {"min": 1, "opt": 4, "max": 20},
    "options": {"mode": "compile", "compile_mode": "default", "freezing": True},
}
AOTI = {"runtime": "torch", "threads": 1, "profile": {"min": 2, "opt": 4, "max": 16}, "options": {"mode": "aoti", "freezing": True}}


def target(name: str, raw: dict, **over) -> Target:
    return Target.from_params(name, {"targets": {name: {**raw, **over}}})


def native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(fingerprint.collect()["hardware"]["cpu"]["features"]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kiln.export.onnx import ExportSettings, export_onnx

    spec = ModelSpec.from_params(tiny_model_params())
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(build_model(spec), spec, ExportSettings(), path)
    return path, spec


def reference(spec: ModelSpec, batch: int) -> tuple[dict, dict]:
    feeds = make_inputs(spec.inputs, batch, seed=10 + batch)
    return feeds, eager_outputs(build_model(spec), spec, feeds, ["output"])


def built(tiny, tmp_path_factory, name: str, options: dict) -> tuple:
    path, spec = tiny
    engine = tmp_path_factory.mktemp("engines") / name
    return engine, build_engine(target(name, options), BuildSource(path, spec), engine)


@pytest.fixture(scope="module")
def compiled(tiny, tmp_path_factory):
    return built(tiny, tmp_path_factory, "torch-compile", COMPILE)


@pytest.fixture(scope="module")
def aoti(tiny, tmp_path_factory):
    return built(tiny, tmp_path_factory, "torch-aoti", AOTI)


@pytest.fixture(scope="module")
def compiled_session(compiled):
    session, _ = load_engine(compiled[0], target("torch-compile", COMPILE))
    return session


def test_compile_manifest_records_the_compile(compiled):
    engine, manifest = compiled
    assert manifest == read_manifest(engine)
    assert manifest["mode"] == "compile" and manifest["compile_mode"] == "default" and manifest["freezing"] is True
    assert manifest["precision"] == {"requested": "fp32", "executed": "fp32"}
    assert 0 < manifest["compile_seconds"] <= manifest["build_seconds"]
    assert manifest["batch"] == {"min": 1, "max": 20, "example": 4}
    assert manifest["compiled_graphs"] >= 2  # dynamic 2..15 plus the specialised 1 (and 16..20)
    # oneDNN-packed (frozen) weights cannot be pickled: inductor caches nothing, and says so.
    assert manifest["compile_cache"]["file"] is None and "oneDNN-packed weights" in manifest["compile_cache"]["why"]
    assert not (engine / "compile_cache.bin").exists()
    graph = manifest["graph"]
    assert graph["nodes_in"] >= 8 and graph["nodes_out"] >= 1 and "inductor" in graph["source"]
    # Frozen weights: both BatchNorms folded into the convolutions, the oneDNN weights pre-packed.
    assert graph["fusions"]["binary_folding"] >= 2 and graph["fusions"]["mkldnn_conv_weight_pack"] >= 2


def test_compile_matches_eager_at_every_profile_batch_without_recompiling(tiny, compiled_session):
    from kiln.runtimes.torch.compile import inductor_counters

    _, spec = tiny
    session = compiled_session
    assert session.compile_seconds > 0 and session.load_seconds >= session.compile_seconds
    graphs = inductor_counters()["unique_graphs"]
    for batch in (1, 3, 4, 11, 16, 20):
        feeds, ref = reference(spec, batch)
        got = session.infer(feeds)
        assert got["output"].shape == (batch, 10)
        np.testing.assert_allclose(got["output"], ref["output"], atol=1e-4, rtol=1e-3, err_msg=f"batch {batch}")
    assert inductor_counters()["unique_graphs"] == graphs, "a profile batch recompiled after load"


def test_compile_freezes_each_models_own_weights(tiny, compiled_session, tmp_path):
    """Another model of the same class, other weights, same process, a static profile: frozen
    weights must be its own (dynamo must not reuse the first engine's graph, whose weights are constants)."""
    path, _ = tiny
    spec1 = ModelSpec.from_params(tiny_model_params(seed=1))
    t = target("seed1", COMPILE, profile={"min": 4, "opt": 4, "max": 4})
    manifest = build_engine(t, BuildSource(path, spec1), tmp_path / "e")
    assert manifest["batch"] == {"min": 4, "max": 4, "example": 4}
    session, _ = load_engine(tmp_path / "e", t)
    feeds, ref1 = reference(spec1, 4)
    _, ref0 = reference(ModelSpec.from_params(tiny_model_params()), 4)
    got = session.infer(feeds)["output"]
    np.testing.assert_allclose(got, ref1["output"], atol=1e-4, rtol=1e-3)
    assert not np.allclose(got, ref0["output"], atol=1e-2)
    np.testing.assert_allclose(compiled_session.infer(feeds)["output"], ref0["output"], atol=1e-4, rtol=1e-3)
    with pytest.raises(KilnError, match=r"compiled for batch sizes 4\.\.4"):
        session.infer(make_inputs(spec1.inputs, 3, 0))


def test_compile_without_freezing_saves_portable_caches_and_hot_loads_them(tiny, tmp_path, monkeypatch):
    path, spec = tiny
    t = target("nofreeze", COMPILE, options={"mode": "compile", "freezing": False}, profile={"min": 4, "opt": 4, "max": 4})
    manifest = build_engine(t, BuildSource(path, spec), tmp_path / "e")
    cache = tmp_path / "e" / manifest["compile_cache"]["file"]
    assert manifest["freezing"] is False and cache.stat().st_size == manifest["compile_cache"]["bytes"] > 0
    loaded = []
    real = torch.compiler.load_cache_artifacts
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: loaded.append(len(b)) or real(b))
    session, _ = load_engine(tmp_path / "e", t)
    assert loaded == [cache.stat().st_size]
    feeds, ref = reference(spec, 4)
    np.testing.assert_allclose(session.infer(feeds)["output"], ref["output"], atol=1e-4, rtol=1e-3)


def test_compile_refuses_a_batch_outside_the_profile(tiny, compiled_session):
    _, spec = tiny
    session = compiled_session
    with pytest.raises(
        KilnError,
        match=r"'torch-compile' \(torch compile\) was compiled for batch sizes 1\.\.20 "
        r"\(targets\.torch-compile\.profile min=1 opt=4 max=20\); got input \[21, 3, 16, 16\]",
    ):
        session.infer(make_inputs(spec.inputs, 21, 0))


def test_loading_with_another_mode_is_refused(compiled):
    with pytest.raises(KilnError, match="built in torch mode 'compile', but targets.torch-compile.options.mode is now 'aoti'"):
        load_engine(compiled[0], target("torch-compile", AOTI))


def test_aoti_package_records_the_compile(aoti):
    engine, manifest = aoti
    assert manifest["mode"] == "aoti" and manifest["freezing"] is True
    assert manifest["precision"]["executed"] == "fp32"
    assert (engine / "model.pt2").stat().st_size == manifest["package_bytes"] > 0
    assert not (engine / "state_dict.pt").exists()  # the package carries the (frozen) weights
    assert 0 < manifest["export_seconds"] < manifest["compile_seconds"] <= manifest["build_seconds"]
    assert manifest["load_first_batch_seconds"] > 0
    assert manifest["graph"]["nodes_in"] >= 8
    assert manifest["graph"]["fusions"]["binary_folding"] >= 2 and manifest["graph"]["fusions"]["mkldnn_conv_weight_pack"] >= 2


def test_aoti_loads_without_the_model_code_and_matches_eager(tiny, aoti):
    from kiln.runtimes.torch import engine as kiln_torch

    _, spec = tiny
    refs = {b: reference(spec, b) for b in (2, 3, 4, 9, 16)}  # eager needs the model code: compute first
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tinymodels", None)  # `import tinymodels` now raises ImportError

        def no_model(*a, **k):
            raise AssertionError("aoti load built the model")

        mp.setattr(kiln_torch, "build_model", no_model)
        with pytest.raises(KilnError, match="cannot import module 'tinymodels'"):
            build_model(spec)  # the entrypoint really is unavailable
        session, _ = load_engine(aoti[0], target("torch-aoti", AOTI))
        for batch, (feeds, ref) in refs.items():
            got = session.infer(feeds)
            np.testing.assert_allclose(got["output"], ref["output"], atol=1e-4, rtol=1e-3, err_msg=f"batch {batch}")


@pytest.mark.parametrize("batch", [1, 17])
def test_aoti_refuses_a_batch_outside_the_profile(tiny, aoti, batch):
    _, spec = tiny
    session, _ = load_engine(aoti[0], target("torch-aoti", AOTI))
    with pytest.raises(KilnError, match=rf"\(torch aoti\) was compiled for batch sizes 2\.\.16 .*got input \[{batch}, 3, 16, 16\]"):
        session.infer(make_inputs(spec.inputs, batch, 0))


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"mode": "compile", "compile_mod": "default"},
            r"unknown keys \['compile_mod'\] \(did you mean 'compile_mode'\?\); known: mode .*compile_mode .*freezing",
        ),
        ({"mode": "jit"}, r"options.mode 'jit' is not one of eager, compile, aoti"),
        (
            {"mode": "compile", "compile_mode": "fast"},
            r"compile_mode 'fast' is not one of default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs",
        ),
        ({"mode": "aoti", "compile_mode": "default"}, r"compile_mode applies to mode compile only \(this target's mode is aoti\)"),
        ({"mode": "compile", "freezing": "yes"}, r"freezing must be true or false, got 'yes'"),
        ({"freezing": True}, r"freezing applies to modes compile and aoti only"),
    ],
)
def test_bad_options_are_rejected_before_building(tiny, tmp_path, options, message):
    path, spec = tiny
    t = target("bad", {"runtime": "torch", "options": options, "required": False})  # config errors fail even optional targets
    with pytest.raises(KilnError, match=message):
        build_engine(t, BuildSource(path, spec), tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(native_bf16(), reason="this CPU has native bf16: the refusal does not apply")
@pytest.mark.parametrize("raw", [COMPILE, AOTI], ids=["compile", "aoti"])
def test_bf16_is_refused_on_cpus_without_native_bf16(tiny, tmp_path, raw):
    path, spec = tiny
    with pytest.raises(KilnError, match=r"has no native bf16 .*slower than fp32 .*mark the target `required: false`"):
        build_engine(target("t-bf16", raw, precision="bf16"), BuildSource(path, spec), tmp_path / "e")
    manifest = build_engine(target("t-bf16", raw, precision="bf16", required=False), BuildSource(path, spec), tmp_path / "e")
    assert "no native bf16" in manifest["skipped"]


def test_fp16_on_cpu_and_cuda_without_a_gpu_are_refused(tiny, tmp_path):
    path, spec = tiny
    with pytest.raises(KilnError, match="fp16 runs on CUDA only in the torch runtime"):
        build_engine(target("t", COMPILE, precision="fp16"), BuildSource(path, spec), tmp_path / "e")
    with pytest.raises(KilnError, match="device 'tpu' is not one the torch runtime knows: cpu, cuda or cuda:N"):
        build_engine(target("t", COMPILE, device="tpu"), BuildSource(path, spec), tmp_path / "e")
    if not torch.cuda.is_available():
        with pytest.raises(KilnError, match=r"no CUDA device here \(torch.cuda.is_available\(\) is False"):
            build_engine(target("t", AOTI, device="cuda", precision="fp16"), BuildSource(path, spec), tmp_path / "e")


@pytest.mark.parametrize("raw", [COMPILE, AOTI], ids=["compile", "aoti"])
def test_bf16_graph_runs_autocast(tiny, tmp_path, raw):
    """The bf16 path itself (autocast traced into the graph / exported program), run directly: emulated
    and slow on CPUs without native bf16, which is why kiln refuses it there; here it only has to compute
    the right thing."""
    from kiln.runtimes import get_runtime

    path, spec = tiny
    rt = get_runtime("torch")
    t = target("t-bf16", raw, precision="bf16", profile={"min": 2, "opt": 4, "max": 8})
    (tmp_path / "e").mkdir()
    extra = rt.build(t, BuildSource(path, spec), tmp_path / "e")
    assert extra["executed_precision"] == "bf16 autocast" and extra["compile_seconds"] > 0
    session = rt.load(tmp_path / "e", extra, t)
    feeds, ref = reference(spec, 5)
    got = session.infer(feeds)["output"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref["output"], atol=0.1, rtol=0.05)
    assert not np.allclose(got, ref["output"], atol=1e-6, rtol=0), "bf16 gave fp32-exact results: autocast did not run"


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode, precision", [("compile", "fp16"), ("aoti", "bf16"), ("compile", "fp32")])
def test_cuda_engines_run_reduced_precision_and_time_on_the_device(tiny, tmp_path, mode, precision):
    path, spec = tiny
    raw = {"runtime": "torch", "device": "cuda", "profile": {"min": 1, "opt": 4, "max": 8}, "options": {"mode": mode}}
    t = target("gpu", raw, precision=precision)
    manifest = build_engine(t, BuildSource(path, spec), tmp_path / "e")
    assert manifest["precision"]["executed"] == ("fp32" if precision == "fp32" else f"{precision} autocast")
    session, _ = load_engine(tmp_path / "e", t)
    feeds, ref = reference(spec, 3)
    tol = {"atol": 1e-3, "rtol": 1e-3} if precision == "fp32" else {"atol": 0.1, "rtol": 0.05}
    np.testing.assert_allclose(session.infer(feeds)["output"], ref["output"], **tol)
    assert session.time_ms(feeds) > 0


def test_a_compiled_engine_loads_its_kernels_instead_of_compiling_them_again(compiled, tiny, tmp_path_factory):
    """The benchmark is a new process: with freezing the FX graph cache keeps nothing, so without the build's
    kernels (inductor_kernels.tar) every load ran the C++ compiler again (72 s for ResNet-18 on 2 cores).
    Built a second time in this process (as quickrun and the tuning's candidate builds do): kernels the first
    build left in Inductor's memory must still reach the second engine's file."""
    engine, manifest = built(tiny, tmp_path_factory, "torch-compile", COMPILE)
    assert compiled[0] != engine
    assert manifest["compile_cache"]["kernels"]["bytes"] == (engine / "inductor_kernels.tar").stat().st_size > 0
    code = f"""
import json, sys
from pathlib import Path
import kiln.runtimes.torch.engine as rt
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_torch_compile import COMPILE, target
from kiln.pipeline.engine import load_engine
seen = []
unpack = rt.unpack_inductor_cache
def spy(archive):
    folder = unpack(archive)
    seen.append((folder, {{p.name for p in folder.rglob("*.main.so")}}))
    return folder
rt.unpack_inductor_cache = spy
load_engine(Path({str(engine)!r}), target("torch-compile", COMPILE))
(folder, before), = seen
print(json.dumps({{"before": sorted(before), "after": sorted(p.name for p in folder.rglob("*.main.so"))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], env=venv_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    kernels = json.loads(out.stdout.strip().splitlines()[-1])
    # Kernels are <hash>.main.so; a load may still compile Inductor's tiny once-per-process check of the CPU's vector
    # ISA (a plain <hash>.so), which the build process had made before the folder was set.
    assert kernels["before"], "the build packed no compiled kernel"
    assert kernels["after"] == kernels["before"], "the load compiled kernels the build had compiled already"

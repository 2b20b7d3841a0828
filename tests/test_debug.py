"""kiln.diagnose.debug (first divergence at fusion-surviving boundaries), kiln.diagnose.repair and `kiln compare`, on a
trained model whose int8 fails by construction on every CPU (tests/outlier.py: an outlier activation channel)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import venv_env
from outlier import INT8, build_outlier_project

from kiln.accuracy.budgets import accuracy_against_reference
from kiln.config.views import Target
from kiln.diagnose.debug import debug_engines, diagnose, eval_feeds
from kiln.pipeline.engine import load_engine


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits_trained):
    """A project folder as the pipeline leaves it (artifacts/, params.yaml) for the outlier model: an fp32 and two
    int8 engines."""
    return build_outlier_project(tmp_path_factory.mktemp("outlier"), digits_trained["model"], digits_trained["dirs"])


def target(project, name: str) -> Target:
    return Target.from_params(name, project["params"])


def second_conv(project) -> str:
    return [n.name for n in onnx.load(str(project["root"] / "artifacts" / "model.onnx")).graph.node if n.op_type == "Conv"][1]


def test_the_outlier_is_invisible_in_fp32_and_collapses_int8_on_both_runtimes(project):
    ref = project["reference"]
    assert (ref["outputs"]["logits"].argmax(1) == ref["labels"]).mean() > 0.9  # trained, and the outlier kept its function
    for name in ["onnxruntime", *INT8]:
        session, _ = load_engine(project["root"] / "artifacts" / "engines" / name, target(project, name))
        agreement = accuracy_against_reference(session, ref, chunk=8)["top1_agreement"]
        assert agreement > 0.99 if name == "onnxruntime" else agreement < 0.8, (name, agreement)


@pytest.mark.parametrize("name", list(INT8))
def test_debug_reads_the_engine_itself_and_finds_the_layer_after_the_outlier(project, name):
    root = project["root"] / "artifacts"
    feeds = eval_feeds(project["reference"], 16)
    result = debug_engines(root / "model.onnx", feeds, None, (root / "engines" / name, target(project, name)))
    assert result["engine"]["mode"] == "engine", result["engine"]  # fusions intact, final outputs bit-identical
    rows = {r["boundary"]: r for r in result["boundaries"]}
    assert {"relu", "relu_1", "logits"} <= set(rows)
    # The outlier channel dominates the first block's output, so that tensor still looks right; the second conv,
    # which reads the other (now zeroed) channels, is where the engine departs.
    assert rows["relu"]["sqnr_db"] > 20
    first = result["first_divergent"]
    assert first is not None and first["boundary"] == "relu_1" and first["sqnr_db"] < 12, first
    assert result["largest_drop"]["boundary"] == "relu_1"
    assert [r["index"] for r in result["boundaries"]] == list(range(len(result["boundaries"])))


def test_the_fp32_engine_does_not_diverge(project):
    root = project["root"] / "artifacts"
    result = debug_engines(
        root / "model.onnx", eval_feeds(project["reference"], 8), None, (root / "engines" / "onnxruntime", target(project, "onnxruntime"))
    )
    assert result["first_divergent"] is None and min(r["sqnr_db"] for r in result["boundaries"]) > 60


def repair(project, name: str, **kwargs):
    from kiln.diagnose.repair import repair_target

    root = project["root"] / "artifacts"
    found = debug_engines(root / "model.onnx", eval_feeds(project["reference"], 16), None, (root / "engines" / name, target(project, name)))
    result = repair_target(target(project, name), project["params"], found, max_builds=8, **kwargs)
    speed = result["speed"]
    assert speed["int8_ms_per_image"] > 0 and speed["repaired_ms_per_image"] > 0 and speed["fp32_ms_per_image"] > 0
    # A repair no faster than fp32 is not one (int8 bought nothing): on this tiny model that depends on the CPU, so
    # the status must agree with the speeds measured side by side, whichever way they fall.
    faster = speed["repaired_ms_per_image"] < speed["fp32_ms_per_image"]
    assert result["status"].startswith("repaired") == faster, result["lines"]
    assert faster or ("no faster than fp32" in result["status"] and "apply:" not in "\n".join(result["lines"]))
    assert result["before"]["top1_agreement"] < 0.8 and result["after"]["top1_agreement"] >= 0.98
    assert result["builds"] <= 8 and not list(project["root"].parent.glob("kiln-repair-*"))  # builds in a temp folder, removed
    return result


def test_openvino_repair_tries_smoothquant_first_and_it_wins_with_no_layer_in_float(project, monkeypatch):
    monkeypatch.chdir(project["root"])
    result = repair(project, "openvino-int8")
    assert result["remedy"].startswith("SmoothQuant") and result["float_layers"] == [], result["lines"]
    assert result["probes"][1]["remedy"] == result["remedy"] and result["probes"][1]["passed"]  # one build after `before`
    assert result["override"] == "kiln params '++targets.openvino-int8.calibration.options.smooth_quant=0.5'"
    assert result["speed"]["layers"] == [] and "tried SmoothQuant" in "\n".join(result["lines"])


def test_onnxruntime_repair_tries_cross_layer_equalization_first_and_it_wins_with_no_layer_in_float(project, monkeypatch):
    monkeypatch.chdir(project["root"])
    result = repair(project, "onnxruntime-int8")
    assert result["remedy"].startswith("cross-layer equalization") and result["float_layers"] == [], result["lines"]
    assert result["override"] == "kiln params '++targets.onnxruntime-int8.calibration.options.equalize=true'"


def test_equalization_keeps_the_function_and_brings_the_outlier_channel_into_line(project, tmp_path):
    import onnxruntime as ort
    from onnx import numpy_helper

    from kiln.runtimes.equalize import equalize_file

    source = project["root"] / "artifacts" / "model.onnx"
    copy = tmp_path / "equalized.onnx"
    copy.write_bytes(source.read_bytes())
    assert equalize_file(copy) == 1  # the export folded BatchNorm into the first conv: conv -> ReLU -> conv, one pair

    def first_conv_ranges(path):
        graph = onnx.load(str(path)).graph
        weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        conv = next(n for n in graph.node if n.op_type == "Conv")
        return np.abs(weights[conv.input[1]]).reshape(weights[conv.input[1]].shape[0], -1).max(axis=1)

    feeds = eval_feeds(project["reference"], 8)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0] for p in (source, copy)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-4, atol=1e-4)
    before, after = first_conv_ranges(source), first_conv_ranges(copy)
    assert before.max() / np.median(before) > 100 > after.max() / np.median(after)


@pytest.mark.parametrize("name", list(INT8))
def test_repair_returns_the_second_conv_to_float_and_brings_agreement_back(project, name, monkeypatch):
    monkeypatch.chdir(project["root"])
    root = project["root"] / "artifacts"
    result = repair(project, name, remedies=False)  # layers in float: what every runtime can do
    speed = result["speed"]
    assert result["candidates"][0] == second_conv(project)  # the first divergence's layer comes first
    # The first try is the diagnosed tensor with the layers around it: the layer it comes from (the second conv) and
    # the layer that makes that one's input (the first conv, whose output is the outlier tensor).
    convs = [n.name for n in onnx.load(str(root / "model.onnx")).graph.node if n.op_type == "Conv"]
    assert result["candidate_tensors"][0]["layers"] == [convs[1], convs[0]], result["candidate_tensors"]
    assert result["probes"][2]["float_layers"] == [convs[1], convs[0]]  # before, all candidates, then the diagnosis's
    assert "first try: the diagnosed tensor" in "\n".join(result["lines"])
    # OpenVINO quantizes a layer's inputs only, so the second conv alone in float repairs it; ONNX Runtime's Q/DQ also
    # quantizes the first conv's output (the outlier tensor itself), so there the first conv must go back to float too.
    assert sorted(result["float_layers"]) == sorted(convs if name == "onnxruntime-int8" else [second_conv(project)]), result["probes"]
    assert json.dumps(result["float_layers"], separators=(",", ":")) in result["override"]
    assert {layer["layer"] for layer in speed["layers"]} <= set(result["float_layers"])
    # NNCF's accuracy control, where the runtime's calibration options offer it, reported beside kiln's repair.
    control = result["runtime_accuracy_control"]
    if name == "openvino-int8":
        assert control["status"] == "ran" and control["passed"] and second_conv(project) in control["float_layers"], control
    else:
        assert control is None


def test_diagnose_says_where_and_writes_no_undeclared_file(project, monkeypatch):
    monkeypatch.chdir(project["root"])
    root = project["root"] / "artifacts"
    sentence = diagnose(
        "onnxruntime-int8",
        target(project, "onnxruntime-int8"),
        root / "engines" / "onnxruntime-int8",
        root / "model.onnx",
        project["reference"],
    )
    assert "first divergent boundary 'relu_1'" in sentence and "kiln debug onnxruntime-int8" in sentence
    # The benchmark stage calls it, and dvc.yaml declares no reports/debug output for that stage.
    assert not (project["root"] / "reports" / "debug" / "onnxruntime-int8.json").exists()
    broken = diagnose("x", target(project, "onnxruntime-int8"), root / "engines" / "missing", root / "model.onnx", project["reference"])
    assert broken.startswith("(the first-divergence search failed")


def run_cli(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=project["root"], env=venv_env(), capture_output=True, text=True, timeout=300)


def test_debug_and_compare_from_the_command_line(project):
    out = run_cli(project, "-m", "kiln", "debug", "openvino-int8", "--samples", "8")
    assert out.returncode == 0, out.stderr
    assert "first divergent boundary 'relu_1'" in out.stdout and "openvino-int8: engine" in out.stdout
    compared = run_cli(project, "-m", "kiln", "compare", "onnxruntime-int8", "openvino-int8", "--samples", "8")
    assert compared.returncode == 0, compared.stderr
    assert "openvino-int8 against onnxruntime-int8" in compared.stdout
    table = (project["root"] / "reports" / "debug.csv").read_text().splitlines()
    assert table[0] == "target,against,index,boundary,op,sqnr_db,cosine,max_abs_err"
    pairs = {tuple(line.split(",")[:2]) for line in table[1:]}
    assert {("openvino-int8", "fp32"), ("openvino-int8", "onnxruntime-int8")} <= pairs
    assert (project["root"] / "reports" / "debug" / "openvino-int8-vs-onnxruntime-int8.json").is_file()
    missing = run_cli(project, "-m", "kiln", "debug", "nope")
    assert missing.returncode != 0 and "nope" in missing.stderr
    bad = run_cli(project, "-m", "kiln", "debug", "openvino-int8", "--repair", "--budget", "min_top1_agreement")
    assert bad.returncode == 1 and "--budget takes KEY=NUMBER" in bad.stderr


def test_boundaries_follow_graph_order_and_compare_needs_shared_names():
    from kiln.core.errors import KilnError
    from kiln.diagnose.debug import compare_boundaries
    from kiln.runtimes import Boundaries

    a = {"x": np.ones((2, 3), np.float32), "y": np.arange(6, dtype=np.float32).reshape(2, 3)}
    got = {"y": a["y"] + 0.5, "x": a["x"]}
    result = compare_boundaries(Boundaries("engine", "", a), Boundaries("engine", "", got), threshold_db=20)
    assert [r["boundary"] for r in result["boundaries"]] == ["x", "y"]
    assert result["boundaries"][0]["sqnr_db"] == 200.0 and result["first_divergent"]["boundary"] == "y"
    with pytest.raises(KilnError, match="share no boundary"):
        compare_boundaries(Boundaries("engine", "", a), Boundaries("engine", "", {"z": a["x"]}))


def test_contention_between_two_built_engines_from_the_command_line(project):
    # kiln.serving.contention, here because this module's project has built engines to load.
    out = run_cli(project, "-m", "kiln", "contention", "onnxruntime", "openvino-int8", "--seconds", "0.3")
    assert out.returncode == 0, out.stderr
    assert "onnxruntime (batch 8, 1 threads):" in out.stdout and "beside the other" in out.stdout
    record = json.loads((project["root"] / "reports" / "contention" / "onnxruntime+openvino-int8.json").read_text())
    assert set(record) == {"onnxruntime", "openvino-int8"} and all(r["slowdown"] > 0 and r["runs"] >= 10 for r in record.values())


def test_openvino_simulated_boundaries_still_find_the_layer(project):
    """The fallback when OpenVINO cannot expose its fused int8 kernels' outputs: the same IR with quantization simulated
    in f32. Asked for here (on this machine the engine's own kernels may be readable): the mode says so, and the
    simulated int8 still departs from fp32 where the engine does, at every boundary with the tensor of that name."""
    from kiln.diagnose.debug import compare_boundaries, reference_boundaries
    from kiln.runtimes import Boundaries
    from kiln.runtimes.openvino.boundaries import ov_boundaries

    root = project["root"] / "artifacts"
    feeds = eval_feeds(project["reference"], 16)
    name = "openvino-int8"
    mode, names, arrays, note = ov_boundaries(root / "engines" / name, root / "model.onnx", target(project, name), feeds, simulate=True)
    assert mode == "simulated" and "simulation asked for" in note and "LP_TRANSFORMS_MODE NO" in note, note
    got = dict(zip(names, arrays))
    ref = reference_boundaries(root / "model.onnx", feeds, names)
    assert all(got[x].shape == ref.tensors[x].shape for x in names)
    result = compare_boundaries(ref, Boundaries(mode, note, got))
    rows = {r["boundary"]: r for r in result["boundaries"]}
    assert {"relu", "relu_1", "logits"} <= set(rows) and rows["relu"]["sqnr_db"] > 20, rows
    assert result["first_divergent"]["boundary"] == "relu_1", result["first_divergent"]
    # Simulated, not fp32: the int8 damage shows in the final logits too, as in the engine itself.
    session, _ = load_engine(root / "engines" / name, target(project, name))
    engine_logits = session.infer(feeds)["logits"]
    agree = lambda a, b: float((a.argmax(1) == b.argmax(1)).mean())  # noqa: E731
    assert agree(got["logits"], ref.tensors["logits"]) < 0.9 and agree(got["logits"], engine_logits) > agree(
        got["logits"], ref.tensors["logits"]
    )
    # ...and not the engine's int8 kernels either: f32 arithmetic on fake-quantized values rounds differently.
    assert not np.array_equal(got["logits"], engine_logits)


def test_onnxruntime_boundaries_say_when_the_final_outputs_differ(project):
    """ONNX Runtime's boundaries are read from the engine run with added outputs; its final outputs are checked against
    the engine's normal ones, and a difference is said in the mode and the note (here the normal outputs given are
    another engine's: the fp32 one)."""
    from kiln.runtimes.onnxruntime.boundaries import ort_boundaries

    root = project["root"] / "artifacts"
    feeds = eval_feeds(project["reference"], 8)
    name = "onnxruntime-int8"
    own, _ = load_engine(root / "engines" / name, target(project, name))
    mode, names, _, note = ort_boundaries(root / "engines" / name, root / "model.onnx", feeds, reference=own.infer(feeds))
    assert mode == "engine" and note.startswith("final outputs bit-identical") and "relu_1" in names, note
    other, _ = load_engine(root / "engines" / "onnxruntime", target(project, "onnxruntime"))
    mode, names, _, note = ort_boundaries(root / "engines" / name, root / "model.onnx", feeds, reference=other.infer(feeds))
    assert mode == "engine (outputs differ)" and note.startswith("FINAL OUTPUTS DIFFER") and "relu_1" in names, note

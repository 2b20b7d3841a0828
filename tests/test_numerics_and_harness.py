"""The comparison module, the timing harness and atomic writes, on plain arrays and a toy session."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from kiln.accuracy.budgets import accuracy_against_reference
from kiln.accuracy.numerics import compare_output, degenerate_reason, summarize
from kiln.config.views import InputSpec, ShapeProfile
from kiln.core.atomic import atomic_path, write_json
from kiln.core.errors import KilnError
from kiln.data.inputs import make_inputs
from kiln.measure.benchmark import BenchmarkSettings, benchmark_latency, latency_stats, time_infer


def test_compare_finds_the_worst_element_against_its_own_allowance():
    ref = np.array([[100.0, 0.001, 1.0]], dtype=np.float32)
    got = np.array([[100.05, 0.0021, 1.0]], dtype=np.float32)
    c = compare_output("y", ref, got, atol=1e-3, rtol=1e-3)
    # 0.05 on 100 is within 1e-3 + 0.1; 0.0011 on 0.001 is not within 1e-3 + 1e-6.
    assert not c.passed and c.worst_index == (0, 1)
    assert c.max_abs_err == pytest.approx(0.05, rel=1e-3)
    assert "output 'y' at batch 3: max abs error" in c.failure_line("at batch 3")


def test_compare_metrics():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 10)).astype(np.float32)
    c = compare_output("logits", ref, ref.copy())
    assert c.passed and c.max_abs_err == 0 and c.top1_agreement == 1.0 and c.cosine == pytest.approx(1.0) and c.sqnr_db is None
    noisy = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    c = compare_output("logits", ref, noisy)
    assert 35 < c.sqnr_db < 45  # signal power 1, noise power 1e-4: 40 dB
    shuffled = ref[:, ::-1].copy()
    assert compare_output("logits", ref, shuffled).top1_agreement < 0.3
    assert compare_output("map", rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))).top1_agreement is None
    with pytest.raises(ValueError, match="shape"):
        compare_output("y", ref, ref[:3])
    assert summarize([compare_output("logits", ref, noisy), compare_output("b", ref, ref)])["max_abs_err"] == pytest.approx(
        np.abs(noisy - ref).max()
    )


def test_non_finite_outputs_never_pass():
    ref = np.ones((2, 3), dtype=np.float32)
    got = ref.copy()
    got[1, 2] = np.nan
    c = compare_output("y", ref, got, atol=1e-3, rtol=1e-3)
    assert not c.passed and c.worst_index == (1, 2)


def test_degenerate_reference():
    assert "near zero" in degenerate_reason(np.zeros((4, 10)))
    assert "same for every input" in degenerate_reason(np.tile(np.arange(10.0), (4, 1)))
    assert degenerate_reason(np.random.default_rng(0).standard_normal((4, 10))) is None


def test_seeded_inputs_are_reproducible():
    specs = (InputSpec("x", (3, 4)), InputSpec("ids", (5,), "int64"))
    a, b = make_inputs(specs, 2, 11), make_inputs(specs, 2, 11)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["x"].shape == (2, 3, 4) and a["x"].dtype == np.float32 and a["ids"].dtype == np.int64
    assert not np.array_equal(a["x"], make_inputs(specs, 2, 12)["x"])


class SleepySession:
    """A session whose latency is known: 2 ms per call, plus outputs that echo the input's sum."""

    input_names = ["x"]
    output_names = ["y"]

    def __init__(self):
        self.calls = 0

    def infer(self, feeds):
        self.calls += 1
        time.sleep(0.002)
        x = feeds["x"]
        return {"y": x.reshape(x.shape[0], -1)[:, :4] * 1.0}


def test_harness_warms_up_and_honours_iterations_and_time_floor():
    s = SleepySession()
    settings = BenchmarkSettings(warmup_iters=3, min_iters=5, min_time_s=0.05)
    times = time_infer(s, {"x": np.zeros((1, 4), np.float32)}, settings)
    assert len(times) >= 5 and sum(times) >= 45  # the 50 ms floor, measured as the sum of iterations
    assert s.calls == len(times) + 3
    assert min(times) >= 2.0


def test_latency_stats():
    stats = latency_stats([10.0] * 50 + [20.0] * 50, batch=4)
    assert stats["p50_ms"] == 15.0 and stats["p99_ms"] == pytest.approx(20.0)
    assert stats["ms_per_image"] == 3.75 and stats["images_per_s"] == pytest.approx(4000 / 15)


def test_batches_outside_the_profile_are_skipped_with_a_note():
    settings = BenchmarkSettings(batch_sizes=(1, 8, 64), warmup_iters=0, min_iters=1, min_time_s=0)
    stats, raw, notes = benchmark_latency(SleepySession(), (InputSpec("x", (4,)),), ShapeProfile(1, 8, 32), settings, progress=False)
    # The profile's min, opt and max are always measured, on top of the configured sizes.
    assert list(stats) == ["b1", "b8", "b32"] and len(raw["b8"]) == 1
    assert notes == ["batch 64 skipped: outside the target's profile [1, 32]"]
    stats, _, _ = benchmark_latency(SleepySession(), (InputSpec("x", (4,)),), ShapeProfile(2, 4, 6), settings, progress=False)
    assert list(stats) == ["b2", "b4", "b6"]


def test_accuracy_against_reference_chunks_and_compares():
    spec = (InputSpec("x", (4,)),)
    feeds = make_inputs(spec, 10, 5)
    labels = np.argmax(feeds["x"], axis=1)
    labels[:3] = (labels[:3] + 1) % 4  # three of ten labels the model gets wrong
    reference = {"inputs": feeds, "outputs": {"y": feeds["x"] * 1.0}, "labels": labels, "source": "ten rows"}
    acc = accuracy_against_reference(SleepySession(), reference, chunk=3)
    assert acc["samples"] == 10 and acc["max_abs_err"] == 0 and acc["top1_agreement"] == 1.0
    assert acc["top1"] == pytest.approx(0.7) and acc["top1_fp32"] == pytest.approx(0.7) and acc["top1_drop"] == 0.0


def test_benchmark_settings_errors():
    with pytest.raises(KilnError, match="benchmark has unknown keys"):
        BenchmarkSettings.from_params({"batchsizes": [1]})
    with pytest.raises(KilnError, match="batch_sizes must be a non-empty list"):
        BenchmarkSettings.from_params({"batch_sizes": []})


def test_atomic_path_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text().strip().startswith("{") and list(tmp_path.iterdir()) == [target]
    d = tmp_path / "engine"
    with atomic_path(d, is_dir=True) as tmp:
        (tmp / "f").write_text("1")
    with atomic_path(d, is_dir=True) as tmp:
        (tmp / "g").write_text("2")
    assert [p.name for p in d.iterdir()] == ["g"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "out.json"]
    write_json(tmp_path / "nan.json", {"x": [float("nan"), float("inf")]})
    assert json.loads((tmp_path / "nan.json").read_text()) == {"x": ["nan", "inf"]}


def test_trained_weights_rule_takes_every_model_but_a_bare_name_as_trained():
    from kiln.config.views import ModelSpec

    def rule(**model):
        base = {"name": None, "entrypoint": None, "inputs": {"x": {"shape": [3]}}}
        return ModelSpec.from_params({**base, **model}).trained_weights()

    assert rule(name="resnet18")[0] is False and "random weights" in rule(name="resnet18")[1]
    # Kiln cannot see an entrypoint's weights: it assumes they are trained, and says so.
    entry = rule(entrypoint="mymodule:model")
    assert entry[0] is True and "model.entrypoint" in entry[1] and "model.trained: false" in entry[1]
    assert rule(name="resnet18", checkpoint="c.pt")[0] is True
    assert rule(name="resnet18", weights="DEFAULT")[0] is True
    assert rule(entrypoint="m:f", trained=False) == (False, "model.trained is false")
    assert rule(name="resnet18", trained=True) == (True, "model.trained is true")
    with pytest.raises(KilnError, match="model.trained must be true, false or auto"):
        rule(name="resnet18", trained="yes")


def test_budget_rule_enforces_only_trained_models_with_fail_on_budget():
    from kiln.accuracy.budgets import enforce_budget, judge_budget

    acc = {"top1_agreement": 0.5, "sqnr_db": 30.0}
    default, own = {"min_top1_agreement": 0.99}, {"min_sqnr_db": 40.0}
    trained, random = (True, "trained: model.checkpoint is set"), (False, "random weights: model.name with neither")
    verdict = judge_budget(acc, default, own, fail_on_budget=True, trained=trained)
    assert verdict.limits == {"min_top1_agreement": 0.99, "min_sqnr_db": 40.0}  # the target's keys join the default
    assert verdict.violations == ["top1_agreement 0.5 < min_top1_agreement 0.99", "sqnr_db 30 < min_sqnr_db 40"]
    assert verdict.enforced and verdict.why_not_enforced is None
    with pytest.raises(KilnError, match=r"target 't' is over its accuracy budget on eval: top1_agreement 0.5 < min_top1_agreement 0.99"):
        enforce_budget(verdict, "t", "eval")
    random_init = judge_budget(acc, default, own, fail_on_budget=True, trained=random)
    assert not random_init.enforced and "random weights" in random_init.why_not_enforced
    enforce_budget(random_init, "t", "eval")  # reported, not raised
    switched_off = judge_budget(acc, default, {}, fail_on_budget=False, trained=trained)
    assert not switched_off.enforced and "fail_on_budget is false" in switched_off.why_not_enforced
    within = judge_budget({"top1_agreement": 1.0}, default, {"min_top1_agreement": 0.4}, fail_on_budget=True, trained=trained)
    assert within.violations == [] and within.why_not_enforced is None

"""Serve-shaped benchmarks, the report's sections, and the stale-params guard."""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest

from kiln.config.params import check_fresh, stamped_yaml
from kiln.config.views import ShapeProfile, Target, served_distribution
from kiln.core.errors import KilnError
from kiln.measure.benchmark import BenchmarkSettings, benchmark_served, headline_metrics, profile_mismatch, significant, time_infer
from kiln.report.markdown import render, stale_result_files, summary_csv, summary_rows
from kiln.report.sections import committed_metrics

PROFILE = ShapeProfile(1, 8, 32)


def target_params(**extra):
    return {"targets": {"t": {"runtime": "onnxruntime", "profile": {"min": 1, "opt": 8, "max": 32}, **extra}}}


def test_served_distribution_parses_and_checks():
    assert served_distribution({1: 0.7, 4: 0.2, 8: 0.1}, PROFILE, "w") == {1: 0.7, 4: 0.2, 8: 0.1}
    assert served_distribution({"8": 0.5, "1": 0.5}, PROFILE, "w") == {1: 0.5, 8: 0.5}  # keys from `dvc exp run -S`
    assert served_distribution(None, PROFILE, "w") is None
    with pytest.raises(KilnError, match=r"w: the shares of requests sum to 0.9, not 1"):
        served_distribution({1: 0.7, 4: 0.2}, PROFILE, "w")
    with pytest.raises(KilnError, match=r"batch 64 is outside the target's profile \[1, 32\]"):
        served_distribution({1: 0.5, 64: 0.5}, PROFILE, "w")
    with pytest.raises(KilnError, match=r"'x' is not a batch size"):
        served_distribution({"x": 1.0}, PROFILE, "w")
    with pytest.raises(KilnError, match=r"share of requests must be a number >= 0"):
        served_distribution({1: 1.5, 2: -0.5}, PROFILE, "w")


def test_target_serve_falls_back_to_benchmark_serve():
    params = {**target_params(), "benchmark": {"serve": {1: 1.0}}}
    assert Target.from_params("t", params).serve == {1: 1.0}
    own = {**target_params(serve={2: 0.25, 8: 0.75}), "benchmark": {"serve": {1: 1.0}}}
    assert Target.from_params("t", own).serve == {2: 0.25, 8: 0.75}
    with pytest.raises(KilnError, match=r"benchmark.serve: the shares of requests sum to 2"):
        Target.from_params("t", {**target_params(), "benchmark": {"serve": {1: 1.0, 2: 1.0}}})
    assert Target.from_params("t", {**target_params(serve=None), "benchmark": {"serve": {1: 1.0}}}).serve is None


def test_profile_mismatch_flags_an_optimum_nobody_serves():
    assert "profile optimum is batch 8" in profile_mismatch(PROFILE, {1: 0.7, 4: 0.2, 8: 0.1})
    assert "most common batch 1 at 70%" in profile_mismatch(PROFILE, {1: 0.7, 4: 0.2, 8: 0.1})
    assert profile_mismatch(PROFILE, {4: 0.3, 8: 0.4, 16: 0.3}) is None
    assert profile_mismatch(ShapeProfile(1, 1, 8), {1: 0.7, 4: 0.2, 8: 0.1}) is None


@pytest.fixture
def ort_session(tiny_onnx):
    import onnxruntime as ort

    from kiln.runtimes.onnxruntime import OrtSession

    path, spec, _ = tiny_onnx
    return OrtSession(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])), spec


def test_served_benchmark_draws_the_distribution(ort_session):
    session, spec = ort_session
    settings = BenchmarkSettings(warmup_iters=1, min_time_s=0.0, served_requests=400)
    stats, requests = benchmark_served(session, spec.inputs, {1: 0.7, 4: 0.2, 8: 0.1}, settings)
    assert stats["requests"] == len(requests) >= 400
    assert {b for b, _ in requests} <= {1, 4, 8}
    assert abs(stats["drawn"]["1"] - 0.7) < 0.08 and abs(stats["drawn"]["8"] - 0.1) < 0.06
    assert stats["images"] == sum(b for b, _ in requests)
    total_ms = sum(ms for _, ms in requests)
    assert stats["images_per_s"] == pytest.approx(1e3 * stats["images"] / total_ms, rel=1e-3)
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    # Same seed, same sequence of batch sizes: runs are comparable.
    _, again = benchmark_served(session, spec.inputs, {1: 0.7, 4: 0.2, 8: 0.1}, settings)
    assert [b for b, _ in again] == [b for b, _ in requests]


def test_device_timer_is_used_when_the_session_has_one(ort_session):
    session, spec = ort_session

    class DeviceTimed:
        """A real session that reports its own time, as CUDA sessions do with CUDA events."""

        input_names, output_names = session.input_names, session.output_names
        calls = 0

        def infer(self, feeds):
            return session.infer(feeds)

        def time_ms(self, feeds):
            DeviceTimed.calls += 1
            t0 = time.perf_counter()
            session.infer(feeds)
            return (time.perf_counter() - t0) * 1e3 + 1000.0  # marked: host timing could never be this slow

    feeds = {"input": np.zeros((2, 3, 16, 16), np.float32)}
    times = time_infer(DeviceTimed(), feeds, BenchmarkSettings(warmup_iters=1, min_iters=5, min_time_s=0.0))
    assert len(times) == 5 == DeviceTimed.calls and min(times) > 1000.0


def test_headline_metrics_keep_four_significant_figures():
    # A tiny model's 0.0123 and 0.0118 ms/image must stay apart in `dvc metrics diff` (3 decimals made them equal).
    assert significant(0.012345) == 0.01235 and significant(0.011812) == 0.01181
    assert significant(35.91234) == 35.91 and significant(81234.5) == 81230.0 and significant(0.0) == 0.0
    stats = {"ms_per_image": 0.0123456, "images_per_s": 81000.123, "p50_ms": 0.1}
    accuracy = {"top1_agreement": 0.921875, "top1": None, "cosine": 0.99}
    metrics = headline_metrics(8, stats, accuracy, {"images_per_s": 40123.77, "p99_ms": 0.456789})
    assert metrics == {
        "batch": 8,
        "ms_per_image": 0.01235,
        "images_per_s": 81000.0,
        "top1_agreement": 0.9219,
        "served_images_per_s": 40120.0,
        "served_p99_ms": 0.4568,
    }
    assert "served_p99_ms" not in headline_metrics(8, stats, accuracy, None)


def run_record(name, ms, top1=1.0, served=None, runtime="onnxruntime", compiler=None):
    latency = {f"b{b}": {"p50_ms": ms * b, "p99_ms": ms * b * 1.2, "ms_per_image": ms, "images_per_s": 1e3 / ms} for b in (1, 8, 32)}
    return {
        "metrics": {"batch": 8, "ms_per_image": ms, "images_per_s": round(1e3 / ms, 1), "top1_agreement": top1},
        "run": {
            "target": name,
            "runtime": runtime,
            "precision": {"requested": "fp32", "executed": "fp32"},
            "threads": 2,
            "machine": "cpu",
            "profile": {"min": 1, "opt": 8, "max": 32},
            "main_batch": 8,
            "latency": latency,
            "accuracy": {"top1_agreement": top1, "max_abs_err": 1e-6, "source": "64 images"},
            "served": served,
            "compiler": compiler or {},
            "notes": [],
        },
    }


def test_report_sections():
    served = {
        "distribution": {"1": 0.7, "4": 0.2, "8": 0.1},
        "requests": 200,
        "p50_ms": 3.0,
        "p90_ms": 9.0,
        "p99_ms": 20.0,
        "ms_per_image": 4.0,
        "images_per_s": 250.0,
        "profile_warning": "profile optimum is batch 8, but only 30%",
    }
    compiler = {
        "build_seconds": 1.5,
        "graph": {
            "nodes_in": 49,
            "nodes_out": 25,
            "fusions": {"Conv+Relu": 9, "Conv+Add+Relu": 8},
            "layer_precisions": {"fp32": 21},
            "source": "ORT",
        },
    }
    results = {"base": run_record("base", 10.0), "fast": run_record("fast", 2.5, top1=0.98, served=served, compiler=compiler)}
    previous = {
        "base": {"ms_per_image": 10.0, "images_per_s": 100.0, "top1_agreement": 1.0},
        "fast": {"ms_per_image": 5.0, "images_per_s": 200.0, "top1_agreement": 0.98},
    }
    md = render(results, None, "base", previous=previous, previous_label="HEAD")
    assert "| fast | fp32 | 8 | 2.500 | 400.0 | 4.00x | 0.980 | 250.0 |" in md  # summary at the main batch
    assert "| fast | onnxruntime | fp32 -> fp32 | 2 | 8 (opt) |" in md and "| 32 (max) |" in md
    assert "| fast | 1: 0.7, 4: 0.2, 8: 0.1 | 200 | 3.000 | 9.000 | 20.000 | 4.000 | 250.0 | 2.500 | FLAGGED |" in md
    assert "- **`fast`**: profile optimum is batch 8, but only 30%." in md
    assert "| fast | 1.5 | n/a | 49 | 25 | Conv+Relu x9, Conv+Add+Relu x8 | fp32 x21 | ORT |" in md
    assert "## Compared with the metrics committed at HEAD" in md
    assert "| fast | ms/image | 5 | 2.5 | -50.0% (better) |" in md
    assert "| base |" not in md.split("Compared with")[1]  # unchanged metrics are not listed
    rows = summary_rows(results, "base")
    assert summary_csv(rows).splitlines() == [
        "target,runtime,precision,batch,ms_per_image,images_per_s,speedup,top1_agreement,throughput_images_per_s,peak_rss_mb,pct_of_peak",
        "base,onnxruntime,fp32,8,10.0,100.0,1.0,1.0,,,",
        "fast,onnxruntime,fp32,8,2.5,400.0,4.0,0.98,,,",
    ]
    assert "Compared with" not in render(results, None, "base", previous=None)


def test_stale_result_files(tmp_path):
    for folder in ("metrics", "plots"):
        (tmp_path / folder).mkdir()
        for name in ("kept", "gone"):
            (tmp_path / folder / f"{name}.{'json' if folder == 'metrics' else 'csv'}").write_text("{}")
    assert stale_result_files(["kept"], tmp_path / "metrics", tmp_path / "plots", tmp_path / "absent") == [
        tmp_path / "metrics" / "gone.json",
        tmp_path / "plots" / "gone.csv",
    ]


def test_committed_metrics_reads_the_last_commit(in_tmp):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True, capture_output=True)

    from pathlib import Path

    assert committed_metrics(["a"], Path("reports/metrics")) is None  # not a repository
    git("init", "-q")
    (in_tmp / "reports" / "metrics").mkdir(parents=True)
    (in_tmp / "reports" / "metrics" / "a.json").write_text('{"ms_per_image": 2.0}')
    git("add", "-A")
    git("commit", "-qm", "m")
    (in_tmp / "reports" / "metrics" / "a.json").write_text('{"ms_per_image": 1.0}')
    assert committed_metrics(["a", "b"], Path("reports/metrics")) == {"a": {"ms_per_image": 2.0}}


def test_stale_params_are_refused(in_tmp, monkeypatch):
    import shutil

    from conftest import ROOT

    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    monkeypatch.delenv("KILN_ALLOW_STALE_PARAMS", raising=False)
    shutil.copytree(ROOT / "conf", in_tmp / "conf")
    (in_tmp / "params.yaml").write_text(stamped_yaml(["targets.openvino.threads=1"], "conf"))
    check_fresh("params.yaml", "conf")  # fresh: no error
    (in_tmp / "conf" / "targets" / "unused.yaml").write_text("x: {runtime: torch}\n")
    check_fresh("params.yaml", "conf")  # conf/ changed, the composition did not: no error
    cpu = in_tmp / "conf" / "targets" / "cpu.yaml"
    cpu.write_text(cpu.read_text().replace("performance_hint: LATENCY", "performance_hint: THROUGHPUT", 1))
    with pytest.raises(
        KilnError,
        match=r"params.yaml is stale: conf/ changed since it was composed with overrides \['targets.openvino.threads=1'\]; "
        r"run `kiln params targets.openvino.threads=1`",
    ):
        check_fresh("params.yaml", "conf")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc")  # inside `dvc exp run`, DVC composed params.yaml itself
    check_fresh("params.yaml", "conf")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    # Written by DVC (no stamp): judged by modification time.
    (in_tmp / "params.yaml").write_text("model: {}\n")
    old = time.time() - 60
    os.utime(in_tmp / "params.yaml", (old, old))
    with pytest.raises(KilnError, match=r"params.yaml may be stale: conf/targets/cpu.yaml.* changed after it was written"):
        check_fresh("params.yaml", "conf")
    monkeypatch.setenv("KILN_ALLOW_STALE_PARAMS", "1")
    check_fresh("params.yaml", "conf")

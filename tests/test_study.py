"""The quick default and the deep study one switch away (conf/study/): what each composes to, that a choice on the
command line still wins, that a recommendation not measured carries no command, and that the report says which
study it is."""

from __future__ import annotations

from conftest import ROOT
from test_verdict import candidates

from kiln.config.params import compose
from kiln.report.markdown import render
from kiln.serving.recommend import judge_recommendation

COMPILERS = {"torch-compile", "torch-aoti", "torch-compile-bf16", "torch-aoti-bf16"}


def test_the_default_is_the_quick_study_and_deep_adds_what_it_leaves_out():
    quick = compose(config_dir=ROOT / "conf")
    deep = compose(["study=deep"], config_dir=ROOT / "conf")
    assert quick["study"]["name"] == "quick" and deep["study"]["name"] == "deep"
    # Every runtime and precision of the CPU set in both; the compilers and the tuning in deep only.
    runtimes = {(t["runtime"], t["precision"]) for t in quick["targets"].values()}
    assert {("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("onnxruntime", "int8"), ("openvino", "int8")} <= runtimes
    assert {("torch", "bf16"), ("openvino", "bf16"), ("openvino", "fp16")} <= runtimes
    assert not COMPILERS & set(quick["targets"]) and COMPILERS <= set(deep["targets"])
    assert set(quick["targets"]) < set(deep["targets"])
    assert not any(t["tune"] for t in quick["targets"].values())
    assert {n for n, t in deep["targets"].items() if t["tune"]} == {"onnxruntime-int8", "openvino-int8", "torch-bf16", "openvino-bf16"}
    # Deep times longer and searches finer; everything else (budgets, the served mix, the objective) is shared.
    assert deep["benchmark"]["min_time_s"] > quick["benchmark"]["min_time_s"]
    assert 32 in deep["benchmark"]["batch_sizes"] and 32 not in quick["benchmark"]["batch_sizes"]
    assert deep["serving"]["search_iterations"] > quick["serving"]["search_iterations"]
    assert deep["serving"]["measure_recommended"] and not quick["serving"]["measure_recommended"]
    for block, key in (("benchmark", "accuracy_budget"), ("benchmark", "serve"), ("serving", "slo_ms"), ("benchmark", "fail_on_budget")):
        assert deep[block][key] == quick[block][key], (block, key)
    for block in ("export", "validate", "calibration", "data", "model", "report"):
        assert deep[block] == quick[block], block


def test_a_choice_on_the_command_line_wins_over_the_study():
    deep_gpu = compose(["study=deep", "targets=gpu"], config_dir=ROOT / "conf")
    assert deep_gpu["targets"] == compose(["targets=gpu"], config_dir=ROOT / "conf")["targets"]
    deep_smoke = compose(["serving=smoke", "study=deep"], config_dir=ROOT / "conf")
    assert deep_smoke["serving"] == compose(["serving=smoke"], config_dir=ROOT / "conf")["serving"]
    assert deep_smoke["benchmark"] == compose(["study=deep"], config_dir=ROOT / "conf")["benchmark"]


def test_a_recommendation_not_measured_carries_no_command():
    open_loop = {
        "batcher": {"max_batch": 8, "max_queue_delay_ms": 5.0},
        "max_rate_at_slo": 40.0,
        "search": {"tried": [[2.0, 10.0, True], [60.0, 900.0, False]], "confirmed": []},
        "recommended": {"batcher": {"max_batch": 16, "max_queue_delay_ms": 20.0}, "override": "kiln params x=1", "changed": True},
        "recommended_note": "not measured: serving.measure_recommended is off (study=deep measures it)",
    }
    judged = judge_recommendation(open_loop)
    assert judged is not None and judged["apply"] is None and not judged["better"]
    assert "not measured" in judged["why"] and "study=deep" in judged["why"]


def test_the_report_names_its_study_beneath_the_verdict():
    study = compose(config_dir=ROOT / "conf")["study"]
    lines = render(candidates(), None, "fp32", study=study).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Study: **quick** (the default)"))
    assert "study=deep adds" in lines[at]
    assert at < next(i for i, line in enumerate(lines) if line.startswith("Machine:"))
    assert lines[2].startswith("Ship: ")  # the verdict still comes first

"""Target names that cannot inject, a params.yaml that cannot drift unnoticed, and every params-only check in configure."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, venv_env

from kiln.config.params import check_fresh, read_stamp
from kiln.config.views import Target
from kiln.core.errors import KilnError

EVIL = "x;touch PWNED;#"


def kiln(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln", "params", *args], cwd=cwd, env=venv_env(), capture_output=True, text=True, timeout=300
    )


def configure(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "configure.py")], cwd=cwd, env=venv_env(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def conf_copy(in_tmp, monkeypatch):
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    monkeypatch.delenv("KILN_ALLOW_STALE_PARAMS", raising=False)
    shutil.copytree(ROOT / "conf", in_tmp / "conf")
    return in_tmp


@pytest.mark.parametrize("name", [EVIL, "a/b", "../up", ".hidden", "-flag", "x y", "t$(id)", 7])
def test_unsafe_target_names_are_refused(name):
    with pytest.raises(KilnError, match=r"is not allowed: .*letters, digits, '\.', '_' and '-'"):
        Target.from_params(name, {"targets": {name: {"runtime": "onnxruntime"}}})


def test_safe_target_names_pass():
    for name in ("openvino-int8", "ov_2.v3", "A1"):
        assert Target.from_params(name, {"targets": {name: {"runtime": "onnxruntime"}}}).name == name


def test_composing_a_set_with_an_unsafe_name_writes_nothing(conf_copy):
    (conf_copy / "conf" / "targets" / "evil.yaml").write_text(f"'{EVIL}': {{runtime: onnxruntime}}\n")
    result = kiln(conf_copy, "targets=evil")
    assert result.returncode == 1
    assert f"target name '{EVIL}' is not allowed" in result.stderr
    assert not (conf_copy / "params.yaml").exists()


@pytest.mark.slow
def test_no_shell_injection_through_dvc(tmp_path):
    """A params.yaml written as `dvc exp run` would (no kiln check on the way) with a name that is a shell command."""
    from test_pipeline import make_project, run

    project = make_project(tmp_path)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["targets"] = {EVIL: {"runtime": "onnxruntime"}, "ok": {"runtime": "onnxruntime"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))  # no stamp: as DVC writes it
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    assert f"kiln: error: target name '{EVIL}' is not allowed" in result.stderr
    # Straight to the stage, past configure: the quoting in dvc.yaml keeps the name one word.
    run(["dvc", "repro", "-s", f"build@{EVIL}"], project, check=False)
    assert not (project / "PWNED").exists()
    assert not list(project.rglob("PWNED"))


def test_a_hand_edit_of_a_composed_params_yaml_is_caught(conf_copy):
    assert kiln(conf_copy, "targets.openvino.threads=1").returncode == 0
    check_fresh("params.yaml", "conf")
    text = (conf_copy / "params.yaml").read_text()
    lines = text.splitlines(keepends=True)
    # Formatting alone is no edit.
    (conf_copy / "params.yaml").write_text(lines[0] + "# a comment\n" + "".join(lines[1:]))
    check_fresh("params.yaml", "conf")
    params = yaml.safe_load(text)
    params["targets"]["onnxruntime"]["threads"] = 1
    (conf_copy / "params.yaml").write_text(lines[0] + yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(KilnError) as e:
        check_fresh("params.yaml", "conf")
    message = str(e.value)
    assert "was edited by hand after `kiln params` composed it from conf/ with overrides ['targets.openvino.threads=1']" in message
    assert "(targets.onnxruntime.threads=1)" in message
    # The advice keeps the overrides the file was composed with, and turns the edit into one more.
    assert "`kiln params targets.openvino.threads=1 targets.onnxruntime.threads=1`" in message
    result = kiln(conf_copy, "targets.openvino.threads=1", "targets.onnxruntime.threads=1")
    assert result.returncode == 0
    assert yaml.safe_load((conf_copy / "params.yaml").read_text()) == params


def test_check_keeps_the_overrides(conf_copy):
    assert kiln(conf_copy, "targets.openvino.threads=1").returncode == 0
    result = kiln(conf_copy, "--check")
    assert result.returncode == 0, result.stderr
    assert "matches conf/ with overrides ['targets.openvino.threads=1']" in result.stdout
    cpu = conf_copy / "conf" / "targets" / "cpu.yaml"
    cpu.write_text(cpu.read_text().replace("performance_hint: LATENCY", "performance_hint: THROUGHPUT", 1))
    result = kiln(conf_copy, "--check")
    assert result.returncode == 1
    assert "run `kiln params targets.openvino.threads=1`" in result.stderr


def test_saved_overrides_survive_dvc_experiment_composition(conf_copy):
    from dvc.utils.hydra import compose_and_dump

    (conf_copy / "conf" / "targets" / "small.yaml").write_text(
        "onnxruntime: {runtime: onnxruntime, threads: null}\nopenvino: {runtime: openvino, threads: null}\n"
    )
    result = kiln(conf_copy, "targets=small")
    assert "does not keep these overrides; `kiln params --save targets=small`" in result.stderr
    result = kiln(conf_copy, "--save", "targets=small", "targets.openvino.threads=1")
    assert result.returncode == 0, result.stderr
    config = (conf_copy / "conf" / "config.yaml").read_text()
    assert "  - targets: small\n" in config and "# Kiln's defaults, in one place." in config  # comments kept
    assert read_stamp(conf_copy / "params.yaml")["overrides"] == []
    # What `dvc exp run -S targets.onnxruntime.threads=2` composes: DVC's own function, from conf/config.yaml.
    compose_and_dump(conf_copy / "exp.yaml", str(conf_copy / "conf"), None, "config", "", ["targets.onnxruntime.threads=2"])
    composed = yaml.safe_load((conf_copy / "exp.yaml").read_text())
    assert set(composed["targets"]) == {"onnxruntime", "openvino"}
    assert composed["targets"]["openvino"]["threads"] == 1 and composed["targets"]["onnxruntime"]["threads"] == 2


def test_an_override_of_an_integer_key_gets_a_hint_not_a_crash(conf_copy):
    result = kiln(conf_copy, "benchmark.serve.1=0.5")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        "'benchmark.serve' has integer keys" in result.stderr and "'~benchmark.serve' '+benchmark.serve={1: 0.5, 4: 0.5}'" in result.stderr
    )
    result = kiln(conf_copy, "~benchmark.serve", "+benchmark.serve={1: 0.5, 4: 0.5}")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((conf_copy / "params.yaml").read_text())["benchmark"]["serve"] == {1: 0.5, 4: 0.5}


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "targets.openvino.precision=fp8",
            "targets.openvino.precision 'fp8': runtime 'openvino' does not offer precision 'fp8'; it offers",
        ),
        ("benchmark.batch_sizes=[0]", "benchmark.batch_sizes must be a non-empty list of positive integers, got [0]"),
        ("validate.batch_sizes=[2]", "validate.batch_sizes must hold at least two positive batch sizes"),
        ("+targets.onnxruntime-int8.calibration.method=kl", "targets.onnxruntime-int8.calibration.method 'kl' is not one of minmax"),
        (
            "+targets.openvino.options.performance_hnt=LATENCY",
            "targets.openvino.options has unknown keys ['performance_hnt'] (did you mean 'performance_hint'?)",
        ),
        ("targets.openvino.options.performance_hint=FAST", "targets.openvino.options.performance_hint 'FAST' is not one of LATENCY"),
        (
            "+targets.openvino-int8.calibration.options.presett=mixed",
            "targets.openvino-int8.calibration.options (with calibration.options) has unknown keys ['presett'] (did you mean 'preset'?)",
        ),
        (
            "+targets.onnxruntime-int8.calibration.options.preset=mixed",
            "targets.onnxruntime-int8.calibration.options (with calibration.options) has unknown keys ['preset']",
        ),
        (
            "targets.onnxruntime.options.graph_optimization_level=max",
            "graph_optimization_level 'max' is not one of disable, basic, extended, all",
        ),
        (
            "+targets.onnxruntime.accuracy_budget.min_top5=0.9",
            "accuracy_budget (or benchmark.accuracy_budget) has unknown keys ['min_top5']",
        ),
        ("export.opset=99", "export.opset 99 cannot be targeted"),
    ],
)
def test_configure_refuses_what_would_fail_later(conf_copy, override, message):
    assert kiln(conf_copy, override).returncode == 0
    result = configure(conf_copy)
    assert result.returncode == 1
    assert message in result.stderr
    assert not (conf_copy / "artifacts" / "targets").exists()


def test_threads_beyond_the_cores_are_capped_with_a_warning(conf_copy):
    from kiln.config.views import default_threads

    assert kiln(conf_copy, "targets.openvino.threads=1000").returncode == 0
    result = configure(conf_copy)
    assert result.returncode == 0, result.stderr
    assert f"targets.openvino.threads is 1000, more than the {default_threads()} cores" in result.stderr
    target = Target.from_params("openvino", yaml.safe_load((conf_copy / "params.yaml").read_text()))
    assert target.effective_threads == default_threads()

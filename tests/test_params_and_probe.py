"""params.yaml is the composition of conf/, and the probe is fast and framework-free."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import yaml
from conftest import ROOT, venv_env

from kiln.config.params import compose
from kiln.config.views import Target


def test_params_yaml_is_the_composition_of_conf():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    composed = compose(config_dir=ROOT / "conf")
    assert committed == composed, "params.yaml drifted from conf/: run `kiln params`"


def test_committed_params_yaml_passes_the_stale_check(monkeypatch):
    from kiln.config.params import check_fresh

    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    monkeypatch.delenv("KILN_ALLOW_STALE_PARAMS", raising=False)
    check_fresh(ROOT / "params.yaml", ROOT / "conf")  # else a fresh clone's first `dvc repro` stops at once


def test_every_default_target_parses():
    params = compose(config_dir=ROOT / "conf")
    assert set(params["targets"]) >= {"torch-eager", "onnxruntime", "openvino"}
    for name in params["targets"]:
        Target.from_params(name, params)
    assert params["report"]["baseline"] in params["targets"]


def test_overrides_with_hyphenated_target_names():
    params = compose(["targets.torch-eager.threads=1", "benchmark=smoke"], config_dir=ROOT / "conf")
    assert params["targets"]["torch-eager"]["threads"] == 1
    assert params["benchmark"]["batch_sizes"] == [1, 4]


def test_params_check_command(tmp_path):
    conf = ROOT / "conf"
    env = venv_env()
    (tmp_path / "conf").symlink_to(conf)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    ok = subprocess.run([sys.executable, "-m", "kiln", "params", "--check"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("opset: 18", "opset: 17"))
    stale = subprocess.run([sys.executable, "-m", "kiln", "params", "--check"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert stale.returncode == 1 and "export differ from conf/" in stale.stderr


def test_probe_is_quick_and_imports_no_framework(tmp_path):
    code = (
        "import runpy, sys, time; t = time.perf_counter(); "
        f"runpy.run_path({str(ROOT / 'stages' / 'probe.py')!r}, run_name='__main__'); "
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'openvino', 'numpy') if m in sys.modules]; "
        "print(heavy, time.perf_counter() - t)"
    )
    shutil.copytree(ROOT / "stages", tmp_path / "stages")  # the probe digests each stage's code (kiln.pipeline.codedeps)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=venv_env(), capture_output=True, text=True, check=True)
    # Fast because it imports no framework (its time is measured in benchmarks/noop_repro.py, not asserted here).
    heavy, seconds = out.stdout.split("] ")
    assert heavy + "]" == "[]", f"the probe imported {heavy}]"
    assert json.loads((tmp_path / "artifacts" / "code" / "build-onnxruntime.json").read_text())["files"][0] == "stages/build.py"
    fp = json.loads((tmp_path / "artifacts" / "fingerprint.json").read_text())
    assert fp["hardware"]["cpu"]["arch"] and fp["software"]["torch"]

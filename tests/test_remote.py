"""The DVC remote: push, then a fresh clone pulls the engines instead of re-building them.

Against a real S3 API (moto's server on loopback, through DVC's own dvc-s3 plugin), and the
default local-folder remote of .dvc/config; plus kiln's remote pre-flight check (scripts/check_remote.py).
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, copy_project, require_module, venv_env
from test_pipeline import run, stages_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commit(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], project)


def timed(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.perf_counter()
    result = run(cmd, cwd)
    return result, time.perf_counter() - start


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1 with an empty bucket 'kiln'; yields its endpoint URL."""
    require_module("dvc_s3", "dvc-s3 (DVC's S3 plugin, a test dependency) is not installed: pip install -e '.[test]'")
    boto3 = require_module("boto3", "boto3 (a test dependency) is not installed: pip install -e '.[test]'")
    server_mod = require_module("moto.server", "moto[server] (a test dependency) is not installed: pip install -e '.[test]'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    # Fake credentials, for moto and for the DVC subprocesses (venv_env copies os.environ).
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="kiln")
        yield endpoint
    finally:
        server.stop()


@pytest.mark.slow
def test_push_then_fresh_clones_pull_instead_of_rebuilding(tmp_path, s3, mini_built):
    # Three fp32 targets built (conftest.mini_built): enough to show engines, metrics and the report travelling.
    project = copy_project(mini_built, tmp_path)
    run(["dvc", "remote", "add", "--default", "storage", "s3://kiln/kiln"], project)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3], project)
    commit(project, "remote")
    pushed, push_s = timed(["dvc", "push"], project)
    assert "files pushed" in pushed.stdout, pushed.stdout
    engine_manifest = (project / "artifacts" / "engines" / "onnxruntime" / "manifest.json").read_text()

    # The objects really are in the bucket, under the remote's prefix.
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="kiln")["Contents"]]
    assert keys and all(k.startswith("kiln/files/md5/") for k in keys)

    # A fresh clone: `dvc pull`, then `dvc repro` runs only the probe (same machine, same fingerprint).
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    pulled, pull_s = timed(["dvc", "pull"], clone)
    assert (clone / "artifacts" / "engines" / "onnxruntime" / "manifest.json").read_text() == engine_manifest
    repro, repro_s = timed(["dvc", "repro"], clone)
    assert stages_run(repro.stdout) == {"probe"}, repro.stdout

    # Another fresh clone: `dvc repro --pull` pulls what it needs and builds nothing; the workspace is
    # then complete, so a plain `dvc repro` after it runs only the probe too.
    other = tmp_path / "other"
    run(["git", "clone", "-q", str(project), str(other)], tmp_path)
    repro_pull, repro_pull_s = timed(["dvc", "repro", "--pull"], other)
    assert stages_run(repro_pull.stdout) == {"probe"}, repro_pull.stdout
    assert "Pulling data for stage: 'build@onnxruntime'" in repro_pull.stdout
    again = run(["dvc", "repro"], other)
    assert stages_run(again.stdout) == {"probe"}, again.stdout
    assert json.loads((other / "artifacts" / "engines" / "torch-eager" / "manifest.json").read_text())["target"] == "torch-eager"
    print(f"push {push_s:.1f}s, pull {pull_s:.1f}s, repro after pull {repro_s:.1f}s, repro --pull {repro_pull_s:.1f}s")


def check_remote(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_remote.py"), *args],
        cwd=project,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def bare_repo(tmp_path: Path) -> Path:
    """A git + DVC repo with kiln's .dvc/config, and nothing else: enough for remote checks."""
    project = tmp_path / "repo"
    project.mkdir()
    run(["git", "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    (project / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())
    return project


def test_default_remote_is_a_local_folder_beside_the_repo(tmp_path):
    project = bare_repo(tmp_path)
    listed = run(["dvc", "remote", "list"], project).stdout.split()
    assert listed[:3] == ["local", str(tmp_path / "kiln-remote"), "(default)"]
    missing = check_remote(project)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"kiln: error: DVC remote 'local' is unreachable: folder {tmp_path / 'kiln-remote'} does not exist "
        "(`dvc push` creates it; to pull, point the remote at the folder that holds the cache: "
        "`dvc remote modify --local local url PATH`)"
    ]
    # CI's first run on a runner: an empty remote is a fine start, created on request.
    created = check_remote(project, "--create-local")
    assert created.returncode == 0 and "(created: empty until the first `dvc push`)" in created.stdout, created.stderr
    assert (tmp_path / "kiln-remote").is_dir()
    ok = check_remote(project)
    assert ok.returncode == 0 and ok.stdout.startswith("DVC remote 'local' is reachable"), ok.stderr


def test_unreachable_s3_endpoint_fails_fast_with_one_line(tmp_path, monkeypatch):
    require_module("dvc_s3", "dvc-s3 (DVC's S3 plugin, a test dependency) is not installed: pip install -e '.[test]'")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    project = bare_repo(tmp_path)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run(["dvc", "remote", "add", "--default", "storage", "s3://kiln/kiln"], project)
    run(["dvc", "remote", "modify", "storage", "endpointurl", endpoint], project)
    start = time.perf_counter()
    result = check_remote(project)
    assert time.perf_counter() - start < 30  # `dvc pull` itself retries for minutes before saying so
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"kiln: error: DVC remote 'storage' is unreachable: cannot connect to {endpoint}"), line


def test_s3_missing_bucket_and_missing_credentials(tmp_path, s3, monkeypatch):
    project = bare_repo(tmp_path)
    run(["dvc", "remote", "add", "--default", "storage", "s3://no-such-bucket/kiln"], project)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3], project)
    result = check_remote(project)
    assert result.returncode == 1
    assert "bucket 'no-such-bucket' does not exist" in result.stderr, result.stderr

    run(["dvc", "remote", "modify", "storage", "url", "s3://kiln/kiln"], project)
    assert check_remote(project).returncode == 0

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = check_remote(project)
    assert result.returncode == 1
    assert "no credentials" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr, result.stderr


def lock(**stages: dict) -> str:
    import yaml

    return yaml.safe_dump({"schema": "2.0", "stages": stages})


def test_merge_results_takes_each_class_targets_and_refuses_diverging_shared_stages(tmp_path):
    """The fan-out's final job: per-class dvc.lock entries and per-target report files into one checkout."""
    import yaml

    shared = {"export": {"outs": [{"path": "artifacts/model.onnx", "md5": "e1"}]}}
    (tmp_path / "dvc.lock").write_text(lock(**shared, report={"cmd": "old"}))
    for cls, target, md5 in (("cpu", "onnxruntime", "c1"), ("gpu", "tensorrt-fp16", "g1")):
        result = tmp_path / "results" / cls
        (result / "reports" / "metrics").mkdir(parents=True)
        (result / "reports" / "metrics" / f"{target}.json").write_text(f'{{"cls": "{cls}"}}')
        (result / "reports" / "metrics" / "stale.json").write_text("{}")  # not this class's: not copied
        (result / "dvc.lock").write_text(
            lock(
                **shared,
                **{
                    f"build@{target}": {"outs": [{"path": f"artifacts/engines/{target}", "md5": md5}]},
                    f"benchmark@{target}": {"cmd": target},
                    "configure": {"cmd": cls},
                    "report": {"cmd": cls},
                },
            )
        )
    script = [sys.executable, str(ROOT / "scripts" / "merge_results.py")]
    merged = subprocess.run([*script, "results/cpu", "results/gpu"], cwd=tmp_path, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    stages = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert stages["build@onnxruntime"]["outs"][0]["md5"] == "c1" and stages["build@tensorrt-fp16"]["outs"][0]["md5"] == "g1"
    assert stages["report"] == {"cmd": "old"} and "configure" not in stages  # the final job re-runs these
    assert json.loads((tmp_path / "reports" / "metrics" / "tensorrt-fp16.json").read_text()) == {"cls": "gpu"}
    assert not (tmp_path / "reports" / "metrics" / "stale.json").exists()

    # A class that re-exported on its own builds from another graph: refused, with the way out.
    gpu_lock = tmp_path / "results" / "gpu" / "dvc.lock"
    gpu_lock.write_text(lock(export={"outs": [{"path": "artifacts/model.onnx", "md5": "e2"}]}))
    (tmp_path / "results" / "cpu" / "dvc.lock").write_text(lock(export={"outs": [{"path": "artifacts/model.onnx", "md5": "e3"}]}))
    refused = subprocess.run([*script, "results/cpu", "results/gpu"], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "both changed the shared stage 'export', differently" in refused.stderr, refused.stderr

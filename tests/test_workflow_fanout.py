"""The workflow's fan-out, run here: its jobs' own `run:` scripts, in order, each in a fresh clone.

GitHub runs each job on a fresh machine and moves files between jobs only as artifacts; so does this
emulation: every job gets its own clone (and so its own default DVC remote beside it, as a hosted
runner would), `actions/upload-artifact` copies the listed paths into a store, `download-artifact`
copies them back. What GitHub provides and this machine cannot (checkout of the pull request,
setup-python, the pull-request comment) is left out; every `run:` step of the jobs that ran is
executed as written. The gpu job is skipped, as it is on GitHub without `vars.KILN_GPU_RUNNER`.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MINI, ROOT, venv_env
from test_pipeline import make_project, run, stages_run

pytestmark = pytest.mark.slow

WORKFLOW = ROOT / ".github" / "workflows" / "kiln.yml"


class Emulator:
    def __init__(self, origin: Path, root: Path):
        self.origin, self.root = origin, root
        self.store = root / "artifacts-store"
        self.output: dict[str, str] = {}  # job -> everything its run steps printed

    def run_job(self, name: str, job: dict[str, Any]) -> Path:
        machine = self.root / name
        machine.mkdir()
        checkout = machine / "checkout"
        summary = machine / "step-summary.md"
        env = {**venv_env(), "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_EVENT_NAME": "push", "CI": "true"}
        env.update({k: "" if "secrets." in str(v) else str(v) for k, v in (job.get("env") or {}).items()})
        printed = []
        for step in job["steps"]:
            uses, script = step.get("uses", ""), step.get("run")
            if "pull_request" in str(step.get("if", "")):
                continue  # a push, not a pull request
            if uses.startswith("actions/checkout@"):
                subprocess.run(["git", "clone", "-q", str(self.origin), str(checkout)], check=True)
                # setup.sh would build .venv here; this machine's is the same install.
                (checkout / ".venv").symlink_to(ROOT / ".venv")
            elif uses.startswith("actions/upload-artifact@"):
                self.upload(checkout, step["with"])
            elif uses.startswith("actions/download-artifact@"):
                self.download(checkout, step["with"])
            elif script is not None and "./setup.sh" not in script and "pytest" not in script:
                result = subprocess.run(
                    ["bash", "-e", "-c", script], cwd=checkout, env={**env, **step.get("env", {})}, capture_output=True, text=True
                )
                printed.append(result.stdout + result.stderr)
                assert result.returncode == 0, f"{name}: step '{step.get('name')}' failed:\n{printed[-1]}"
        self.output[name] = "\n".join(printed)
        return checkout

    def upload(self, checkout: Path, spec: dict[str, str]) -> None:
        lines = [line.strip() for line in spec["path"].splitlines() if line.strip()]
        excluded = [line[1:] for line in lines if line.startswith("!")]
        into = self.store / spec["name"]
        assert not into.exists(), f"artifact {spec['name']} uploaded twice"
        for line in (x for x in lines if not x.startswith("!")):
            src = checkout / line
            assert src.exists(), f"upload of {spec['name']}: {line} does not exist"
            files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(checkout).as_posix()
                if any(part.startswith(".") for part in rel.split("/")):
                    continue  # upload-artifact leaves hidden files out (include-hidden-files: false)
                if not any(fnmatch.fnmatch(rel, x) or rel.startswith(x.rstrip("/") + "/") for x in excluded):
                    (into / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, into / rel)

    def download(self, checkout: Path, spec: dict[str, str]) -> None:
        into = checkout / spec.get("path", ".")
        if "name" in spec:
            shutil.copytree(self.store / spec["name"], into, dirs_exist_ok=True)
        else:  # a pattern: one folder per artifact, named after it
            for artifact in sorted(self.store.iterdir()):
                if fnmatch.fnmatch(artifact.name, spec["pattern"]):
                    shutil.copytree(artifact, into / artifact.name, dirs_exist_ok=True)


def test_the_fan_out_runs_as_the_workflow_writes_it(tmp_path):
    origin = make_project(tmp_path)
    for name in ("scripts", ".github"):
        shutil.copytree(ROOT / name, origin / name)
    # The cpu class is a few fast targets here; the scripts do not know the difference.
    (origin / "conf" / "targets" / "cpu.yaml").write_text(MINI)
    run(["python", "-m", "kiln", "params"], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ci"], origin)

    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    assert "vars.KILN_GPU_RUNNER == 'true'" in jobs["gpu"]["if"]  # no runner registered here: skipped
    assert jobs["cpu"]["needs"] == jobs["gpu"]["needs"] == "shared"
    assert set(jobs["report"]["needs"]) == {"shared", "cpu", "gpu"}
    emulator = Emulator(origin, tmp_path / "runners")
    (tmp_path / "runners").mkdir()
    shared = emulator.run_job("shared", jobs["shared"])
    cpu = emulator.run_job("cpu", jobs["cpu"])
    report = emulator.run_job("report", jobs["report"])

    assert {"sample-data", "export", "validate"} <= stages_run(emulator.output["shared"])
    pushed = shared.parent / "kiln-remote"  # ci_remote.sh created the runner's empty remote; `dvc push` filled it
    assert any(p.is_file() for p in pushed.rglob("*"))
    assert not (emulator.store / "kiln-shared" / "artifacts" / "fingerprint.json").exists()  # the probe is per machine
    # The class job built from the shared job's graph: nothing shared ran again.
    built = stages_run(emulator.output["cpu"])
    targets = yaml.safe_load(MINI)
    assert {f"build@{t}" for t in targets} <= built and not built & {"sample-data", "export", "validate"}, built
    assert (
        "up to date"
        in subprocess.run(["dvc", "status", "export", "validate"], cwd=cpu, env=venv_env(), capture_output=True, text=True).stdout
    )
    # The report job merged the class and wrote the report without building anything.
    assert stages_run(emulator.output["report"]) <= {"configure", "report"}
    assert "report" in stages_run(emulator.output["report"])
    table = (report / "reports" / "benchmark.md").read_text()
    assert all(f"| {t} |" in table for t in targets), table
    kept = emulator.store / "kiln-report"
    assert (kept / "reports" / "benchmark.md").read_text() == table
    lock = yaml.safe_load((kept / "dvc.lock").read_text())["stages"]
    cpu_lock = yaml.safe_load((cpu / "dvc.lock").read_text())["stages"]
    assert all(lock[f"build@{t}"] == cpu_lock[f"build@{t}"] for t in targets)
    assert lock["export"] == cpu_lock["export"] == yaml.safe_load((shared / "dvc.lock").read_text())["stages"]["export"]
    assert "| onnxruntime |" in (report.parent / "step-summary.md").read_text()
    assert os.path.getsize(cpu.parent / "step-summary.md") > 0  # `dvc metrics show --md`

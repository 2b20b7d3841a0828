"""The `kiln` command: every verb listed with one line, dispatched to its module, errors in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, venv_env

from kiln.cli.main import VERBS, resolve

KILN = Path(sys.executable).parent / "kiln"  # the console script pyproject declares, installed by ./setup.sh


def kiln(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(KILN), *args], cwd=cwd, env=venv_env(), capture_output=True, text=True)


def test_help_lists_every_verb_with_one_line_and_each_verb_resolves():
    out = kiln("--help")
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(VERBS)
    for verb in VERBS:
        assert callable(resolve(verb)), verb


def test_a_verb_runs_its_module_and_an_unknown_one_is_named(tmp_path):
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    ok = kiln("params", "--check", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("opset: 18", "opset: 17"))
    stale = kiln("params", "--check", cwd=tmp_path)
    assert stale.returncode == 1 and "export differ from conf/" in stale.stderr
    typo = kiln("paramz")
    assert typo.returncode == 2 and "unknown verb 'paramz'" in typo.stderr and "kiln params" in typo.stderr
    err = kiln("compare", "no-such-target", "other", cwd=tmp_path)
    assert err.returncode != 0 and err.stderr.strip().splitlines()[-1].startswith("kiln: error:"), err.stderr[-2000:]

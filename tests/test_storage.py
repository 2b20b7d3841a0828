"""A full or failing disk is named as such, whoever hit it; a killed write's leftovers go with the next write."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_params, unavailable, venv_env

from kiln.core import atomic
from kiln.core.atomic import atomic_path, write_text
from kiln.core.errors import KilnError, describe_os_error, run_cli, user_message
from kiln.export.models import build_model
from kiln.export.onnx import ExportSettings, export_onnx
from kiln.pipeline.stage import run_stage

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, whose writes fail with ENOSPC")
NO_SPACE = (
    r"kiln: error: no space left on .+, [\d.]+ (B|KiB|MiB|GiB) free, while writing {path}: "
    r"free space there and run again \(.*`dvc gc --workspace`.*\)"
)


def stage_error(main, capsys) -> str:
    """What run_stage prints for `main`'s failure (its last stderr line); it must exit 1."""
    with pytest.raises(SystemExit) as exited:
        run_stage(main)
    assert exited.value.code == 1
    return capsys.readouterr().err.strip().splitlines()[-1]


# ---- a full or failing disk --------------------------------------------------------------------


@needs_dev_full
def test_disk_full_during_export_names_the_disk_not_the_model(in_tmp, tiny_spec, monkeypatch, capsys):
    import onnx

    writes = []

    def onto_a_full_disk(content, f):
        writes.append(f)
        with open("/dev/full", "wb", buffering=0) as out:  # the kernel's own ENOSPC
            out.write(content)

    monkeypatch.setattr(onnx, "_save_bytes", onto_a_full_disk)  # where torch.onnx.export writes the graph
    out = in_tmp / "artifacts" / "model.onnx"
    line = stage_error(lambda: export_onnx(build_model(tiny_spec), tiny_spec, ExportSettings(), out), capsys)
    assert writes, "torch.onnx.export no longer writes through onnx._save_bytes: move the patch"
    assert re.fullmatch(NO_SPACE.format(path=re.escape(str(out))), line), line
    assert "torch.where" not in line
    assert os.listdir(out.parent) == []


WRITE_ENGINE = r"""
import resource, shutil, signal, sys
from pathlib import Path
from kiln.config.views import ModelSpec, Target
from kiln.pipeline.engine import build_engine
from kiln.runtimes import BuildSource
from kiln.pipeline.stage import run_stage
import json

onnx_path, spec, disk = sys.argv[1], ModelSpec.from_params(json.loads(sys.argv[2])), sys.argv[3]
target = Target.from_params("onnxruntime", {"targets": {"onnxruntime": {"runtime": "onnxruntime", "threads": 1}}})
if disk == "full":
    # What the disk says once a write failed for want of space; the file-size limit makes the write fail for real.
    real = shutil.disk_usage
    shutil.disk_usage = lambda path: type(real(path))(1 << 30, 1 << 30, 0)

def main():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG) instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
    build_engine(target, BuildSource(Path(onnx_path), spec), Path("engine"))

run_stage(main)
"""


@pytest.mark.parametrize("disk", ["full", "with room"])
def test_a_failed_write_in_a_runtimes_own_code_is_called_a_full_disk_only_when_it_is(tmp_path, tiny_onnx, disk):
    # ONNX Runtime writes the optimised graph from C++: a failed write reaches Python as
    # "Protobuf serialization failed", with no errno; the free space decides.
    path, spec, _ = tiny_onnx
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", WRITE_ENGINE, str(path), json.dumps(tiny_model_params()), disk],
        cwd=work,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1, r.stderr
    if disk == "full":
        assert re.fullmatch(
            r"kiln: error: no space left on .+, 0 B free, while writing engine: free space there and run again \(.*\) "
            r"\(the writer said: InvalidProtobuf: .*Protobuf serialization failed\.\)",
            last,
        ), last
    else:
        assert "no space left" not in r.stderr and "Protobuf serialization failed" in last
    assert os.listdir(work) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a really full disk. Mounted as root, or through passwordless sudo (GitHub's runners have it),
    owned by this user; CI must be able to (unavailable: a failure there), elsewhere the test skips."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    root = [] if os.geteuid() == 0 else ["sudo", "-n"]
    options = f"size=64k,uid={os.getuid()},gid={os.getgid()}"
    try:
        mounted = subprocess.run([*root, "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    except FileNotFoundError as e:  # no sudo
        mounted = subprocess.CompletedProcess(e.filename, 1, "", str(e))
    if mounted.returncode:
        unavailable(f"mounting a small tmpfs needs root or passwordless sudo: {mounted.stderr.strip()[-200:]}")
    try:
        (mnt / "filler").write_bytes(b"\0" * (60 << 10))  # 4 KiB left: less than any of the files written here
        yield mnt
    finally:
        subprocess.run([*root, "umount", str(mnt)], check=True)


def test_a_really_full_disk_during_export_and_build(in_tmp, tiny_onnx, tiny_disk, capsys):
    from kiln.config.views import Target
    from kiln.pipeline.engine import build_engine
    from kiln.runtimes import BuildSource

    path, spec, _ = tiny_onnx
    out = tiny_disk / "model.onnx"
    line = stage_error(lambda: export_onnx(build_model(spec), spec, ExportSettings(), out), capsys)
    assert re.fullmatch(NO_SPACE.format(path=re.escape(str(out))).replace(r"[\d.]+ (B|KiB|MiB|GiB)", "0 B"), line), line
    for runtime in ("onnxruntime", "openvino"):
        target = Target.from_params(runtime, {"targets": {runtime: {"runtime": runtime, "threads": 1}}})
        line = stage_error(lambda: build_engine(target, BuildSource(path, spec), tiny_disk / runtime), capsys)
        assert line.startswith(
            f"kiln: error: no space left on tmpfs (mounted on {tiny_disk}), 0 B free, while writing {tiny_disk / runtime}: "
        ), line
    assert sorted(os.listdir(tiny_disk)) == ["filler"]


@needs_dev_full
def test_describe_os_error_says_which_disk_how_much_is_free_and_what_to_do(tmp_path):
    with pytest.raises(OSError) as raised, open("/dev/full", "wb", buffering=0) as f:
        f.write(b"x")
    assert raised.value.errno == errno.ENOSPC
    message = describe_os_error(raised.value, tmp_path / "out.bin", needed=3 << 20)
    assert re.fullmatch(
        rf"no space left on .+, [\d.]+ \w+ free, 3.0 MiB needed, while writing {re.escape(str(tmp_path / 'out.bin'))}: .*", message
    )

    def said(code):
        return describe_os_error(OSError(code, os.strerror(code), str(tmp_path / "x")))

    assert said(errno.EDQUOT).startswith("disk quota exceeded on ")
    assert said(errno.EIO).startswith("I/O error on ") and "dmesg" in said(errno.EIO)
    assert "is mounted read-only, while writing " in said(errno.EROFS)
    unnamed = describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))  # a write that named no file
    assert unnamed.startswith("no space left on ") and "while writing" not in unnamed
    assert said(errno.EACCES).startswith(f"permission denied at {tmp_path / 'x'} on ")
    assert "ulimit -f" in said(errno.EFBIG)


def test_a_storage_error_wrapped_by_a_library_is_unwrapped(in_tmp, capsys):
    def main():
        with atomic_path(in_tmp / "out.bin") as tmp:
            try:
                tmp.write_bytes(b"x")
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp))
            except OSError as e:
                raise RuntimeError("Serialization failed") from e

    line = stage_error(main, capsys)
    assert line.startswith("kiln: error: I/O error on ") and f"at {in_tmp / 'out.bin'}:" in line
    assert user_message(ValueError("a bug")) is None  # a bug keeps its traceback


# ---- colour codes ------------------------------------------------------------------------------


class Colourful(torch.nn.Module):
    """Fails only under export, with a message in terminal colours (as torch's own messages can be)."""

    def forward(self, x):
        if torch.compiler.is_exporting():
            raise RuntimeError("\x1b[31mboom\x1b[0m in \x1b[1mforward\x1b[0m")
        return x.flatten(1)


def test_colour_codes_never_reach_kilns_error_lines(tmp_path, tiny_spec, capsys, monkeypatch):
    with pytest.raises(KilnError) as raised:
        export_onnx(Colourful(), tiny_spec, ExportSettings(fallback=False), tmp_path / "m.onnx")
    assert "boom in forward" in str(raised.value) and "\x1b" not in str(raised.value)

    def coloured():
        raise KilnError("\x1b[1;31mred\x1b[0m and \x1b]8;;https://pytorch.org\x1b\\a link\x1b]8;;\x1b\\")

    monkeypatch.chdir(tmp_path)
    assert stage_error(coloured, capsys) == "kiln: error: red and a link"
    monkeypatch.setattr(sys, "argv", ["kiln"])
    with pytest.raises(SystemExit):
        run_cli(lambda argv: coloured())
    assert capsys.readouterr().err == "kiln: error: red and a link\n"


# ---- leftovers of killed writes ----------------------------------------------------------------

WRITER = r"""
import sys, time
from pathlib import Path
from kiln.core.atomic import atomic_path

out, go = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_path(out, is_dir=True) as tmp:
    (tmp / "part").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    while not go.exists():
        time.sleep(0.05)
    (tmp / "part").write_text("from the writer")
"""


def start_writer(out: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A process in the middle of an atomic write of `out`; it finishes once the returned `go` file exists."""
    go = out.parent / "go"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(go)], stdout=subprocess.PIPE, text=True, env=venv_env())
    tmp = Path(p.stdout.readline().strip())
    assert tmp.is_dir() and tmp.parent == out.parent
    return p, tmp, go


def test_a_killed_writes_temporary_goes_with_the_next_write_of_that_output(tmp_path):
    out = tmp_path / "engine"
    writer, tmp, _ = start_writer(out)
    writer.kill()  # SIGKILL: no cleanup runs, as when DVC's job or the machine dies
    writer.wait()
    assert tmp.exists()
    other = tmp_path / f".calibration.tmp-{writer.pid}@{atomic.HOST}-abcdefgh"  # stale, but another output's: its stage cleans it
    other.mkdir()
    with atomic_path(out, is_dir=True) as new:
        (new / "part").write_text("new")
    assert not tmp.exists() and other.exists()
    assert (out / "part").read_text() == "new"


def test_a_live_writers_temporary_is_kept_and_its_write_completes(tmp_path):
    # Two runs of the same stage in one workspace: neither may remove the other's work in progress.
    out = tmp_path / "engine"
    writer, tmp, go = start_writer(out)
    try:
        write_text(tmp_path / "engine-sibling.txt", "unrelated")
        with atomic_path(out, is_dir=True) as ours:
            (ours / "part").write_text("ours")
        assert tmp.exists()
    finally:
        go.touch()
        assert writer.wait(timeout=60) == 0
    assert (out / "part").read_text() == "from the writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "engine-sibling.txt", "go"]


def test_temporaries_whose_owner_cannot_be_checked_go_after_a_day(tmp_path):
    out = tmp_path / "report.json"
    day_old = time.time() - 25 * 3600
    names = {
        "legacy_old": ".report.json.tmp-k3j2h1ab",  # written before temporaries named their owner
        "legacy_fresh": ".report.json.tmp-z9y8x7wv",
        "other_host_old": ".report.json.tmp-12@ffffffff-abcdefgh",  # a shared disk: its PIDs mean nothing here
        "other_host_fresh": ".report.json.tmp-13@ffffffff-abcdefgh",
    }
    for key, name in names.items():
        (tmp_path / name).write_text("partial")
        if key.endswith("_old"):
            os.utime(tmp_path / name, (day_old, day_old))
    assert atomic.HOST != "ffffffff"
    write_text(out, "{}")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"report.json", names["legacy_fresh"], names["other_host_fresh"]}

"""The one exception type a user is meant to read, and the one line a stage prints for it."""

from __future__ import annotations

import difflib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator


def close_matches(word: Any, choices: Any, n: int = 3) -> str:
    """ " (did you mean 'x'?)" for the choices that look like `word`, or "": for messages about a typo."""
    # Keys from YAML can be integers (a served distribution's batch sizes): compare them as text.
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.6)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""


class KilnError(Exception):
    """Something the user can fix: bad config, bad input, an engine from another machine.

    Stage scripts print the message on one line and exit non-zero, so the message
    must say what was wrong and how to fix it.
    """


class ValidationFailed(KilnError):
    """The exported graph does not compute what the PyTorch model computes."""


class EngineMismatch(KilnError):
    """An engine was built for other hardware or other library versions."""


class StorageError(KilnError):
    """A read or write failed because of the disk (full, over quota, failing, read-only), not because of kiln's input."""


# The errors whose cause is the storage, not the model or the config: a library that reports them
# as something else (torch's exporter, a protobuf writer) must not send the user after the model.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}
# Free space below which a failed write is taken for a full disk although the library that wrote
# said something else (ONNX Runtime: "Protobuf serialization failed", OpenVINO: "iostream error").
FULL_BELOW = 64 << 20

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


def strip_ansi(text: str) -> str:
    """Without terminal colour codes: torch colours some messages, and they garble logs and one-line errors."""
    return _ANSI.sub("", text)


def chain(e: BaseException | None) -> Iterator[BaseException]:
    """`e` and every exception it was raised from or while handling, each once."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]


def find_os_error(e: BaseException) -> OSError | None:
    """The storage OSError (full disk, quota, I/O error, read-only, permissions) behind `e`, if any."""
    return next((x for x in chain(e) if isinstance(x, OSError) and x.errno in STORAGE_ERRNOS), None)


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _mount(path: Path) -> tuple[Path, str]:
    """The mount point holding `path` (or its nearest existing parent) and its device, from /proc/self/mounts."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    device = ""
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            # Octal escapes (\040 for a space) in mount tables.
            if len(fields) > 1 and re.sub(r"\\(\d{3})", lambda m: chr(int(m[1], 8)), fields[1]) == str(p):
                device = fields[0]  # the last entry wins: it is the one mounted on top
    except OSError:
        pass
    return p, device


def where(path: str | os.PathLike[str]) -> str:
    """'<device> (mounted on <mount>)' for the file system holding `path`."""
    mount, device = _mount(Path(path))
    return f"{device} (mounted on {mount})" if device and device != str(mount) else str(mount)


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    try:
        return shutil.disk_usage(_mount(Path(path))[0]).free
    except OSError:
        return None


def describe_os_error(e: OSError, path: str | os.PathLike[str] | None = None, *, free: int | None = None, needed: int | None = None) -> str:
    """One line for a storage error: what happened on which file system, how much is free, what to do.

    `path` is the output being written (the error's own filename may be a temporary sibling);
    `free` the space measured when the write failed (it grows back once the temporary is removed)."""
    known = path if path is not None else e.filename
    target = Path(known) if known else None
    fs = where(target or Path.cwd())
    if free is None:
        free = free_bytes(target or Path.cwd())
    room = f"{_size(free)} free" if free is not None else "free space unknown"
    if needed is not None:
        room += f", {_size(needed)} needed"
    writing = f", while writing {target}" if target else ""
    at = f" at {target}" if target else ""
    code = e.errno
    if code == errno.ENOSPC:
        return (
            f"no space left on {fs}, {room}{writing}: free space there and run again "
            "(DVC's cache keeps old versions: `dvc gc --workspace` drops those the workspace does not use)"
        )
    if code == errno.EDQUOT:
        return f"disk quota exceeded on {fs}, {room}{writing}: free space within your quota or raise it, and run again"
    if code == errno.EFBIG:
        return f"file too large on {fs}{writing}: the file system or the shell's file-size limit (`ulimit -f`) does not allow it"
    if code == errno.EIO:
        return f"I/O error on {fs}{at}: the disk or file system is failing (see `dmesg`); move the project to a healthy disk"
    if code == errno.EROFS:
        return f"{fs} is mounted read-only{writing}: run where the project can be written"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied{at} on {fs}: check the owner and permissions{f' (`ls -ld {target}`)' if target else ''}"
    return f"{e.strerror or e}{at} on {fs}"


def storage_message(e: BaseException) -> str | None:
    """The one line for a failure whose cause is the storage, else None.

    Either an OSError is somewhere in `e`'s chain (torch's exporter wraps it, kiln's own errors
    may), or a write inside `atomic_path` failed with something else while its file system had
    (next to) nothing left: libraries that write from C++ lose the errno on the way to Python."""
    from kiln.core.atomic import last_failed_write

    failed = last_failed_write()
    if failed is not None and not any(x is failed.error for x in chain(e)):
        failed = None  # an earlier write's failure, not this one
    os_error = find_os_error(e)
    if os_error is not None:
        return describe_os_error(os_error, failed.path if failed else None, free=failed.free if failed else None)
    if failed is not None and not isinstance(e, KilnError) and failed.free is not None and failed.free < FULL_BELOW:
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f"{describe_os_error(full, failed.path, free=failed.free)} (the writer said: {type(e).__name__}: {summarize(e)})"
    return None


def first_line(e: BaseException) -> str:
    """The first non-empty line of a library's message, without colour codes (the exception's type if it has none)."""
    lines = [ln.strip() for ln in strip_ansi(str(e)).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def summarize(e: BaseException, limit: int = 400) -> str:
    """A library's message on one line, without colour codes or source locations (OpenVINO's
    'Exception from src/...cpp:132:' lines say where in OpenVINO, not what went wrong)."""
    lines = [ln.strip() for ln in strip_ansi(str(e)).splitlines() if ln.strip()]
    meaningful = [ln for ln in lines if not re.match(r"^(Exception from \S+:\d+:|Check '.*' failed at \S+:\d+:)$", ln)]
    text = " ".join(meaningful or lines) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def user_message(e: BaseException) -> str | None:
    """The line a stage or a CLI prints for `e`: storage errors first, then KilnError; None for a bug (traceback)."""
    if isinstance(e, StorageError):
        return strip_ansi(str(e))
    message = storage_message(e)
    if message is not None:
        return message
    if isinstance(e, KilnError):
        return strip_ansi(str(e))
    return None


def run_command(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a command's `main`: a failure kiln understands is one line on stderr (`kiln: error: ...`) and exit
    status 1; anything else is a traceback (a bug)."""
    import sys

    try:
        return int(main(argv) or 0)
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        print(f"kiln: error: {message}", file=sys.stderr)
        return 1


def run_cli(main: Callable[[list[str]], int]) -> None:
    """`run_command` on this process's arguments, as its exit status."""
    import sys

    sys.exit(run_command(main, sys.argv[1:]))

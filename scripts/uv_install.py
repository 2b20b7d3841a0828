"""`pip install ARGS` done by uv, reading pip's own configuration (what setup.sh installs kiln with).

    .venv/bin/python scripts/uv_install.py -e '.[test]'

uv installs the same packages as pip (checked: `pip freeze` identical for '.[test]'), unpacking wheels in parallel
and compiling their bytecode on every core: torch's CUDA wheel and its nvidia-* libraries (5.5 GB) took 66 s
against pip's 119 s plus 37 s of compileall on a 2-core Xeon. uv does not read pip's configuration, so the indexes,
find-links and constraints pip would use (pip.conf files and PIP_* variables, as `pip config list` shows them) are
passed on; pip considers every index alike, hence `--index-strategy unsafe-best-match`. Installs uv into the
interpreter's environment first. Exits non-zero on any failure: setup.sh then installs with pip.
"""

from __future__ import annotations

import os
import subprocess
import sys

# pip's option -> uv's; each value of a multi-valued pip option (space or newline separated) becomes one flag
FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
# The uv whose options (--index-strategy, --compile-bytecode) this script was checked with: a newer one may change them.
UV = "uv==0.13.9"
SECTIONS = ("global", "install", ":env:")  # where `pip install` reads its options from


def pip_options() -> dict[str, list[str]]:
    """The options `pip install` would read, from `pip config list` (pip.conf files and PIP_* variables)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    options: dict[str, list[str]] = {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if section not in SECTIONS or not value:
            continue
        for item in value.strip().strip("'\"").split():  # printed as key='value'
            if item not in options.setdefault(key, []):
                options[key].append(item)
    return options


def uv_command(args: list[str], options: dict[str, list[str]]) -> list[str]:
    command = [sys.executable, "-m", "uv", "pip", "install", "--quiet", "--python", sys.executable, "--compile-bytecode"]
    command += ["--index-strategy", "unsafe-best-match"]
    if options.get("no-index") and options["no-index"][0].lower() in ("1", "true", "yes", "on"):
        command.append("--no-index")
    for key, flag in FLAGS.items():
        for value in options.get(key, []):
            command += [flag, value]
    return command + args


def main(args: list[str]) -> int:
    options = pip_options()
    env = dict(os.environ)
    if options.get("cert"):
        env.setdefault("SSL_CERT_FILE", options["cert"][0])
    if subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", UV]).returncode != 0:
        print("uv_install: could not install uv", file=sys.stderr)
        return 1
    return subprocess.run(uv_command(args, options), env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env bash
# Installs kiln into .venv with its pinned dependencies, and the offline plot page: vega, vega-lite
# and vega-embed from the vl-convert-python wheel (a dependency) inlined into plots/offline.html.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# pip byte-compiles what it installs one file after another; compileall does it on every core (an AVX2 EPYC's two:
# 90 + 31 s against 142 s). The .pyc files must exist: where PYTHONDONTWRITEBYTECODE=1 (set on some machines) Python
# never writes them, and every process would compile torch from source (its import 13 s against 6 s). compileall
# exits 1 for the files it cannot compile, as pip ignores them (torch ships Python 3.12-only test helpers).
.venv/bin/python -m pip install --quiet --no-compile -e '.[test]'
.venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
.venv/bin/kiln plots template

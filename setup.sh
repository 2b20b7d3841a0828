#!/usr/bin/env bash
# Installs kiln into .venv with its pinned dependencies, and the offline plot page: vega, vega-lite
# and vega-embed from the vl-convert-python wheel (a dependency) inlined into plots/offline.html.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
# uv, with pip's own indexes and constraints (scripts/uv_install.py): the same packages, unpacked and byte-compiled
# on every core (66 s against pip's 156 s on a 2-core Xeon). Where uv cannot be installed or fails, pip does it.
# The .pyc files must exist: where PYTHONDONTWRITEBYTECODE=1 (set on some machines) Python never writes them, and
# every process would compile torch from source (its import 13 s against 6 s).
if ! .venv/bin/python scripts/uv_install.py -e '.[test]'; then
    echo "setup.sh: uv failed (above): installing with pip" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    # pip byte-compiles one file after another; compileall does it on every core. It exits 1 for the files it cannot
    # compile, as pip ignores them (torch ships Python 3.12-only test helpers).
    .venv/bin/python -m pip install --quiet --no-compile -e '.[test]'
    .venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
fi
.venv/bin/kiln plots template

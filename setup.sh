#!/usr/bin/env bash
# Installs kiln into .venv with its pinned dependencies, and the offline plot page
# (vega, vega-lite and vega-embed from the npm registry, inlined into plots/offline.html).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
if command -v npm >/dev/null; then
    npm ci --prefix plots --no-audit --no-fund --silent
    .venv/bin/python -m kiln.plots template
else
    echo "setup: npm not found: dvc plots will need the network (install Node.js and re-run ./setup.sh)" >&2
fi

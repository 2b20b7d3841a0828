#!/usr/bin/env bash
# Installs kiln into .venv with its pinned dependencies, and the offline plot page: vega, vega-lite
# and vega-embed from the vl-convert-python wheel (a dependency) inlined into plots/offline.html.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/kiln plots template

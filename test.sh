#!/usr/bin/env bash
# The test suite, as CI runs it: first the tests whose figures are timed (marker `timing`), alone on the cores, then
# the rest on two pytest-xdist workers, a whole file each (their fixtures build once per run: tests/conftest.py,
# built_once). Both phases run; the exit status is the first failure's. Arguments go to both (e.g. -x, -k ...).
# One process, as before: .venv/bin/python -m pytest
set -uo pipefail
cd "$(dirname "$0")"
status=0
.venv/bin/python -m pytest -m timing "$@" || status=$?
.venv/bin/python -m pytest -m "not timing" -n 2 --dist loadfile "$@" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
exit "$status"

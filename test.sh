#!/usr/bin/env bash
# The test suite, as CI runs it: first the tests whose figures are timed (marker `timing`), alone on the cores, then
# the rest on two pytest-xdist workers, a whole file each, the longest files first, each worker on a core of its own
# (tests/conftest.py: LONGEST_FIRST, pin_xdist_worker; fixtures build once per run: built_once). Both phases run; the
# exit status is the first failure's. Arguments go to both (e.g. -x, -k ...).
# One process, as before: .venv/bin/python -m pytest
set -uo pipefail
cd "$(dirname "$0")" || exit 1
status=0
empty=0
phase() {  # pytest's exit 5 (nothing selected) fails only if neither phase selected anything (a -k naming one phase's tests)
    "$@"
    local rc=$?
    if [ "$rc" -eq 5 ]; then empty=$((empty + 1)); rc=0; fi
    [ "$status" -ne 0 ] || status=$rc
}
phase .venv/bin/python -m pytest -m timing "$@"
phase .venv/bin/python -m pytest -m "not timing" -n 2 --dist loadfile --no-loadscope-reorder "$@"
[ "$empty" -lt 2 ] || status=5
exit "$status"

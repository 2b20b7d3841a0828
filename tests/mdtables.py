"""Facts in a markdown report's tables, read without fixing its wording or layout: a row of a target that holds
given values (numbers compared as numbers, whatever their format; text as a part of a cell)."""

from __future__ import annotations

import math
import re

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def rows(md: str, target: str) -> list[list[str]]:
    """The cells of every table row whose first cell is `target`."""
    found = []
    for line in md.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] in (target, f"`{target}`", f"**{target}**"):
            found.append(cells)
    return found


def _holds(cell: str, fact: object) -> bool:
    if isinstance(fact, (int, float)) and not isinstance(fact, bool):
        return any(math.isclose(float(n), float(fact), rel_tol=1e-9, abs_tol=1e-12) for n in NUMBER.findall(cell))
    return str(fact) in cell


def _assign(cells: list[str], facts: tuple[object, ...], free: frozenset[int]) -> bool:
    """Whether each fact can be held by a different cell (a small search: rows have a dozen cells)."""
    if not facts:
        return True
    return any(_assign(cells, facts[1:], free - {i}) for i in free if _holds(cells[i], facts[0]))


def row_with(md: str, target: str, *facts: object) -> list[str] | None:
    """The first row of `target` in which every fact is held by a cell of its own, or None."""
    for cells in rows(md, target):
        if _assign(cells, facts, frozenset(range(1, len(cells)))):
            return cells
    return None


def assert_row(md: str, target: str, *facts: object) -> list[str]:
    cells = row_with(md, target, *facts)
    assert cells is not None, f"no table row of {target!r} holds {facts}; its rows: {rows(md, target)}"
    return cells

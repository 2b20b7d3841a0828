"""`kiln <verb>`: one command for what a person runs besides `dvc repro` (the `kiln` console script).

Each verb is a library module's command line, imported only when that verb runs, so `kiln --help` starts in
a blink and a verb's heavy imports (torch, the runtimes) are paid by that verb alone. `python -m kiln <verb>`
is the same command. Nothing in the library or the stages imports the cli package.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Callable, Sequence

# verb -> (module, function, one line for `kiln --help`). The function takes the verb's arguments.
VERBS: dict[str, tuple[str, str, str]] = {
    "params": (
        "kiln.cli.params",
        "main",
        "compose params.yaml from conf/ with Hydra overrides (study=deep...), check it, say what re-runs",
    ),
    "experiments": (
        "kiln.cli.experiments",
        "main",
        "dvc experiments side by side, a difference within the measured noise marked as such",
    ),
    "debug": ("kiln.cli.debug", "main", "where an engine first departs from the fp32 graph, boundary by boundary; --repair"),
    "compare": ("kiln.cli.debug", "compare", "two engines, boundary by boundary"),
    "plots": ("kiln.cli.plots", "main", "the offline plot page for `dvc plots show` and the latency chart"),
    "contention": ("kiln.cli.contention", "main", "two engines on one device: each one's slow-down beside the other"),
}


def usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = [
        "usage: kiln <verb> [arguments]   (kiln <verb> --help for a verb's own)",
        "",
        "The pipeline itself is `dvc repro` (README); these are the commands around it:",
        "",
    ]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, _, help_) in VERBS.items()]
    return "\n".join(lines)


def resolve(verb: str) -> Callable[[list[str]], int]:
    module, function, _ = VERBS[verb]
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        near = difflib.get_close_matches(verb, list(VERBS), n=1)
        hint = f" (did you mean `kiln {near[0]}`?)" if near else ""
        print(f"kiln: error: unknown verb '{verb}'{hint}; `kiln --help` lists them", file=sys.stderr)
        return 2
    from kiln.core.errors import run_command

    sys.argv = [f"kiln {verb}", *rest]
    return run_command(resolve(verb), rest)


def entry() -> None:
    """The console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry()

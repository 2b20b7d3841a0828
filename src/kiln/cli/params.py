"""`kiln params`: compose params.yaml from conf/ with Hydra overrides, check it, say what re-runs (kiln.config.params)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from kiln.config.params import CONFIG_DIR, CONFIG_NAME, read_stamp, recompose_command, save_overrides, stale_keys, stamped_yaml
from kiln.config.views import PARAMS_FILE, check_target_names
from kiln.core.atomic import write_text


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _current_values() -> dict[str, Any] | None:
    try:
        return yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None


def _rerun_line(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Which stages `dvc repro` will re-run for this change: `dvc status` cannot say it before configure ran."""
    from kiln.config.slices import describe_stages, rerun_plan

    try:
        stages = rerun_plan(before, after)
    except Exception as e:  # noqa: BLE001 - a params.yaml kiln cannot slice: configure will say what is wrong
        return f"cannot tell which stages re-run ({type(e).__name__}: {e})"
    if before == after:
        return "no change: `dvc repro` re-runs nothing for it"
    if not stages:
        return "`dvc repro` re-runs configure only (no stage reads what changed)"
    targets = len(after.get("targets") or {})
    return f"`dvc repro` re-runs: configure, {describe_stages(stages, targets)} (and the stages that use their outputs)"


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if args[:1] in (["-h"], ["--help"]):
        import kiln.config.params

        print("usage: kiln params [--check | --save | --reset] [hydra overrides...]\n")
        print((kiln.config.params.__doc__ or "").strip())
        return 0
    if "--check" in args:
        stale, overrides = stale_keys()
        if stale:
            print(
                f"{PARAMS_FILE} is stale: {', '.join(stale)} differ from conf/"
                f"{' with overrides ' + str(overrides) if overrides else ''}; run `{recompose_command(overrides)}`",
                file=sys.stderr,
            )
            return 1
        print(f"{PARAMS_FILE} matches conf/" + (f" with overrides {overrides}" if overrides else ""))
        return 0
    save, reset = "--save" in args, "--reset" in args
    args = [a for a in args if a not in ("--save", "--reset")]
    before = _current_values()
    # On top of what params.yaml holds: a change built up in two calls keeps the first call's overrides.
    stamp = read_stamp(PARAMS_FILE) if Path(PARAMS_FILE).is_file() and not reset else None
    kept = [o for o in (stamp["overrides"] if stamp else []) if _override_key(o) not in {_override_key(a) for a in args}]
    if save:
        stamped_yaml(args)  # composes first: a bad override changes nothing
        save_overrides(args)
        args = []
    args = [*kept, *args]
    text = stamped_yaml(args)  # composes first: a bad override changes nothing
    after = yaml.safe_load(text.split("\n", 1)[1]) or {}
    check_target_names(after)
    write_text(PARAMS_FILE, text)
    print(
        f"wrote {PARAMS_FILE} from {CONFIG_DIR}/{CONFIG_NAME}.yaml"
        + (f" with {' '.join(args)}" if args else "")
        + (" (overrides saved into it)" if save else "")
    )
    if kept:
        print(f"kept the overrides params.yaml held: {' '.join(kept)} (`kiln params --reset ...` composes from conf/ alone)")
    if before is not None:
        print(_rerun_line(before, after))
    if args:
        savable = all("=" in a and not a.startswith(("~", "+")) for a in args)
        how = (
            f"`kiln params --save {' '.join(shlex.quote(a) for a in args)}` writes them into it"
            if savable
            else f"to keep them, write them into {CONFIG_DIR}/{CONFIG_NAME}.yaml"
        )
        print(
            f"note: `dvc exp run` composes params.yaml from {CONFIG_DIR}/{CONFIG_NAME}.yaml alone and does not keep these overrides; {how}",
            file=sys.stderr,
        )
    return 0

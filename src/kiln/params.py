"""params.yaml is the Hydra composition of conf/; this module writes and checks it.

`dvc exp run` composes params.yaml itself (hydra.enabled in .dvc/config) from
conf/config.yaml alone; a plain `dvc repro` reads params.yaml as it is, and every stage
refuses a params.yaml that is not what conf/ (with the stamped overrides) composes to
(check_fresh), so after editing conf/ run:

    python -m kiln.params            # re-compose params.yaml from conf/
    python -m kiln.params --check    # exit 1 if params.yaml differs from its composition
    python -m kiln.params targets.openvino.threads=1   # with Hydra overrides (plain `dvc repro` only), on top of
                                                       # those params.yaml already holds (--reset: conf/ alone)
    python -m kiln.params --save targets=small         # write overrides into conf/config.yaml: experiments keep them

The first line of params.yaml stamps how it was composed: a digest of conf/, the overrides,
and a digest of the composed values, so a hand edit is told apart from a change in conf/.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .atomic import write_text
from .config import PARAMS_FILE, check_target_names
from .errors import KilnError, run_cli

CONFIG_DIR = "conf"
CONFIG_NAME = "config"
STAMP = "# composed by `python -m kiln.params` from conf/ "  # + "sha256:<conf/> overrides: [...] values:<composition>"
# DVC sets this while it runs an experiment, after composing params.yaml from conf/ itself.
IN_EXPERIMENT = "DVC_EXP_BASELINE_REV"
ALLOW_STALE = "KILN_ALLOW_STALE_PARAMS"


def conf_digest(config_dir: str | Path = CONFIG_DIR) -> str:
    """A digest of every file under conf/: cheap enough to check before every stage."""
    root = Path(config_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def values_digest(values: Any) -> str:
    """A digest of parsed params: formatting and comments do not count, values do."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stamped_yaml(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR) -> str:
    body = compose_yaml(overrides, config_dir)
    digest = values_digest(yaml.safe_load(body))
    return f"{STAMP}sha256:{conf_digest(config_dir)} overrides: {list(overrides)} values:{digest}\n" + body


def read_stamp(params_file: str | Path) -> dict[str, Any] | None:
    """How params.yaml was composed: {conf, overrides, values (None in stamps older than the values digest)};
    None when kiln did not write it (`dvc exp run`, `dvc exp apply`, a hand-written file)."""
    with Path(params_file).open(encoding="utf-8") as f:
        first = f.readline()
    if not first.startswith(STAMP):
        return None
    stamp = first[len(STAMP) :].strip()
    rest, _, values = stamp.rpartition(" values:")
    if not rest:
        rest, values = stamp, ""
    conf, _, overrides = rest.partition(" overrides: ")
    return {"conf": conf.removeprefix("sha256:"), "overrides": list(ast.literal_eval(overrides or "[]")), "values": values or None}


def recompose_command(overrides: Sequence[str]) -> str:
    return " ".join(["python -m kiln.params", *(shlex.quote(o) for o in overrides)])


def leaf_diff(composed: Any, current: Any, prefix: str = "") -> list[str]:
    """Hydra overrides that turn `composed` into `current`: `key=value`, `+key=value` (added), `~key` (removed)."""
    if isinstance(composed, dict) and isinstance(current, dict):
        out = []
        for key in list(composed) + [k for k in current if k not in composed]:
            path = f"{prefix}{key}"
            if key not in current:
                out.append(f"~{path}")
            elif key not in composed:
                out.append(f"+{path}={_override_value(current[key])}")
            else:
                out += leaf_diff(composed[key], current[key], f"{path}.")
        return out
    return [] if composed == current else [f"{prefix.rstrip('.')}={_override_value(current)}"]


def _override_value(value: Any) -> str:
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def check_fresh(params_file: str | Path = PARAMS_FILE, config_dir: str | Path = CONFIG_DIR) -> None:
    """Refuse a params.yaml that is not what it says it is: composed from an older conf/, or edited by hand.

    params.yaml written by `python -m kiln.params` carries digests of conf/ and of its values; one
    written by DVC (`dvc exp run`, `dvc exp apply`) does not, and is judged by modification time."""
    params, conf = Path(params_file), Path(config_dir)
    if os.environ.get(IN_EXPERIMENT) or os.environ.get(ALLOW_STALE) or not params.is_file() or not conf.is_dir():
        return
    stamp = read_stamp(params)
    allow = f"or set {ALLOW_STALE}=1 to use it as it is"
    if stamp is None:
        composed_at = params.stat().st_mtime
        newer = sorted(str(p) for p in conf.rglob("*.yaml") if p.stat().st_mtime > composed_at + 1)
        if newer:
            raise KilnError(
                f"{params} may be stale: {', '.join(newer[:3])} changed after it was written; run "
                f"`python -m kiln.params [overrides]` to re-compose it from conf/, {allow}"
            )
        return
    overrides = stamp["overrides"]
    current = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
    with_overrides = f" with overrides {overrides}" if overrides else ""
    if stamp["values"] and values_digest(current) != stamp["values"]:
        edits = leaf_diff(compose(overrides, conf), current) if stamp["conf"] == conf_digest(conf) else []
        keep = (
            f"to keep the edit, compose it as an override: `{recompose_command([*overrides, *edits])}`"
            if edits
            else f"re-compose it with `{recompose_command(overrides)}` (after moving your edit into conf/)"
        )
        raise KilnError(
            f"{params} was edited by hand after `python -m kiln.params` composed it from conf/{with_overrides}"
            f"{' (' + ', '.join(edits[:5]) + ')' if edits else ''}: a plain `dvc repro` and `dvc exp run` would "
            f"disagree about it; {keep}, {allow}"
        )
    if stamp["conf"] == conf_digest(conf):
        return
    # conf/ changed; what matters is whether the composition did (a new, unused target set does not count).
    if compose(overrides, conf) != current:
        raise KilnError(
            f"{params} is stale: conf/ changed since it was composed{with_overrides}; run "
            f"`{recompose_command(overrides)}` to re-compose it (hand edits of params.yaml are lost that way: "
            f"put them in conf/), {allow}"
        )


def pipeline_calibrate(targets: Any) -> Any:
    """{target: runtime} for the targets whose precision needs calibration: one calibrate@<target> stage
    each (dvc.yaml's foreach). Other targets get no calibrate stage at all: a no-op repro is cheaper."""
    from omegaconf import OmegaConf

    return OmegaConf.create({name: t["runtime"] for name, t in _targets(targets).items() if _calibrated(t)})


def pipeline_build(targets: Any) -> Any:
    """{target: {runtime, calibration, model}}: what build@<target> depends on besides the graph. calibration:
    the calibrate stage's output for calibrated targets; model: the model's files for runtimes that build
    from the PyTorch model. Where a target has no such dependency, its own params slice (already one) stands in."""
    from omegaconf import OmegaConf

    from .paths import CALIBRATION, MODEL_FILES, TARGET_PARAMS
    from .runtimes import RUNTIMES

    out = {}
    for name, t in _targets(targets).items():
        own = TARGET_PARAMS / name / "build.json"
        calibration = CALIBRATION / name if _calibrated(t) else own
        info = RUNTIMES.get(str(t.get("runtime")))
        model = MODEL_FILES if info is not None and info.from_model else own
        out[name] = {"runtime": t.get("runtime"), "calibration": calibration.as_posix(), "model": model.as_posix()}
    return OmegaConf.create(out)


def _targets(targets: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    raw = OmegaConf.to_container(targets, resolve=True) if isinstance(targets, DictConfig) else targets
    return {str(k): dict(v or {}) for k, v in (raw or {}).items()} if isinstance(raw, dict) else {}


def _calibrated(target: Mapping[str, Any]) -> bool:
    from .runtimes import is_calibrated

    return is_calibrated(str(target.get("runtime")), str(target.get("precision", "fp32")))


RESOLVERS = {"kiln_pipeline_calibrate": pipeline_calibrate, "kiln_pipeline_build": pipeline_build}


def register_resolvers() -> None:
    """The resolvers conf/config.yaml's `pipeline:` keys use, for kiln's composition and DVC's
    (hydra_plugins/kiln_resolvers.py registers them in DVC's process)."""
    from omegaconf import OmegaConf

    for name, fn in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


def compose_yaml(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR, config_name: str = CONFIG_NAME) -> str:
    """The YAML `dvc exp run` would write: same composition, same dumper."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()

    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise KilnError(
            f"cannot compose {config_dir}/{config_name}.yaml with overrides {list(overrides)}: {e}{_hint(overrides, config_dir)}"
        ) from e
    return OmegaConf.to_yaml(cfg)


def _hint(overrides: Sequence[str], config_dir: str | Path) -> str:
    """Did-you-mean for an override whose key does not exist (a typo in a sweep)."""
    from .errors import close_matches

    if not overrides:
        return ""
    try:
        known: Any = yaml.safe_load(compose_yaml((), config_dir))
    except KilnError:
        return ""
    hints = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        node, path = known, list[str]()
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if isinstance(node, dict) and part in {str(k) for k in node if not isinstance(k, str)}:
                    where = ".".join(path)
                    hints.append(
                        f"'{where}' has integer keys, which a dotted override cannot name: replace the whole "
                        f"mapping, e.g. '~{where}' '+{where}={{1: 0.5, 4: 0.5}}'"
                    )
                elif isinstance(node, dict):
                    hint = close_matches(part, node)
                    if hint:
                        hints.append(f"'{'.'.join([*path, part])}'{hint}")
                break
            node, path = node[part], [*path, part]
    return ("\n" + "; ".join(hints)) if hints else ""


def compose(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR) -> dict[str, Any]:
    return yaml.safe_load(compose_yaml(overrides, config_dir))


def stale_keys(params_file: str | Path = PARAMS_FILE, config_dir: str | Path = CONFIG_DIR) -> tuple[list[str], list[str]]:
    """(top-level keys where params.yaml and its composition disagree, the overrides it was composed with).
    The composition is conf/ with the overrides params.yaml's stamp records."""
    stamp = read_stamp(params_file)
    overrides = stamp["overrides"] if stamp else []
    composed = compose(overrides, config_dir)
    current = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    return sorted(k for k in set(composed) | set(current) if composed.get(k) != current.get(k)), overrides


def config_groups(config_dir: str | Path = CONFIG_DIR) -> set[str]:
    return {p.name for p in Path(config_dir).iterdir() if p.is_dir()}


def save_overrides(overrides: Sequence[str], config_dir: str | Path = CONFIG_DIR, config_name: str = CONFIG_NAME) -> None:
    """Write overrides into conf/config.yaml, which is what `dvc exp run` composes from: a group choice
    (`targets=small`) into the defaults list, a value (`targets.openvino.threads=1`) into the file's own
    keys (applied last: `_self_` ends the defaults list). Comments and layout are kept."""
    import io

    from ruamel.yaml import YAML

    path = Path(config_dir) / f"{config_name}.yaml"
    original = path.read_text(encoding="utf-8")
    rt = YAML()
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(original)
    groups = config_groups(config_dir)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or key.startswith(("~", "+")):
            raise KilnError(f"--save takes key=value overrides; '{override}' is not one (edit {path} by hand for additions and deletions)")
        value = yaml.safe_load(raw) if raw else None
        if key in groups:
            entry = next((e for e in doc["defaults"] if isinstance(e, dict) and key in e), None)
            if entry is None:
                raise KilnError(f"{path} has no `- {key}: ...` line in its defaults list to change")
            if isinstance(value, list):  # `- targets: [cpu, gpu]`, as a person writes it
                from ruamel.yaml.comments import CommentedSeq

                value = CommentedSeq(value)
                value.fa.set_flow_style()
            entry[key] = value
            continue
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node or not isinstance(node[part], dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    out = io.StringIO()
    rt.dump(doc, out)
    expected = compose(overrides, config_dir)
    write_text(path, out.getvalue())
    try:
        got = compose((), config_dir)
    except KilnError:
        got = None
    if got != expected:
        write_text(path, original)
        raise KilnError(f"could not write {list(overrides)} into {path} so that it composes the same; {path} is unchanged: edit it by hand")


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _current_values() -> dict[str, Any] | None:
    try:
        return yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None


def _rerun_line(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Which stages `dvc repro` will re-run for this change: `dvc status` cannot say it before configure ran."""
    from .stage_params import describe_stages, rerun_plan

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
        print(f"kept the overrides params.yaml held: {' '.join(kept)} (`python -m kiln.params --reset ...` composes from conf/ alone)")
    if before is not None:
        print(_rerun_line(before, after))
    if args:
        savable = all("=" in a and not a.startswith(("~", "+")) for a in args)
        how = (
            f"`python -m kiln.params --save {' '.join(shlex.quote(a) for a in args)}` writes them into it"
            if savable
            else f"to keep them, write them into {CONFIG_DIR}/{CONFIG_NAME}.yaml"
        )
        print(
            f"note: `dvc exp run` composes params.yaml from {CONFIG_DIR}/{CONFIG_NAME}.yaml alone and does not keep these overrides; {how}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    run_cli(main)

"""params.yaml is the Hydra composition of conf/; this module writes and checks it.

`dvc exp run` composes params.yaml itself (hydra.enabled in .dvc/config) from
conf/config.yaml alone; a plain `dvc repro` reads params.yaml as it is, and every stage
refuses a params.yaml that is not what conf/ (with the stamped overrides) composes to
(check_fresh), so after editing conf/ run:

    kiln params            # re-compose params.yaml from conf/
    kiln params --check    # exit 1 if params.yaml differs from its composition
    kiln params targets.openvino.threads=1   # with Hydra overrides (plain `dvc repro` only), on top of
                                             # those params.yaml already holds (--reset: conf/ alone)
    kiln params --save targets=small         # write overrides into conf/config.yaml: experiments keep them

The first line of params.yaml stamps how it was composed: a digest of conf/, the overrides,
and a digest of the composed values, so a hand edit is told apart from a change in conf/.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any, Sequence

import yaml

from kiln.config.views import PARAMS_FILE
from kiln.core.atomic import write_text
from kiln.core.errors import KilnError

CONFIG_DIR = "conf"
CONFIG_NAME = "config"
STAMP = "# composed by `kiln params` from conf/ "  # + "sha256:<conf/> overrides: [...] values:<composition>"
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
    return " ".join(["kiln params", *(shlex.quote(o) for o in overrides)])


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

    params.yaml written by `kiln params` carries digests of conf/ and of its values; one
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
                f"`kiln params [overrides]` to re-compose it from conf/, {allow}"
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
            f"{params} was edited by hand after `kiln params` composed it from conf/{with_overrides}"
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


def compose_yaml(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR, config_name: str = CONFIG_NAME) -> str:
    """The YAML `dvc exp run` would write: same composition, same dumper."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from kiln.config.resolvers import register_resolvers

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
    from kiln.core.errors import close_matches

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

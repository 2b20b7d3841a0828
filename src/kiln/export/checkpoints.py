"""Checkpoints the way people save them: plain state_dicts, DataParallel/DDP and Lightning wrappers, EMA
copies, safetensors; whole pickled modules and TorchScript archives refused with the lines that convert
them. Nothing is unpickled beyond `torch.load(weights_only=True)`."""

from __future__ import annotations

import json
import logging
import os
import pickletools
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.core.errors import KilnError, first_line, strip_ansi

log = logging.getLogger("kiln.export.models")

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema", "ema_state_dict", "ema")
# torch >= 2.4 says "Unsupported global: GLOBAL x.Y was not an allowed global", older versions "Unsupported class x.Y".
_REFUSED_GLOBAL = re.compile(r"Unsupported (?:global: GLOBAL|class) ([\w.]+)")
_MEMO_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
# Why a checkpoint's keys carry a prefix the model's do not, for the log line that says it was stripped.
_PREFIX_REASONS = {"module": "added by DataParallel/DistributedDataParallel", "_orig_mod": "added by torch.compile"}
_ATTRIBUTE_REASON = "the attribute of the LightningModule or other wrapper that held the network"


def _py_str(text: Any) -> str:
    """`text` as a Python string literal in double quotes, for code the user pastes."""
    return json.dumps(str(text))


def _pickle_outline(p: Path) -> tuple[str, dict[str, str], set[str]] | None:
    """What a torch.save file's pickle holds, read from its opcodes without running any: the class of the top-level
    object ('' for a dict or other container), the class each string key is followed by, and which _WRAPPER_KEYS
    occur. None for a file that is not a pickle torch.save wrote."""
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                name = next((n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
                if name is None:
                    return None
                with z.open(name) as f:
                    return _outline(f)
        with open(p, "rb") as f:
            for _ in range(3):  # the legacy format pickles a magic number, a protocol version and system info first
                for _op in pickletools.genops(f):
                    pass
            return _outline(f)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None  # a truncated or foreign file: the caller falls back to torch's own words


def _outline(f: Any) -> tuple[str, dict[str, str], set[str]]:
    top: str | None = None
    keyed: dict[str, str] = {}
    keys: set[str] = set()
    run: list[str] = []  # the strings pushed since the last other opcode: a key, or STACK_GLOBAL's module and name
    for op, arg, _pos in pickletools.genops(f):
        # MARK too: the legacy format pickles a module as the persistent id (MARK, "module", <class>, ...).
        if op.name in _MEMO_OPS or op.name == "MARK":
            continue
        if op.name in _STRING_OPS:
            run.append(str(arg))
            keys.update({str(arg)} & set(_WRAPPER_KEYS))
            continue
        cls, key = None, None
        if op.name == "GLOBAL":
            cls, key = str(arg).replace(" ", "."), run[-1] if run else None
        elif op.name == "STACK_GLOBAL" and len(run) >= 2:
            cls, key = ".".join(run[-2:]), run[-3] if len(run) > 2 else None
        if top is None:
            top = cls or ""
        if cls and key is not None:
            keyed.setdefault(key, cls)
        run = []
    return top or "", keyed, keys


def _converted_path(p: Path) -> Path:
    return p.with_name(f"{p.stem}.state_dict.pt" if not p.name.endswith(".state_dict.pt") else f"{p.stem}.weights.pt")


def _is_torchscript(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _torchscript_message(p: Path) -> str:
    out = _converted_path(p)
    return (
        f"model.checkpoint '{p}' is a TorchScript archive (torch.jit.save), not a state_dict: save its weights with "
        f"`torch.save(torch.jit.load({_py_str(p)}).state_dict(), {_py_str(out)})` and set model.checkpoint to {out}"
    )


def _unloadable(p: Path, e: BaseException) -> str:
    """The one line for a checkpoint torch.load(weights_only=True) refused, without torch's colours and paragraphs of advice."""
    text = strip_ansi(str(e))
    out = _converted_path(p)
    if "TorchScript archive" in text:
        return _torchscript_message(p)
    refused = _REFUSED_GLOBAL.search(text)
    if refused is None:
        detail = re.search(r"WeightsUnpickler error: *(.+)", text)
        reason = detail[1].strip() if detail else first_line(e)
        return f"model.checkpoint '{p}' is not a readable PyTorch checkpoint ({reason}); save one with torch.save(model.state_dict(), path)"
    cls = refused[1]
    module, _, short = cls.rpartition(".")
    where = f"in the script that defines {short} (it was pickled from __main__)" if module == "__main__" else f"where {cls} is importable"
    top, keyed, keys = _pickle_outline(p) or (None, {}, set())
    if top is None or top == cls:
        return (
            f"model.checkpoint '{p}' holds a whole pickled module ({cls}), not a state_dict, and kiln does not unpickle arbitrary "
            f"code: convert it {where} with `model = torch.load({_py_str(p)}, weights_only=False)` then "
            f"`torch.save(model.state_dict(), {_py_str(out)})`, and set model.checkpoint to {out}"
        )
    key = next((k for k in _WRAPPER_KEYS if k in keys), None)
    if key is None:
        weights = "{k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}"
    elif keyed.get(key) == cls:  # a whole module stored under the key
        weights = f'ckpt["{key}"].state_dict()'
    else:
        weights = f'ckpt["{key}"]'
    return (
        f"model.checkpoint '{p}' holds a pickled {cls} object next to its weights (hyper-parameters, training state or a "
        f"whole module), and kiln does not unpickle arbitrary code: save the weights alone {where} with "
        f"`ckpt = torch.load({_py_str(p)}, weights_only=False)` then `torch.save({weights}, {_py_str(out)})`, "
        f"and set model.checkpoint to {out}"
    )


def _load_safetensors(p: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise KilnError(
            f"model.checkpoint '{p}' is a safetensors file and the safetensors package is not installed; "
            "install it with `pip install safetensors`"
        ) from None
    try:
        return load_file(p, device="cpu")
    except Exception as e:
        raise KilnError(
            f"model.checkpoint '{p}' is not a readable safetensors file ({first_line(e)}); "
            "save one with safetensors.torch.save_file(model.state_dict(), path)"
        ) from e


def _holds_weights(value: Any) -> bool:
    return isinstance(value, dict) and any(isinstance(v, (torch.Tensor, dict)) for v in value.values())


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The weights in a checkpoint file, unwrapped from a training script's dict; non-tensor entries are left for
    apply_state_dict to drop once it knows the tensors fit the model."""
    p = Path(path)
    if not p.is_file():
        raise KilnError(f"model.checkpoint '{p}' does not exist; set it to a state_dict file saved with torch.save, or to null")
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    if _is_torchscript(p):  # torch.load would warn, then refuse it under weights_only
        raise KilnError(_torchscript_message(p))
    try:
        # Never weights_only=False: a pickle runs whatever code it names, and checkpoints come from anywhere.
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KilnError(_unloadable(p, e)) from e
    # Training scripts wrap the weights ({"state_dict": ...}, {"model": ...}), sometimes twice; a "model" key can
    # also hold a config, so only a dict with tensors (or another wrapper) in it counts.
    for _ in range(3):
        found = [k for k in _WRAPPER_KEYS if isinstance(obj, dict) and _holds_weights(obj.get(k))]
        if not found:
            break
        if len(found) > 1:
            log.info("model.checkpoint '%s': weights taken from '%s'; it also has %s", p, found[0], ", ".join(repr(k) for k in found[1:]))
        obj = obj[found[0]]
    if not isinstance(obj, dict):
        raise KilnError(f"model.checkpoint '{p}' holds a {type(obj).__name__}, not a state_dict of tensors")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = [str(k) for k in obj]
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        raise KilnError(
            f"model.checkpoint '{p}' holds a dict without tensors (keys: {', '.join(keys[:5]) or 'none'}{more}), not a state_dict; "
            "save the weights with torch.save(model.state_dict(), path)"
        )
    return obj


def _optional(key: str) -> bool:
    # BatchNorm's batch counter only matters for training with momentum=None; converted weights often lack it.
    return key.rpartition(".")[2] == "num_batches_tracked"


def _with_metadata(new: dict[str, Any], old: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`new` carrying `old`'s per-module versions (state_dict()'s _metadata), re-keyed without `prefix`: modules
    read their version to convert old formats, and a state without it reads as the oldest."""
    meta = getattr(old, "_metadata", None)
    out: OrderedDict[str, Any] = OrderedDict(new)
    if meta is not None:
        root = prefix[:-1]
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if k == root else k[len(prefix) :], v) for k, v in meta.items() if k == root or k.startswith(prefix)
        )
    return out


def _fit_prefixes(state: dict[str, Any], own_keys: Any) -> tuple[dict[str, Any], str | None]:
    """`state` without the leading key prefix that keeps it from fitting the model ('module.', 'model.', '_orig_mod.'...)
    and a note saying which and why; unchanged, with None, when the keys fit already or no one prefix makes them fit."""
    own = [k for k in own_keys if not _optional(k)]
    if not own or all(k in state for k in own):
        return state, None
    probe = own[0]
    candidates = {k[: -len(probe)] for k in state if isinstance(k, str) and k.endswith("." + probe)}
    fits = []
    for prefix in candidates:
        sub = {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        if all(k in sub for k in own):
            extra = sum(k not in own_keys for k in sub)
            fits.append((extra, len(state) - len(sub), len(prefix), prefix, sub))
    if not fits:
        return state, None
    # The prefix that leaves nothing over, then the outermost: 'model.' before an 'ema_model.' copy of the same network.
    _extra, outside, _len, prefix, sub = min(fits, key=lambda f: f[:4])
    segments = prefix[:-1].split(".")
    reasons = [_PREFIX_REASONS.get(seg, _ATTRIBUTE_REASON) for seg in segments]
    if len(segments) > 1:
        reasons = [f"'{seg}.' {reason}" for seg, reason in zip(segments, reasons)]
    note = f"key prefix '{prefix}' stripped ({'; '.join(reasons)})"
    if outside:
        ignored = [str(k) for k in state if not (isinstance(k, str) and k.startswith(prefix))]
        more = f" and {len(ignored) - 3} more" if len(ignored) > 3 else ""
        note += f"; {outside} entries outside it ignored ({', '.join(ignored[:3])}{more})"
    return _with_metadata(sub, state, prefix), note


def apply_state_dict(model: nn.Module, state: dict[str, Any], source: str) -> None:
    own = model.state_dict()
    state, note = _fit_prefixes(state, own)
    tensors: dict[str, torch.Tensor] = {}
    others = []
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            tensors[k] = v
        elif k in own and own[k].dim() == 0 and isinstance(v, (bool, int, float)):
            tensors[k] = torch.tensor(v, dtype=own[k].dtype)  # a scalar buffer saved as a number (num_batches_tracked)
        else:
            others.append(f"{k} ({type(v).__name__})")
    missing = [k for k in own if k not in tensors and not _optional(k)]
    lacking = [k for k in own if k not in tensors and _optional(k)]
    unexpected = [k for k in tensors if k not in own]
    mismatched = [
        f"{k} {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in tensors and tensors[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
            ("non-tensor entries", others),
        ):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise KilnError(f"{source} does not fit the model{f' ({note})' if note else ''}: {'; '.join(parts)}")
    if note:
        log.info("%s: %s", source, note)
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        log.info("%s: non-tensor entries ignored, the tensors fit the model without them: %s%s", source, ", ".join(others[:3]), more)
    if lacking:
        log.info(
            "%s has no num_batches_tracked for %d batch-norm layers: the model's are kept (only training reads them)", source, len(lacking)
        )
    model.load_state_dict(_with_metadata(tensors, state), strict=not lacking)

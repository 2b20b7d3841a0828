"""The fp32 reference every engine is judged against: inputs, eager outputs and labels in one .npz.

The validate stage writes it (with torch); benchmarks only read it, so this module imports no framework.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path


def save_reference(path: str | Path, ref: dict[str, Any]) -> None:
    arrays = {f"input/{k}": v for k, v in ref["inputs"].items()} | {f"output/{k}": v for k, v in ref["outputs"].items()}
    if ref["labels"] is not None:
        arrays["labels"] = ref["labels"]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, source=np.array(ref["source"]), **arrays)


def load_reference(path: str | Path) -> dict[str, Any]:
    with np.load(path) as z:
        return {
            "inputs": {k[6:]: z[k] for k in z.files if k.startswith("input/")},
            "outputs": {k[7:]: z[k] for k in z.files if k.startswith("output/")},
            "labels": z["labels"] if "labels" in z.files else None,
            "source": str(z["source"]),
        }

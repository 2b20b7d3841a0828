"""The fp32 reference every engine is judged against: inputs, eager outputs and labels in one .npz.

The validate stage writes it (with torch); benchmarks only read it, so this module imports no framework.
Labels are class indices [N] (classification), or per-image boxes and labels (detection), stored flat
with the image each row belongs to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.core.atomic import atomic_path


def save_reference(path: str | Path, ref: dict[str, Any]) -> None:
    arrays = {f"input/{k}": v for k, v in ref["inputs"].items()} | {f"output/{k}": v for k, v in ref["outputs"].items()}
    labels = ref["labels"]
    if isinstance(labels, list):
        arrays["boxlabels/image"] = np.concatenate([np.full(len(d["labels"]), i, np.int64) for i, d in enumerate(labels)] or [np.zeros(0)])
        arrays["boxlabels/boxes"] = np.concatenate(
            [np.asarray(d["boxes"], np.float32).reshape(-1, 4) for d in labels] or [np.zeros((0, 4))]
        )
        arrays["boxlabels/labels"] = np.concatenate([np.asarray(d["labels"], np.int64) for d in labels] or [np.zeros(0)])
        arrays["boxlabels/count"] = np.array(len(labels))
    elif labels is not None:
        arrays["labels"] = labels
    meta = {"task": ref.get("task") or "", "degenerate": ref.get("degenerate") or ""}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, source=np.array(ref["source"]), **{k: np.array(v) for k, v in meta.items()}, **arrays)


def load_reference(path: str | Path) -> dict[str, Any]:
    with np.load(path) as z:
        labels: Any = z["labels"] if "labels" in z.files else None
        if "boxlabels/count" in z.files:
            image = z["boxlabels/image"]
            labels = [
                {"boxes": z["boxlabels/boxes"][image == i], "labels": z["boxlabels/labels"][image == i]}
                for i in range(int(z["boxlabels/count"]))
            ]
        return {
            "inputs": {k[6:]: z[k] for k in z.files if k.startswith("input/")},
            "outputs": {k[7:]: z[k] for k in z.files if k.startswith("output/")},
            "labels": labels,
            "source": str(z["source"]),
            "task": str(z["task"]) if "task" in z.files and str(z["task"]) else None,
            "degenerate": str(z["degenerate"]) if "degenerate" in z.files and str(z["degenerate"]) else None,
        }

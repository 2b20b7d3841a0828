"""Class scores [batch, classes]: top-1 agreement with the reference, real top-1 against folder labels."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kiln.accuracy.tasks import Task
from kiln.core.errors import KilnError


class Classification(Task):
    name = "classification"
    budget_keys = {"min_top1_agreement": ("top1_agreement", min), "max_top1_drop": ("top1_drop", max)}
    agreement_metric = "top1_agreement"
    headline = ("top1_agreement", "top1")

    def check(self) -> None:
        if self.scores_name() is None:
            shapes = ", ".join(f"'{o.name}' {list(o.shape)}" for o in self.outputs)
            raise KilnError(f"model.task classification needs a [batch, classes] float output; the model returns {shapes}")

    def scores_name(self) -> str | None:
        return next((o.name for o in self.outputs if len(o.shape) == 2 and o.shape[1] > 1 and "int" not in o.dtype), None)

    def compare(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, Any]:
        result = super().compare(ref, got)
        name = self.scores_name()
        assert name is not None
        result["top1_agreement"] = float(np.mean(np.argmax(ref[name], axis=1) == np.argmax(got[name], axis=1)))
        return result

    def read_labels(self, images: Any, preprocess: Any) -> Any:
        return images.target_indices()  # ImageFolder layout: <class>/<image>

    def against_labels(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], labels: Any) -> dict[str, Any]:
        if labels is None:
            return {}
        name = self.scores_name()
        assert name is not None
        labels = np.asarray(labels)
        ref_top1 = float(np.mean(np.argmax(ref[name], axis=1) == labels))
        top1 = float(np.mean(np.argmax(got[name], axis=1) == labels))
        return {"top1": top1, "top1_fp32": ref_top1, "top1_drop": 100.0 * (ref_top1 - top1)}

    def degenerate(self, ref: Mapping[str, np.ndarray]) -> str | None:
        reason = super().degenerate(ref)
        if reason:
            return reason
        name = self.scores_name()
        assert name is not None
        scores = np.asarray(ref[name])
        if scores.shape[0] > 1:
            classes = np.unique(np.argmax(scores, axis=1))
            if classes.size == 1:
                # An engine that always answers that class agrees 100%: agreement is not evidence.
                return f"the reference's top-1 is class {int(classes[0])} for all {scores.shape[0]} inputs"
        return None

"""Feature vectors [batch, dims]: per-sample cosine and nearest-neighbour agreement with the reference."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kiln.accuracy.tasks import Task
from kiln.core.errors import KilnError


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Embedding(Task):
    name = "embedding"
    budget_keys = {"min_embedding_cosine": ("embedding_cosine_min", min), "min_neighbour_agreement": ("neighbour_agreement", min)}
    agreement_metric = "embedding_cosine_min"
    headline = ("embedding_cosine_min", "neighbour_agreement")

    def check(self) -> None:
        if not any(len(o.shape) >= 2 for o in self.outputs):
            raise KilnError("model.task embedding needs a [batch, dims] output")

    def primary(self) -> str:
        return next(o.name for o in self.outputs if len(o.shape) >= 2)

    def compare(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, Any]:
        result = super().compare(ref, got)
        name = self.primary()
        r, g = _unit(ref[name]), _unit(got[name])
        per_sample = np.sum(r * g, axis=1)
        result.update(embedding_cosine_mean=float(per_sample.mean()), embedding_cosine_min=float(per_sample.min()))
        if r.shape[0] > 2:
            # What retrieval sees: is each sample's nearest other sample the same as in the reference?
            def nearest(u: np.ndarray) -> np.ndarray:
                sim = u @ u.T
                np.fill_diagonal(sim, -np.inf)
                return np.argmax(sim, axis=1)

            result["neighbour_agreement"] = float(np.mean(nearest(r) == nearest(g)))
        return result

"""What a model's outputs mean, and so how an engine's outputs are judged against the reference.

A task (classification, detection, segmentation, embedding, raw) says which figures compare an engine
with the eager fp32 reference, which accuracy-budget keys it has, how it reads labels, and when a
reference proves nothing. Validate and benchmark ask the model's task through `Task`; they know no
task by name. `kiln.accuracy.numerics` stays the element-wise numerics every task shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from kiln.accuracy.numerics import compare_outputs, degenerate_reason, summarize
from kiln.core.errors import KilnError, close_matches

# Keys every task judges where the element-wise figures were measured: an output no task reads still
# has a budget, so nothing passes silently.
ELEMENTWISE_BUDGET = {"min_sqnr_db": ("sqnr_db", min), "min_cosine": ("cosine", min)}


@dataclass(frozen=True)
class OutputInfo:
    """An output as the task sees it before any engine runs: its name, per-batch shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class Task:
    """One kind of model output. Subclasses fill in the class attributes and override what differs."""

    name = "raw"
    # budget key -> (accuracy metric it limits, min: the metric must be >= the limit | max: <=)
    budget_keys: dict[str, tuple[str, Callable[..., Any]]] = {}
    # the figure the summary quotes as "agreement", and the metrics `dvc metrics diff` shows
    agreement_metric: str | None = None
    headline: tuple[str, ...] = ()
    # outputs compared element by element (all by default; detection's padded lists are not)
    elementwise = True

    def __init__(self, outputs: list[OutputInfo]):
        self.outputs = outputs

    def check(self) -> None:
        """Raise KilnError when the outputs cannot be read as this task's (a declared model.task that does not fit)."""

    def compare(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The engine's agreement with the reference on the same inputs."""
        result: dict[str, Any] = {}
        if self.elementwise:
            comparisons = compare_outputs(ref, got)
            result.update(summarize(comparisons))
            result["outputs"] = {c.name: c.to_dict() for c in comparisons}
        return result

    def read_labels(self, images: Any, preprocess: Any) -> Any:
        """This task's labels for the eval images (a kiln.data.images.ImageSet), or None when the folder has none."""
        return None

    def against_labels(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], labels: Any) -> dict[str, Any]:
        """Real accuracy of the engine and of the fp32 reference, when the eval data has labels."""
        return {}

    def degenerate(self, ref: Mapping[str, np.ndarray]) -> str | None:
        """Why agreement with this reference proves nothing, or None. Checked on validate's inputs and on the eval set."""
        for name, arr in ref.items():
            reason = degenerate_reason(arr)
            if reason:
                return f"output '{name}': {reason}"
        return None

    def gate_degenerate(self, ref: Mapping[str, np.ndarray]) -> str | None:
        """Why the validation gate's comparison on this reference proves nothing. The gate compares outputs
        element by element, so a reference that varies proves the graph right even when, say, every input
        gets the same class; a task whose gate compares something else says so."""
        return Task.degenerate(self, ref)

    def validate(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], atol: float, rtol: float) -> list[Any]:
        """The validation gate's element-wise comparisons (a task may judge some outputs its own way)."""
        return compare_outputs(ref, got, atol, rtol)


def all_budget_keys() -> dict[str, tuple[str, Callable[..., Any]]]:
    keys = dict(ELEMENTWISE_BUDGET)
    for cls in task_classes().values():
        keys.update(cls.budget_keys)
    return keys


def task_classes() -> dict[str, type[Task]]:
    from kiln.accuracy.tasks.classification import Classification
    from kiln.accuracy.tasks.detection import Detection
    from kiln.accuracy.tasks.embedding import Embedding
    from kiln.accuracy.tasks.segmentation import Segmentation

    return {"classification": Classification, "detection": Detection, "segmentation": Segmentation, "embedding": Embedding, "raw": Task}


def check_task_name(declared: Any) -> None:
    """model.task must be auto or a kiln task: checked by configure before anything runs, and again here."""
    classes = task_classes()
    if declared not in ("auto", *classes):
        raise KilnError(
            f"model.task '{declared}' is not a kiln task{close_matches(str(declared), classes)}; tasks: auto, {', '.join(classes)}"
        )


def infer_task(outputs: list[OutputInfo]) -> tuple[str, str]:
    """(task, why) from the outputs' names and shapes, for `model.task: auto`. Ambiguous outputs are raw."""
    names = {o.name.lower() for o in outputs}
    if {"boxes", "scores"} <= names:
        return "detection", "outputs named boxes and scores"
    floats = [o for o in outputs if o.dtype.startswith(("float", "bfloat"))]
    first = floats[0] if floats else None
    if first is not None and len(first.shape) == 4 and first.shape[1] > 1 and first.shape[2] > 1 and first.shape[3] > 1:
        return "segmentation", f"output '{first.name}' is [batch, {first.shape[1]} classes, {first.shape[2]}, {first.shape[3]}]"
    if first is not None and len(first.shape) == 2 and first.shape[1] > 1:
        if any(k in first.name.lower() for k in ("emb", "feat", "vector", "desc")):
            return "embedding", f"output '{first.name}' is [batch, {first.shape[1]}] and named like features"
        return (
            "classification",
            f"output '{first.name}' is [batch, {first.shape[1]}] scores (set model.task: embedding if they are features)",
        )
    shapes = ", ".join(f"'{o.name}' {list(o.shape)}" for o in outputs)
    return "raw", f"no task reads outputs {shapes}: compared element by element (set model.task to say what they are)"


def resolve_task(declared: str | None, outputs: list[OutputInfo]) -> tuple[Task, str]:
    """The model's task: `model.task` when set, else inferred. Returns the task and the line the log and report show."""
    if declared in (None, "", "auto"):
        name, why = infer_task(outputs)
        line = f"task {name} (inferred: {why})"
    else:
        check_task_name(declared)
        name, line = declared, f"task {declared} (model.task)"
    task = task_classes()[name](outputs)
    task.check()
    return task, line


def output_infos(outputs: Mapping[str, np.ndarray]) -> list[OutputInfo]:
    return [OutputInfo(k, tuple(int(d) for d in v.shape), str(v.dtype)) for k, v in outputs.items()]

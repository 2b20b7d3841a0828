"""An engine's accuracy against the eager fp32 reference, and the budget rule that decides when it fails.

The comparator knows no runtime: it calls the session protocol's `infer` and compares arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from kiln.core.errors import KilnError

if TYPE_CHECKING:  # the comparator knows the session protocol by name only
    from kiln.runtimes import Session


def accuracy_against_reference(session: Session, reference: Mapping[str, Any], chunk: int) -> dict[str, Any]:
    """The engine's outputs on the reference inputs against the eager fp32 outputs (and labels, when there
    are), judged the way the model's task says (kiln.accuracy.tasks)."""
    from kiln.accuracy.tasks import output_infos, resolve_task

    inputs, expected = reference["inputs"], reference["outputs"]
    samples = next(iter(inputs.values())).shape[0]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in expected}
    for start in range(0, samples, chunk):
        out = session.infer({k: v[start : start + chunk] for k, v in inputs.items()})
        for n in expected:
            parts[n].append(np.asarray(out[n], dtype=np.float32))
    got = {n: np.concatenate(v) for n, v in parts.items()}
    task, _ = resolve_task(reference.get("task") or "auto", output_infos(expected))
    result: dict[str, Any] = {"task": task.name, "samples": samples, "source": reference.get("source")}
    result.update(task.compare(expected, got))
    result.update(task.against_labels(expected, got, reference.get("labels")))
    result["agreement_metric"] = task.agreement_metric
    result["agreement"] = result.get(task.agreement_metric) if task.agreement_metric else result.get("cosine")
    # Every figure against a reference that proves nothing carries the reason, wherever it is shown.
    result["reference_degenerate"] = reference.get("degenerate")
    return result


def task_budget_keys(task: str | None) -> dict[str, tuple[str, Any]]:
    """The budget keys a task judges: its own and the element-wise ones (every task but detection measures them)."""
    from kiln.accuracy.tasks import ELEMENTWISE_BUDGET, task_classes

    cls = task_classes().get(task or "", None)
    return {**ELEMENTWISE_BUDGET, **(cls.budget_keys if cls else {})}


def check_budget_keys(budget: Mapping[str, Any], where: str = "accuracy_budget") -> None:
    from kiln.accuracy.tasks import all_budget_keys

    known = all_budget_keys()
    unknown = set(budget) - set(known)
    if unknown:
        raise KilnError(f"{where} has unknown keys {sorted(unknown)}; known: {', '.join(sorted(known))}")


def budget_limits(default_budget: Mapping[str, Any], target_budget: Mapping[str, Any], where: str = "accuracy_budget") -> dict[str, Any]:
    """A target's budget: its own keys over benchmark.accuracy_budget, checked."""
    limits = {**default_budget, **target_budget}
    check_budget_keys(limits, where)
    return limits


def budget_violations(accuracy: Mapping[str, Any], budget: Mapping[str, Any]) -> list[str]:
    """Each way `accuracy` is outside `budget`, as a readable line. Only the keys of the accuracy's task
    count (a detector has no top-1); metrics that were not measured are not judged."""
    check_budget_keys(budget)
    keys = task_budget_keys(accuracy.get("task") or "classification")
    out = []
    for key, limit in budget.items():
        if limit is None or key not in keys:
            continue
        metric, kind = keys[key]
        value = accuracy.get(metric)
        if value is None or isinstance(value, str):
            continue
        if (kind is min and value < limit) or (kind is max and value > limit):
            out.append(f"{metric} {value:.4g} {'<' if kind is min else '>'} {key} {limit:g}")
    return out


@dataclass(frozen=True)
class BudgetVerdict:
    limits: dict[str, Any]
    violations: list[str]
    enforced: bool
    why_not_enforced: str | None  # when there are violations that do not fail the stage
    rule: str = ""  # whether the weights count as trained, and why (ModelSpec.trained_weights)

    def to_dict(self) -> dict[str, Any]:
        return {
            "limits": self.limits,
            "violations": self.violations,
            "enforced": self.enforced,
            "why_not_enforced": self.why_not_enforced,
            "rule": self.rule,
        }


def judge_budget(
    accuracy: Mapping[str, Any],
    default_budget: Mapping[str, Any],
    target_budget: Mapping[str, Any],
    fail_on_budget: bool,
    trained: tuple[bool, str],
) -> BudgetVerdict:
    """The target's budget (its own keys over benchmark.accuracy_budget) applied to `accuracy`.

    It is enforced when benchmark.fail_on_budget is on and the model's weights are trained (`trained`:
    ModelSpec.trained_weights, which takes every model as trained but one built by name with neither
    checkpoint nor weights): a random-init network's scores sit too close together for agreement to mean
    anything, so its budget is reported, not enforced. `rule` says which rule applied."""
    limits = budget_limits(default_budget, target_budget)
    violations = budget_violations(accuracy, limits)
    is_trained, rule = trained
    enforced = fail_on_budget and is_trained
    why = None
    if violations and not enforced:
        why = "benchmark.fail_on_budget is false" if not fail_on_budget else rule
    return BudgetVerdict(limits, violations, enforced, why, rule)


def enforce_budget(verdict: BudgetVerdict, name: str, source: str, diagnosis: str | None = None) -> None:
    """Fail a target over an enforced budget, saying how to bring it back or to record it and go on
    (`diagnosis`: where the engine first departs from the fp32 graph, from kiln.diagnose.debug)."""
    if verdict.violations and verdict.enforced:
        raise KilnError(
            f"target '{name}' is over its accuracy budget on {source}: {'; '.join(verdict.violations)}. "
            + (f"{diagnosis}. " if diagnosis else "")
            + f"Keep sensitive layers in float (targets.{name}.calibration.ignored_scope; `kiln debug {name} --repair` "
            "finds the fewest), change the calibration, "
            "or relax targets.<name>.accuracy_budget / set benchmark.fail_on_budget: false to record it and go on"
        )

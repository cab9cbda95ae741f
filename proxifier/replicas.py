"""Replica names: a model's first replica is its own name (so everything a one-instance model
shows stays as it was), replica k >= 2 is `<model>#<k>`. The registry, the scheduler and the
views key instances by these names; this module turns them back into models. Pure.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from proxifier.config import ModelConfig
from proxifier.scheduler.scaling import Policy

SEPARATOR = "#"


def replica_name(model: str, index: int) -> str:
    """The name of the model's replica number `index` (1 is the model's own name)."""
    return model if index <= 1 else f"{model}{SEPARATOR}{index}"


def model_of(name: str, models: Collection[str]) -> str | None:
    """The configured model an instance name belongs to, or None (a model removed since).
    A configured name is itself, even one that contains the separator."""
    if name in models:
        return name
    model, separator, index = name.rpartition(SEPARATOR)
    if separator and index.isdigit() and int(index) >= 2 and model in models:
        return model
    return None


def index_of(name: str, model: str) -> int:
    """The replica number of an instance name of `model` (1 for the model's own name)."""
    return 1 if name == model else int(name.rpartition(SEPARATOR)[2])


def free_names(model: str, taken: Iterable[str], count: int) -> list[str]:
    """`count` replica names of the model not in `taken`, lowest numbers first."""
    used = set(taken)
    names: list[str] = []
    index = 1
    while len(names) < count:
        name = replica_name(model, index)
        if name not in used:
            names.append(name)
        index += 1
    return names


def instances_of(model: str, names: Iterable[str], models: Collection[str]) -> list[str]:
    """The instance names among `names` that belong to `model`, by replica number."""
    found = [n for n in names if model_of(n, models) == model]
    return sorted(found, key=lambda n: index_of(n, model))


def policy_of(model: ModelConfig, fixed: int | None = None) -> Policy:
    """The model's replica rule: `fixed` (a count set at runtime, `proxifier scale`), else
    `replicas: N` (min = max = N), else its autoscaling, else one on-demand instance. The
    target defaults to the model's `parallel`: a replica is full when its slots are."""
    if fixed is not None:
        return Policy(fixed, fixed, float(model.parallel))
    scaling = model.autoscaling
    if scaling is not None:
        return Policy(
            scaling.min_replicas,
            scaling.max_replicas,
            scaling.target_ongoing_requests or float(model.parallel),
            scaling.upscale_delay_s,
            scaling.downscale_delay_s,
        )
    if model.replicas is not None:
        return Policy(model.replicas, model.replicas, float(model.parallel))
    return Policy(0, 1, float(model.parallel))

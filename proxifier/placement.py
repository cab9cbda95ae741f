"""What a model's actor asks of Ray: actor options from its config and the resources it holds.
Where it runs is the scheduler's decision (`proxifier.scheduler`). Pure: no Ray."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxifier.config import ModelConfig


@dataclass(frozen=True)
class NodeView:
    """One node of the cluster as the placement message describes it."""

    node_id: str
    address: str
    alive: bool
    total: Mapping[str, float]
    available: Mapping[str, float]
    labels: Mapping[str, str] = field(default_factory=dict)
    manager_port: int = 0  # its raylet's port: a connection there tells the host answers


def resolve_num_gpus(model: ModelConfig, cluster_gpus: float) -> float:
    """`num_gpus` when set; else 1 when the model offloads layers and the cluster has GPUs."""
    if model.num_gpus is not None:
        return model.num_gpus
    return 1.0 if model.gpu_layers != 0 and cluster_gpus > 0 else 0.0


def cpu_fallback_warning(name: str, model: ModelConfig, cluster_gpus: float) -> str | None:
    """The seed's GPU examples run on a CPU-only cluster, with this warning."""
    if model.num_gpus is None and model.gpu_layers not in (None, 0) and cluster_gpus == 0:
        return (
            f"model '{name}' asks for gpu_layers {model.gpu_layers} but the cluster has no GPUs; "
            "it runs on the CPU"
        )
    return None


def actor_options(model: ModelConfig, cluster_gpus: float) -> dict[str, Any]:
    """Ray actor options that make the scheduler put the model on a node that can hold it."""
    options: dict[str, Any] = {
        "num_cpus": model.num_cpus,
        "num_gpus": resolve_num_gpus(model, cluster_gpus),
    }
    if model.memory:
        options["memory"] = model.memory
    if model.resources:
        options["resources"] = dict(model.resources)
    if model.labels:
        options["label_selector"] = dict(model.labels)
    return options


def demand(options: Mapping[str, Any]) -> dict[str, float]:
    """The resources an actor with these options holds, in Ray's resource names."""
    held: dict[str, float] = {}
    for option, resource in (("num_cpus", "CPU"), ("num_gpus", "GPU"), ("memory", "memory")):
        if options.get(option):
            held[resource] = float(options[option])
    held.update({k: float(v) for k, v in (options.get("resources") or {}).items() if v})
    return held

"""Where a model's actor may run: Ray actor options from its config, the resources it holds, and
the message for a model no node can take. Pure: cluster facts come in as plain data."""

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


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    for key, wanted in selector.items():
        value = labels.get(key)
        if wanted.startswith("!in(") and wanted.endswith(")"):
            if value in wanted[4:-1].split(","):
                return False
        elif wanted.startswith("in(") and wanted.endswith(")"):
            if value not in wanted[3:-1].split(","):
                return False
        elif wanted.startswith("!"):
            if value == wanted[1:]:
                return False
        elif value != wanted:
            return False
    return True


def could_ever_fit(options: Mapping[str, Any], nodes: list[NodeView]) -> bool:
    """Whether some alive node has the totals (not the free amounts) the model needs."""
    needs = demand(options)
    selector = options.get("label_selector") or {}
    return any(
        node.alive
        and _labels_match(selector, node.labels)
        and all(node.total.get(key, 0.0) >= amount for key, amount in needs.items())
        for node in nodes
    )


def _amounts(resources: Mapping[str, float]) -> str:
    shown = []
    for key in sorted(resources):
        if key.startswith("node:") or key.startswith("object_store"):
            continue
        amount = resources[key]
        if key == "memory":
            shown.append(f"memory {amount / 1024**3:.1f} GiB")
        else:
            shown.append(f"{key} {amount:g}")
    return ", ".join(shown) or "nothing"


def unplaceable_message(name: str, options: Mapping[str, Any], nodes: list[NodeView]) -> str:
    """Why a model cannot be placed: what it needs and what each node has (free of total)."""
    needs = demand(options)
    selector = options.get("label_selector")
    want = _amounts(needs) if needs else "no resources"
    if selector:
        want += " on a node labelled " + ", ".join(f"{k}={v}" for k, v in selector.items())
    reason = (
        "no node has that free" if could_ever_fit(options, nodes) else "no node has that at all"
    )
    lines = [f"model '{name}' cannot be placed: it needs {want}; {reason}. Cluster:"]
    for node in nodes:
        if not node.alive:
            continue
        labels = ", ".join(f"{k}={v}" for k, v in sorted(node.labels.items()) if "ray.io" not in k)
        lines.append(
            f"  node {node.address}: free {_amounts(node.available)} of "
            f"{_amounts(node.total)}" + (f"; labels {labels}" if labels else "")
        )
    return "\n".join(lines)

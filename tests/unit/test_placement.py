"""Actor options from a model's config, the resources it holds, and the unplaceable message."""

from __future__ import annotations

from proxifier.config import ModelConfig
from proxifier.placement import (
    NodeView,
    actor_options,
    could_ever_fit,
    cpu_fallback_warning,
    demand,
    resolve_num_gpus,
    unplaceable_message,
)


def test_num_gpus_default_depends_on_gpu_layers_and_the_cluster() -> None:
    assert resolve_num_gpus(ModelConfig(gpu_layers=-1), cluster_gpus=2) == 1
    assert resolve_num_gpus(ModelConfig(), cluster_gpus=2) == 1  # llama-server offloads by default
    assert resolve_num_gpus(ModelConfig(gpu_layers=0), cluster_gpus=2) == 0
    assert resolve_num_gpus(ModelConfig(gpu_layers=-1), cluster_gpus=0) == 0
    assert resolve_num_gpus(ModelConfig(num_gpus=2, gpu_layers=0), cluster_gpus=0) == 2


def test_gpu_model_on_a_cpu_cluster_warns() -> None:
    warning = cpu_fallback_warning("gpu-model-1", ModelConfig(gpu_layers=-1), cluster_gpus=0)
    assert warning == (
        "model 'gpu-model-1' asks for gpu_layers -1 but the cluster has no GPUs; it runs on the CPU"
    )
    assert cpu_fallback_warning("m", ModelConfig(gpu_layers=-1), cluster_gpus=1) is None
    assert cpu_fallback_warning("m", ModelConfig(gpu_layers=0), cluster_gpus=0) is None


def test_actor_options_carry_every_placement_field() -> None:
    model = ModelConfig(
        num_gpus=1,
        num_cpus=2,
        memory="8GiB",
        resources={"gpu_type:a100": 1},
        labels={"gpu-type": "in(a100,h100)"},
    )
    assert actor_options(model, cluster_gpus=4) == {
        "num_cpus": 2,
        "num_gpus": 1,
        "memory": 8 * 1024**3,
        "resources": {"gpu_type:a100": 1},
        "label_selector": {"gpu-type": "in(a100,h100)"},
    }
    assert actor_options(ModelConfig(), cluster_gpus=0) == {"num_cpus": 0, "num_gpus": 0.0}


def test_demand_in_ray_resource_names() -> None:
    options = actor_options(ModelConfig(num_gpus=1, resources={"gpu_type:a100": 1}), 2)
    assert demand(options) == {"GPU": 1.0, "gpu_type:a100": 1.0}


NODES = [
    NodeView(
        "n1",
        "10.0.0.1",
        True,
        {"CPU": 4, "GPU": 1, "gpu_type:a100": 1},
        {"CPU": 4, "GPU": 0, "gpu_type:a100": 0},
        {"gpu-type": "a100"},
    ),
    NodeView("n2", "10.0.0.2", True, {"CPU": 4}, {"CPU": 4}),
    NodeView("n3", "10.0.0.3", False, {"CPU": 4, "GPU": 8}, {"CPU": 4, "GPU": 8}),
]


def test_could_ever_fit_checks_totals_labels_and_liveness() -> None:
    assert could_ever_fit({"num_gpus": 1, "resources": {"gpu_type:a100": 1}}, NODES)
    assert not could_ever_fit({"num_gpus": 2}, NODES)  # only the dead node has 8
    assert could_ever_fit({"label_selector": {"gpu-type": "in(a100,h100)"}}, NODES)
    assert not could_ever_fit({"label_selector": {"gpu-type": "h100"}}, NODES)
    assert could_ever_fit({"label_selector": {"gpu-type": "!a100"}}, NODES)


def test_unplaceable_message_names_the_need_and_the_cluster() -> None:
    message = unplaceable_message("big", {"num_gpus": 1, "resources": {"gpu_type:a100": 1}}, NODES)
    assert message.splitlines() == [
        "model 'big' cannot be placed: it needs GPU 1, gpu_type:a100 1; "
        "no node has that free. Cluster:",
        "  node 10.0.0.1: free CPU 4, GPU 0, gpu_type:a100 0 of CPU 4, GPU 1, gpu_type:a100 1; "
        "labels gpu-type=a100",
        "  node 10.0.0.2: free CPU 4 of CPU 4",
    ]
    never = unplaceable_message("huge", {"num_gpus": 4}, NODES)
    assert "it needs GPU 4; no node has that at all" in never

"""Actor options from a model's config and the resources it holds."""

from __future__ import annotations

from proxifier.config import ModelConfig
from proxifier.placement import (
    actor_options,
    cpu_fallback_warning,
    demand,
    resolve_num_gpus,
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

"""Replica names (proxifier.replicas): the first replica is the model's own name, the others
`<model>#<k>`; a configured name is always itself."""

from __future__ import annotations

from proxifier.config import ModelConfig
from proxifier.planning import RunningModel, idle_stops
from proxifier.replicas import free_names, index_of, instances_of, model_of, policy_of, replica_name
from proxifier.scheduler import Policy

MODELS = {"chat", "odd#2", "docs"}


def test_names_and_their_models() -> None:
    assert replica_name("chat", 1) == "chat" and replica_name("chat", 3) == "chat#3"
    assert model_of("chat", MODELS) == "chat" and model_of("chat#3", MODELS) == "chat"
    assert index_of("chat#3", "chat") == 3 and index_of("chat", "chat") == 1
    assert model_of("gone#2", MODELS) is None and model_of("chat#1", MODELS) is None
    assert model_of("chat#x", MODELS) is None
    assert model_of("odd#2", MODELS) == "odd#2"  # a configured name is itself


def test_free_names_fill_the_lowest_numbers() -> None:
    assert free_names("chat", ["chat", "chat#3"], 2) == ["chat#2", "chat#4"]
    assert free_names("chat", [], 1) == ["chat"]


def test_instances_of_a_model_in_replica_order() -> None:
    names = ["chat#10", "docs", "chat", "chat#2", "gone#2"]
    assert instances_of("chat", names, MODELS) == ["chat", "chat#2", "chat#10"]


def test_the_policy_of_each_way_to_count() -> None:
    assert policy_of(ModelConfig(parallel=3)) == Policy(0, 1, 3.0)  # one, on demand
    assert policy_of(ModelConfig(replicas=2)) == Policy(2, 2, 4.0)
    scaling = {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 5}
    assert policy_of(ModelConfig(autoscaling=scaling)) == Policy(1, 4, 4.0, 5.0, 600.0)
    assert policy_of(ModelConfig(replicas=2), fixed=3) == Policy(3, 3, 4.0)  # set at runtime


def test_a_model_stops_for_idleness_only_when_every_replica_is_idle() -> None:
    def instance(name: str, idle_for: float) -> RunningModel:
        return RunningModel(name, 5, False, "ready", False, 0.0, idle_for, 60.0, model="chat")

    assert idle_stops([instance("chat", 100), instance("chat#2", 10)]) == []
    assert sorted(idle_stops([instance("chat", 100), instance("chat#2", 70)])) == [
        "chat",
        "chat#2",
    ]

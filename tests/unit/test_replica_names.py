"""Replica names (proxifier.replicas): the first replica is the model's own name, the others
`<model>#<k>`; a configured name is always itself."""

from __future__ import annotations

from proxifier.replicas import free_names, index_of, instances_of, model_of, replica_name

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

"""When a failure stops refusing its model (proxifier.scheduler.failures): a crash loop waits
out its cooldown; a model no node could hold is tried again as soon as a node joins."""

from __future__ import annotations

from proxifier.scheduler import Failure, in_force

COOLDOWN = 60.0
AT = 1000.0


def test_a_start_failure_refuses_for_its_whole_cooldown_whatever_the_nodes() -> None:
    crash = Failure(AT, "llama-server exited with code 1")
    assert in_force(crash, AT + 59, COOLDOWN, frozenset({"a", "b", "new"}))
    assert not in_force(crash, AT + 60, COOLDOWN, frozenset({"a"}))


def test_a_placement_failure_ends_when_a_node_it_did_not_have_joins() -> None:
    unplaceable = Failure(AT, "no alive node has label host=w1", frozenset({"head", "w2"}))
    # The same nodes, or fewer (a node left): nothing that could hold it now.
    assert in_force(unplaceable, AT + 1, COOLDOWN, frozenset({"head", "w2"}))
    assert in_force(unplaceable, AT + 1, COOLDOWN, frozenset({"head"}))
    # The lost host is back (under a new node id): the model may fit, so no more refusal.
    assert not in_force(unplaceable, AT + 1, COOLDOWN, frozenset({"head", "w2", "w1-again"}))
    # And the cooldown still bounds it when nothing joins.
    assert not in_force(unplaceable, AT + 60, COOLDOWN, frozenset({"head", "w2"}))

"""The scheduler's rules (DESIGN §3.1), one scenario each, and a plain reading of the rules that
the optimised pass must agree with on random clusters."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import pytest

from proxifier.scheduler import (
    Action,
    Evict,
    Fail,
    Limits,
    Node,
    Place,
    Resident,
    Wait,
    Want,
    decide,
    demand_order,
    fits,
    labels_match,
)

NOW = 1000.0
GiB = 1024**3


# --- builders ---------------------------------------------------------------------------------


def node(
    n: int,
    gpus: float = 1,
    cpus: float = 8,
    labels: Mapping[str, str] | None = None,
    alive: bool = True,
    **extra: float,
) -> Node:
    """Node `n<n>` at 10.0.0.<n>; free amounts come from the residents (see `run`)."""
    total = {"CPU": cpus, "GPU": gpus, **extra}
    return Node(f"n{n}", f"10.0.0.{n}", total, total, dict(labels or {}), alive)


def resident(
    name: str,
    on: int = 1,
    gpus: float = 1,
    priority: int = 5,
    *,
    holds: Mapping[str, float] | None = None,
    preload: bool = False,
    state: str = "ready",
    in_flight: int = 0,
    queued: int = 0,
    last_used: float = 0.0,
    ready_since: float | None = 0.0,
) -> Resident:
    """A model on node `n<on>`, ready since long ago (well past min_residency), idle."""
    return Resident(
        name=name,
        node_id=f"n{on}",
        holds=dict(holds) if holds is not None else {"GPU": gpus},
        priority=priority,
        preload=preload,
        state=state,
        in_flight=in_flight,
        queued=queued,
        last_used=last_used,
        ready_since=ready_since,
    )


def want(
    name: str,
    gpus: float = 1,
    priority: int = 5,
    *,
    needs: Mapping[str, float] | None = None,
    selector: Mapping[str, str] | None = None,
    since: float = 0.0,
) -> Want:
    return Want(
        name=name,
        needs=dict(needs) if needs is not None else {"GPU": gpus},
        selector=dict(selector or {}),
        priority=priority,
        since=since,
    )


def with_residents(nodes: Sequence[Node], residents: Sequence[Resident]) -> list[Node]:
    """The nodes with free = total less what the residents on them hold."""
    out = []
    for n in nodes:
        free = dict(n.total)
        for r in residents:
            if r.node_id == n.node_id:
                for key, amount in r.holds.items():
                    free[key] = free.get(key, 0.0) - amount
        out.append(Node(n.node_id, n.address, n.total, free, n.labels, n.alive))
    return out


def run(
    nodes: Sequence[Node],
    residents: Sequence[Resident],
    wants: Sequence[Want],
    limits: Limits | None = None,
    now: float = NOW,
) -> list[Action]:
    return decide(with_residents(nodes, residents), residents, wants, limits or Limits(), now)


def rev(mapping: Mapping) -> dict:
    """The same mapping in the reverse order: no decision may depend on dict order."""
    return dict(reversed(list(mapping.items())))


def only_wait(actions: list[Action]) -> str:
    assert len(actions) == 1 and isinstance(actions[0], Wait), actions
    return actions[0].reason


# --- helpers ----------------------------------------------------------------------------------


def test_fits_ignores_resources_not_needed() -> None:
    assert fits({"GPU": 1, "CPU": 0, "gpu_type:a100": 0}, {"GPU": 1})
    assert not fits({"GPU": 2}, {"GPU": 1, "CPU": 8})
    assert fits({"CPU": 0.3}, {"CPU": 0.1 + 0.2})  # float sums do not refuse a fit


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ({"gpu-type": "a100"}, {"gpu-type": "a100"}, True),
        ({"gpu-type": "a100"}, {"gpu-type": "h100"}, False),
        ({"gpu-type": "a100"}, {}, False),
        ({"gpu-type": "!a100"}, {"gpu-type": "a100"}, False),
        ({"gpu-type": "!a100"}, {}, True),
        ({"gpu-type": "in(a100,h100)"}, {"gpu-type": "h100"}, True),
        ({"gpu-type": "in(a100,h100)"}, {}, False),
        ({"gpu-type": "!in(a100,h100)"}, {"gpu-type": "l4"}, True),
        ({"gpu-type": "!in(a100,h100)"}, {"gpu-type": "a100"}, False),
        ({"gpu-type": "a100", "zone": "eu"}, {"gpu-type": "a100", "zone": "us"}, False),
        ({}, {"anything": "x"}, True),
    ],
)
def test_labels_match_follows_rays_selector_forms(
    selector: dict, labels: dict, matches: bool
) -> None:
    assert labels_match(selector, labels) is matches


def test_demand_order_is_priority_then_oldest_request_then_name() -> None:
    wants = [
        want("late", priority=5, since=30),
        want("b", priority=5, since=10),
        want("a", priority=5, since=10),
        want("high", priority=9, since=99),
    ]
    assert [w.name for w in demand_order(wants)] == ["high", "a", "b", "late"]


# --- placing ----------------------------------------------------------------------------------


def test_scheduler_places_on_the_node_where_it_fits() -> None:
    actions = run([node(1), node(2)], [resident("busy", on=1, in_flight=1)], [want("w")])
    assert actions == [Place("w", "n2")]


def test_scheduler_picks_best_fit_node() -> None:
    nodes = [node(1, gpus=8), node(2, gpus=4), node(3, gpus=4)]
    residents = [resident("other", on=3, gpus=2, priority=9)]
    # n3 is left with 0 GPUs after it, n2 with 2, n1 with 6: the big node stays free.
    assert run(nodes, residents, [want("w", gpus=2)]) == [Place("w", "n3")]


def test_scheduler_best_fit_ties_go_to_the_lower_node_id() -> None:
    nodes = [node(3, gpus=2), node(2, gpus=2), node(4, gpus=4)]
    assert run(nodes, [], [want("w")]) == [Place("w", "n2")]


def test_scheduler_best_fit_weighs_gpus_before_cpus() -> None:
    nodes = [node(1, gpus=1, cpus=64), node(2, gpus=2, cpus=8)]
    actions = run(nodes, [], [want("w", needs={"GPU": 1, "CPU": 4})])
    assert actions == [Place("w", "n1")]  # 0 GPUs left beats 1 GPU left, whatever the CPUs


def test_scheduler_places_a_model_that_needs_nothing_anywhere_it_matches() -> None:
    nodes = [node(1, labels={"role": "gpu"}), node(2, labels={"role": "cpu"})]
    assert run(nodes, [], [want("w", needs={}, selector={"role": "cpu"})]) == [Place("w", "n2")]


def test_scheduler_two_wants_never_get_the_same_free_gpu() -> None:
    actions = run([node(1)], [], [want("a", since=1), want("b", since=2)])
    assert actions[0] == Place("a", "n1")
    assert actions[1] == Wait("b", "waiting for GPU 1: starting: a")


def test_scheduler_label_selector_forms() -> None:
    nodes = [
        node(1, labels={"gpu-type": "a100"}),
        node(2, labels={"gpu-type": "h100"}),
        node(3, labels={"gpu-type": "l4"}),
        node(4),
    ]
    cases = {
        "a100": "n1",
        "!a100": "n2",
        "in(h100,l4)": "n2",
        "!in(a100,h100)": "n3",
        "in(l4)": "n3",
        "!in(a100,h100,l4)": "n4",
    }
    for wanted, expected in cases.items():
        actions = run(nodes, [], [want("w", selector={"gpu-type": wanted})])
        assert actions == [Place("w", expected)], wanted


# --- evicting ---------------------------------------------------------------------------------


def test_scheduler_evicts_idle_lower_priority_at_once() -> None:
    actions = run([node(1)], [resident("low", priority=2)], [want("w", priority=5)])
    assert actions == [Evict("low", "w", "priority"), Place("w", "n1")]


def test_scheduler_evicts_idle_equal_priority_after_min_residency() -> None:
    residents = [resident("peer", priority=5, ready_since=NOW - 10.0)]
    actions = run([node(1)], residents, [want("w", priority=5)], Limits(min_residency=10.0))
    assert actions == [Evict("peer", "w", "swap"), Place("w", "n1")]


def test_scheduler_does_not_swap_equal_priority_before_min_residency() -> None:
    residents = [resident("peer", priority=5, ready_since=NOW - 9.5)]
    actions = run([node(1)], residents, [want("w", priority=5)], Limits(min_residency=10.0))
    assert only_wait(actions) == (
        "waiting for GPU 1: ready for less than min_residency (10s): peer"
    )


def test_scheduler_never_evicts_higher_priority() -> None:
    actions = run([node(1)], [resident("high", priority=6)], [want("w", priority=5)])
    assert only_wait(actions) == "waiting for GPU 1: models of higher priority hold it (high)"


def test_scheduler_never_evicts_preloaded() -> None:
    actions = run([node(1)], [resident("pre", priority=1, preload=True)], [want("w", priority=9)])
    assert only_wait(actions) == "waiting for GPU 1: preloaded: pre"


def test_scheduler_never_evicts_busy_model_and_waits_for_it() -> None:
    busy = resident("low", on=2, priority=2, in_flight=1)
    actions = run([node(2)], [busy], [want("w", priority=5)])
    assert actions == [
        Wait(
            "w",
            "waiting for 'low' (priority 2, busy: 1 in flight, 0 queued) to finish on node "
            "10.0.0.2; it will be evicted as soon as it is idle",
        )
    ]
    # The next pass, once it is idle, evicts it at once (long before its idle timeout).
    idle = resident("low", on=2, priority=2, last_used=NOW - 0.1)
    assert run([node(2)], [idle], [want("w", priority=5)]) == [
        Evict("low", "w", "priority"),
        Place("w", "n2"),
    ]


def test_scheduler_waits_for_busy_models_together_with_idle_ones() -> None:
    residents = [
        resident("idle-low", priority=1),
        resident("busy-low", priority=2, queued=3),
    ]
    actions = run([node(1, gpus=2)], residents, [want("w", gpus=2, priority=5)])
    assert only_wait(actions) == (
        "waiting for 'busy-low' (priority 2, busy: 0 in flight, 3 queued) to finish on node "
        "10.0.0.1; it will be evicted as soon as it is idle"
    )


def test_scheduler_never_waits_on_busy_equal_priority_as_if_it_could_evict_it() -> None:
    actions = run([node(1)], [resident("peer", priority=5, in_flight=2)], [want("w", priority=5)])
    assert only_wait(actions) == "waiting for GPU 1: busy: peer"


def test_scheduler_busy_wait_keeps_the_node_for_the_waiting_model() -> None:
    # `high` waits for `low` on n1; `mid` would fit in n1's free GPU but must not take it, or
    # `high` would need another eviction once `low` is idle.
    residents = [resident("low", priority=1, in_flight=1)]
    wants = [want("high", gpus=2, priority=9), want("mid", gpus=1, priority=5)]
    assert run([node(1, gpus=2)], residents, wants) == [
        Wait(
            "high",
            "waiting for 'low' (priority 1, busy: 1 in flight, 0 queued) to finish on node "
            "10.0.0.1; it will be evicted as soon as it is idle",
        ),
        Wait("mid", "waiting for GPU 1: kept for waiting high"),
    ]


@pytest.mark.parametrize("state", ["starting", "restarting", "stopping"])
def test_scheduler_never_evicts_starting_model(state: str) -> None:
    residents = [resident("s", priority=1, state=state, ready_since=None)]
    actions = run([node(1)], residents, [want("w", priority=9)])
    kind = "stopping" if state == "stopping" else "starting"
    assert only_wait(actions) == f"waiting for GPU 1: {kind}: s"


def test_scheduler_evicts_lowest_priority_then_least_recently_used() -> None:
    residents = [
        resident("p3-old", priority=3, last_used=10),
        resident("p2-recent", priority=2, last_used=100),
        resident("p2-old", priority=2, last_used=50),
    ]
    actions = run([node(1, gpus=3)], residents, [want("w", gpus=2, priority=5)])
    assert actions == [
        Evict("p2-old", "w", "priority"),
        Evict("p2-recent", "w", "priority"),
        Place("w", "n1"),
    ]


def test_scheduler_evicts_lower_priority_before_equal_priority() -> None:
    residents = [
        resident("peer", priority=5, last_used=1),
        resident("low", priority=4, last_used=500),
    ]
    actions = run([node(1, gpus=2)], residents, [want("w", priority=5)])
    assert actions == [Evict("low", "w", "priority"), Place("w", "n1")]


def test_scheduler_victims_only_on_one_matching_node() -> None:
    nodes = [node(1, labels={"gpu-type": "a100"}), node(2, labels={"gpu-type": "h100"})]
    residents = [resident("high", on=1, priority=9), resident("low-h100", on=2, priority=1)]
    wants = [want("w", priority=5, selector={"gpu-type": "a100"})]
    assert only_wait(run(nodes, residents, wants)) == (
        "waiting for GPU 1 on a node labelled gpu-type=a100: "
        "models of higher priority hold it (high)"
    )
    # The same with a custom resource only n1 has.
    nodes = [node(1, **{"gpu_type:a100": 1}), node(2)]
    wants = [want("w", priority=5, needs={"GPU": 1, "gpu_type:a100": 1})]
    assert only_wait(run(nodes, residents, wants)) == (
        "waiting for GPU 1, gpu_type:a100 1: models of higher priority hold it (high)"
    )


def test_scheduler_victims_only_those_holding_needed_resources() -> None:
    residents = [
        resident("cpu-only", priority=1, holds={"CPU": 2}),
        resident("gpu-model", priority=4, holds={"GPU": 1, "CPU": 1}),
    ]
    actions = run([node(1, cpus=8)], residents, [want("w", needs={"GPU": 1, "CPU": 1})])
    assert actions == [Evict("gpu-model", "w", "priority"), Place("w", "n1")]


def test_scheduler_picks_cheapest_victim_set_across_nodes() -> None:
    nodes = [node(1, gpus=2), node(2, gpus=2), node(3, gpus=2)]
    residents = [
        resident("n1-p4", on=1, gpus=2, priority=4),  # one victim, but of priority 4
        resident("n2-a", on=2, priority=2),  # two victims of priority 2 at most
        resident("n2-b", on=2, priority=1),
        resident("n3-a", on=3, priority=2, last_used=5),  # also two of priority 2 ...
        resident("n3-b", on=3, priority=2, last_used=5),
    ]
    actions = run(nodes, residents, [want("w", gpus=2, priority=5)])
    # Lowest highest-priority first (n2 and n3 tie at 2), then fewest victims (tie), then the
    # oldest most recent use: n2's newest use is 0, n3's is 5.
    assert actions == [
        Evict("n2-b", "w", "priority"),
        Evict("n2-a", "w", "priority"),
        Place("w", "n2"),
    ]


def test_scheduler_prefers_fewer_victims_at_equal_priority() -> None:
    nodes = [node(1, gpus=2), node(2, gpus=2)]
    residents = [
        resident("one-a", on=1, priority=2),
        resident("one-b", on=1, priority=2),
        resident("two", on=2, gpus=2, priority=2, last_used=99),
    ]
    actions = run(nodes, residents, [want("w", gpus=2, priority=5)])
    assert actions == [Evict("two", "w", "priority"), Place("w", "n2")]


def test_scheduler_victim_set_ties_go_to_the_lower_node_id() -> None:
    nodes = [node(2), node(1)]
    residents = [resident("on2", on=2, priority=1), resident("on1", on=1, priority=1)]
    assert run(nodes, residents, [want("w")]) == [Evict("on1", "w", "priority"), Place("w", "n1")]


def test_scheduler_victim_not_evicted_twice_in_one_pass() -> None:
    residents = [resident("low", priority=1)]
    actions = run([node(1)], residents, [want("a", priority=9), want("b", priority=8)])
    assert actions == [
        Evict("low", "a", "priority"),
        Place("a", "n1"),
        Wait("b", "waiting for GPU 1: starting: a"),
    ]


def test_scheduler_stopped_and_failed_residents_are_free_victims() -> None:
    residents = [
        resident("failed", priority=5, state="failed", ready_since=NOW - 1),
        resident("old", on=2, priority=6, state="stopped", ready_since=None),
    ]
    actions = run([node(1), node(2)], residents, [want("w", priority=5)])
    assert actions == [Evict("failed", "w", "swap"), Place("w", "n1")]
    # Of higher priority, it is not stopped for the want (its actor is on its way out).
    actions = run([node(2)], residents[1:], [want("w", priority=5)])
    assert only_wait(actions) == "waiting for GPU 1: stopped or failed: old"


# --- demand order -----------------------------------------------------------------------------


def test_scheduler_demand_order_priority_then_oldest_request() -> None:
    wants = [
        want("p5-oldest", priority=5, since=1),
        want("p7-newer", priority=7, since=20),
        want("p7-older", priority=7, since=10),
    ]
    actions = run([node(1)], [], wants)
    assert actions == [
        Place("p7-older", "n1"),
        Wait("p7-newer", "waiting for GPU 1: starting: p7-older"),
        Wait("p5-oldest", "waiting for GPU 1: starting: p7-older"),
    ]


def test_scheduler_capacity_freed_goes_to_highest_priority_want() -> None:
    residents = [resident("low", priority=1)]
    wants = [want("p3", priority=3, since=1), want("p8", priority=8, since=50)]
    actions = run([node(1)], residents, wants)
    assert actions == [
        Evict("low", "p8", "priority"),
        Place("p8", "n1"),
        Wait("p3", "waiting for GPU 1: starting: p8"),
    ]


# --- max_running_models -----------------------------------------------------------------------


def test_scheduler_max_running_models_counts_placements_in_this_pass() -> None:
    residents = [resident("pinned", holds={}, preload=True)]
    wants = [want(f"w{i}", needs={}, since=i) for i in range(3)]
    actions = run([node(1)], residents, wants, Limits(max_running_models=2))
    reason = "max_running_models (2) reached; no running model can be stopped for it now"
    assert actions == [
        Place("w0", "n1"),
        Wait("w1", f"{reason} (1 starting, 1 preloaded)"),
        Wait("w2", f"{reason} (1 starting, 1 preloaded)"),
    ]


def test_scheduler_max_running_models_evicts_for_capacity() -> None:
    residents = [
        resident("busy", on=1, in_flight=1, priority=1),
        resident("idle-old", on=2, holds={"CPU": 1}, priority=4, last_used=1),
        resident("idle-low", on=2, holds={"CPU": 1}, priority=3, last_used=9),
    ]
    actions = run([node(1), node(2)], residents, [want("w")], Limits(max_running_models=3))
    # Any node, in victim order: lowest priority first. Its release frees n2's CPU, not a GPU;
    # the placement then goes where the model fits.
    assert actions == [Evict("idle-low", "w", "capacity"), Place("w", "n2")]


def test_scheduler_max_running_models_victims_for_room_count_as_freed_slots() -> None:
    residents = [resident("low", priority=1), resident("cpu", on=2, holds={"CPU": 1})]
    actions = run([node(1), node(2, gpus=0)], residents, [want("w")], Limits(max_running_models=2))
    assert actions == [Evict("low", "w", "priority"), Place("w", "n1")]


def test_scheduler_max_running_models_waits_when_nothing_evictable() -> None:
    residents = [
        resident("busy", in_flight=1, priority=1, holds={}),
        resident("pre", preload=True, holds={}),
        resident("high", priority=9, holds={}),
    ]
    actions = run([node(1)], residents, [want("w")], Limits(max_running_models=3))
    assert only_wait(actions) == (
        "max_running_models (3) reached; no running model can be stopped for it now "
        "(1 busy, 1 preloaded, 1 of higher priority)"
    )


def test_scheduler_max_running_models_over_the_limit_evicts_down_to_it() -> None:
    # After a reload lowered the limit: 3 running, limit 2; a start needs two slots.
    residents = [
        resident("a", holds={"CPU": 1}, priority=1),
        resident("b", holds={"CPU": 1}, priority=2),
        resident("c", holds={"CPU": 1}, priority=3),
    ]
    actions = run([node(1)], residents, [want("w")], Limits(max_running_models=2))
    assert actions == [
        Evict("a", "w", "capacity"),
        Evict("b", "w", "capacity"),
        Place("w", "n1"),
    ]


# --- fail or wait -----------------------------------------------------------------------------


def test_scheduler_fails_only_when_totals_can_never_fit() -> None:
    actions = run([node(1, gpus=2), node(2, gpus=1)], [], [want("w", gpus=4)])
    assert len(actions) == 1 and isinstance(actions[0], Fail)


def test_scheduler_waits_when_totals_fit_but_free_does_not() -> None:
    residents = [resident("high", gpus=2, priority=9)]
    actions = run([node(1, gpus=2), node(2, gpus=1)], residents, [want("w", gpus=2)])
    assert only_wait(actions) == "waiting for GPU 2: models of higher priority hold it (high)"


def test_scheduler_fail_message_lists_needs_and_nodes() -> None:
    nodes = [
        Node(
            "n1",
            "10.0.0.1",
            {"CPU": 8, "GPU": 1, "memory": 64 * GiB, "node:10.0.0.1": 1, "gpu_type:a100": 1},
            {"CPU": 6, "GPU": 0, "memory": 32 * GiB, "node:10.0.0.1": 1, "gpu_type:a100": 0},
            {"gpu-type": "a100", "ray.io/node-id": "abc"},
        ),
        Node("n2", "10.0.0.2", {"CPU": 4}, {"CPU": 4}),
        Node("n3", "10.0.0.3", {"CPU": 4, "GPU": 8}, {"CPU": 4, "GPU": 8}, alive=False),
    ]
    wants = [
        want(
            "big",
            needs={"GPU": 2, "gpu_type:a100": 1, "CPU": 0},
            selector={"gpu-type": "in(a100,h100)"},
        )
    ]
    assert decide(nodes, [], wants, Limits(), NOW) == [
        Fail(
            "big",
            "model 'big' cannot be placed: it needs GPU 2, gpu_type:a100 1 on a node labelled "
            "gpu-type=in(a100,h100); no node has that at all. Cluster:\n"
            "  node 10.0.0.1: free CPU 6, GPU 0, gpu_type:a100 0, memory 32.0 GiB of CPU 8, "
            "GPU 1, gpu_type:a100 1, memory 64.0 GiB; labels gpu-type=a100\n"
            "  node 10.0.0.2: free CPU 4 of CPU 4",
        )
    ]


def test_scheduler_ignores_dead_nodes() -> None:
    nodes = [node(1, gpus=4, alive=False), node(2)]
    residents = [resident("low-on-dead", on=1, priority=1), resident("high", on=2, priority=9)]
    actions = run(nodes, residents, [want("w", priority=5), want("big", gpus=4, since=1)])
    assert actions[0] == Wait("w", "waiting for GPU 1: models of higher priority hold it (high)")
    assert isinstance(actions[1], Fail) and "10.0.0.1" not in actions[1].reason


def test_scheduler_fails_with_no_alive_node() -> None:
    actions = decide([], [], [want("w", needs={})], Limits(), NOW)
    assert actions == [
        Fail(
            "w",
            "model 'w' cannot be placed: it needs no resources; no node has that at all. "
            "Cluster:\n  no alive node",
        )
    ]


def test_scheduler_wait_reason_when_no_model_holds_it() -> None:
    taken = Node("n1", "10.0.0.1", {"GPU": 1}, {"GPU": 0})  # held by something else
    actions = decide([taken], [], [want("w")], Limits(), NOW)
    assert only_wait(actions) == "waiting for GPU 1: not free on any node that has it"


def test_scheduler_wait_reason_lists_a_few_names_and_counts_the_rest() -> None:
    residents = [resident(f"h{i}", gpus=1, priority=9) for i in range(5)]
    actions = run([node(1, gpus=5)], residents, [want("w")])
    assert only_wait(actions) == (
        "waiting for GPU 1: models of higher priority hold it (h0, h1, h2 +2 more)"
    )


# --- robustness -------------------------------------------------------------------------------


def test_scheduler_skips_duplicate_wants_and_models_already_resident() -> None:
    actions = run(
        [node(1, gpus=2)],
        [resident("there", priority=9)],
        [want("there"), want("w", since=2), want("w", since=1)],
    )
    assert actions == [Place("w", "n1")]


def test_scheduler_is_deterministic() -> None:
    nodes = [node(i, gpus=2, labels={"gpu-type": "a100" if i % 2 else "h100"}) for i in range(6)]
    residents = [
        resident(f"r{i}", on=i % 6, priority=i % 4 + 1, last_used=i % 3, in_flight=i % 5 == 0)
        for i in range(10)
    ]
    wants = [
        want(f"w{i}", gpus=1 + i % 2, priority=i % 5 + 1, since=i % 2, selector={})
        for i in range(12)
    ]
    expected = run(nodes, residents, wants)
    rng = random.Random(7)
    for _ in range(5):
        shuffled = [
            Node(n.node_id, n.address, rev(n.total), rev(n.free), rev(n.labels), n.alive)
            for n in rng.sample(with_residents(nodes, residents), len(nodes))
        ]
        got = decide(
            shuffled,
            rng.sample(residents, len(residents)),
            [
                Want(w.name, rev(w.needs), rev(w.selector), w.priority, w.since)
                for w in rng.sample(wants, len(wants))
            ],
            Limits(),
            NOW,
        )
        assert got == expected


# --- the optimised pass against a plain reading of the rules ----------------------------------

_GONE = {"stopped", "failed"}
EPS = 1e-6


def reference(
    nodes: Sequence[Node],
    residents: Sequence[Resident],
    wants: Sequence[Want],
    limits: Limits,
    now: float,
) -> list[tuple]:
    """DESIGN §3.1 read literally: every want searches every node and every victim. Returns
    actions without Wait and Fail reasons (those are compared elsewhere)."""
    alive: dict[str, Node] = {}
    for n in sorted(nodes, key=lambda n: n.node_id):
        if n.alive:
            alive.setdefault(n.node_id, n)
    free = {nid: dict(n.free) for nid, n in alive.items()}
    pool: dict[str, Resident] = {}
    for r in sorted(residents, key=lambda r: r.name):
        pool.setdefault(r.name, r)
    gone: set[str] = set()
    running = len(pool)
    out: list[tuple] = []

    def busy(r: Resident) -> bool:
        return r.state not in _GONE and (r.in_flight > 0 or r.queued > 0)

    def eligible(r: Resident, p: int) -> bool:
        if r.priority < p:
            return True
        long_enough = r.ready_since is not None and now - r.ready_since >= limits.min_residency
        return r.priority == p and (r.state in _GONE or long_enough)

    def candidates() -> list[Resident]:
        return sorted(
            (
                r
                for r in pool.values()
                if r.name not in gone and not r.preload and (r.state == "ready" or r.state in _GONE)
            ),
            key=lambda r: (r.priority, r.last_used, r.name),
        )

    def on_node(nid: str, needs: dict, p: int, allow_busy: bool) -> list[Resident] | None:
        short = {k: a - free[nid].get(k, 0) for k, a in needs.items() if a > 0}
        short = {k: v for k, v in short.items() if v > EPS}
        if not short:
            return []
        taken = []
        for r in candidates():
            if r.node_id != nid:
                continue
            if r.priority > p:
                break
            if busy(r):
                if not (allow_busy and r.priority < p):
                    continue
            elif not eligible(r, p):
                continue
            held = {k: v for k, v in r.holds.items() if v > 0}
            if not any(k in held for k in short):
                continue
            taken.append(r)
            for k, v in held.items():
                if k in short:
                    short[k] -= v
                    if short[k] <= EPS:
                        del short[k]
            if not short:
                return taken
        return None

    def cost(taken: list[Resident], nid: str) -> tuple:
        return (max(r.priority for r in taken), len(taken), max(r.last_used for r in taken), nid)

    def scarce(k: str) -> tuple:
        return ({"GPU": 0, "CPU": 2, "memory": 3}.get(k, 1), k)

    def plan(w: Want, ever: list[str]) -> tuple:
        needs = {k: v for k, v in w.needs.items() if v > 0}
        order = sorted(needs, key=scarce)
        fitting = [
            (tuple(free[nid].get(k, 0) - needs[k] for k in order), nid)
            for nid in ever
            if all(free[nid].get(k, 0) - needs[k] >= -EPS for k in needs)
        ]
        if fitting:
            return ("place", min(fitting)[1], [])
        sets = []
        for nid in ever:
            taken = on_node(nid, needs, w.priority, False)
            if taken:
                sets.append((cost(taken, nid), taken))
        if sets:
            best = min(sets, key=lambda s: s[0])
            return ("place", best[0][3], best[1])
        blocked = []
        for nid in ever:
            taken = on_node(nid, needs, w.priority, True)
            if taken and any(busy(r) for r in taken):
                blocked.append(((sum(map(busy, taken)), *cost(taken, nid)), taken))
        if blocked:
            best = min(blocked, key=lambda s: s[0])
            return ("busy", best[0][4], best[1])
        return ("wait",)

    def over(leaving: int) -> bool:
        return limits.max_running_models > 0 and running - leaving + 1 > limits.max_running_models

    def capacity_victims(p: int, count: int, exclude: set[str]) -> list[Resident] | None:
        chosen = [
            r
            for r in candidates()
            if r.name not in exclude and not busy(r) and r.priority <= p and eligible(r, p)
        ][:count]
        return chosen if len(chosen) == count else None

    def evict(r: Resident, w: Want, reason: str) -> None:
        nonlocal running
        gone.add(r.name)
        running -= 1
        if r.node_id in free:
            for k, v in r.holds.items():
                if v > 0:
                    free[r.node_id][k] = free[r.node_id].get(k, 0) + v
        out.append(("evict", r.name, w.name, reason))

    seen: set[str] = set()
    for w in demand_order(wants):
        if w.name in seen or w.name in pool:
            continue
        seen.add(w.name)
        needs = {k: v for k, v in w.needs.items() if v > 0}
        ever = [
            nid
            for nid, n in alive.items()
            if labels_match(w.selector, n.labels)
            and all(n.total.get(k, 0) + EPS >= v for k, v in needs.items())
        ]
        if not ever:
            out.append(("fail", w.name))
            continue
        if over(0) and not capacity_victims(w.priority, 1, set()):
            out.append(("wait", w.name))
            continue
        decision = plan(w, ever)
        if decision[0] == "wait":
            out.append(("wait", w.name))
            continue
        if decision[0] == "busy":
            for r in decision[2]:
                gone.add(r.name)  # kept for w: out of reach for the rest of the pass
            for k, v in needs.items():
                have = free[decision[1]].get(k, 0)
                free[decision[1]][k] = have - min(max(have, 0), v)
            out.append(("wait", w.name))
            continue
        while over(len(decision[2])):
            missing = running - len(decision[2]) + 1 - limits.max_running_models
            extra = capacity_victims(w.priority, missing, {r.name for r in decision[2]})
            if extra is None:
                out.append(("wait", w.name))
                break
            for r in extra:
                evict(r, w, "capacity")
            decision = plan(w, ever)
        else:
            for r in decision[2]:
                evict(r, w, "priority" if r.priority < w.priority else "swap")
            for k, v in needs.items():
                free[decision[1]][k] = free[decision[1]].get(k, 0) - v
            running += 1
            out.append(("place", w.name, decision[1]))
    return out


def shape(actions: list[Action]) -> list[tuple]:
    out: list[tuple] = []
    for a in actions:
        if isinstance(a, Place):
            out.append(("place", a.model, a.node_id))
        elif isinstance(a, Evict):
            out.append(("evict", a.victim, a.for_model, a.reason))
        elif isinstance(a, Wait):
            out.append(("wait", a.model))
        else:
            out.append(("fail", a.model))
    return out


def random_case(
    rng: random.Random, size: int = 1
) -> tuple[list[Node], list[Resident], list[Want], Limits]:
    """A small random cluster; `size` multiplies its nodes, models and wants, and adds memory."""
    types = ["a100", "h100", None]
    top = 4 if size == 1 else 10  # priorities: few (many ties) in small cases
    nodes = []
    for i in range(rng.randint(1, 6 * size)):
        kind = rng.choice(types)
        total = {"CPU": rng.choice([4, 8]), "GPU": rng.choice([0, 1, 2, 2, 4])}
        if size > 1:
            total["memory"] = rng.choice([32, 64]) * GiB
        if kind == "a100" and rng.random() < 0.5:
            total["gpu_type:a100"] = total["GPU"]
        nodes.append(Node(f"n{i}", f"10.0.0.{i}", total, total, {"gpu-type": kind} if kind else {}))
        if rng.random() < 0.1:
            nodes[-1] = Node(f"n{i}", f"10.0.0.{i}", total, total, nodes[-1].labels, False)
    residents = []
    free = {n.node_id: dict(n.total) for n in nodes}
    for i in range(rng.randint(0, 10 * size)):
        n = rng.choice(nodes)
        holds = {"GPU": rng.choice([0, 1, 1, 2]), "CPU": rng.choice([0, 1, 2])}
        if size > 1:
            holds["memory"] = rng.randint(1, 24) * GiB
        if "gpu_type:a100" in n.total and rng.random() < 0.5:
            holds["gpu_type:a100"] = holds["GPU"]
        if not fits(holds, free[n.node_id]):
            continue
        for k, v in holds.items():
            free[n.node_id][k] -= v
        state = rng.choice(["ready"] * 6 + ["starting", "restarting", "stopping", "failed"])
        busy = rng.random() < 0.3
        residents.append(
            Resident(
                name=f"r{i}",
                node_id=n.node_id,
                holds=holds,
                priority=rng.randint(1, top),
                preload=rng.random() < 0.15,
                state=state,
                in_flight=rng.randint(1, 2) if busy else 0,
                queued=rng.randint(0, 2) if busy else 0,
                last_used=float(rng.randint(0, 3)) if size == 1 else rng.uniform(0, 100),
                ready_since=None if state == "starting" else NOW - rng.choice([5, 10, 15]),
            )
        )
    nodes = [Node(n.node_id, n.address, n.total, free[n.node_id], n.labels, n.alive) for n in nodes]
    wants = []
    for i in range(rng.randint(1, 10 * size)):
        needs = {"GPU": rng.choice([0, 1, 1, 2, 3]), "CPU": rng.choice([0, 1, 2])}
        if size > 1:
            needs["memory"] = rng.randint(1, 40) * GiB
        if rng.random() < 0.1:
            needs["gpu_type:a100"] = max(needs["GPU"], 1)
        selector = rng.choice(
            [{}, {}, {"gpu-type": "a100"}, {"gpu-type": "!a100"}, {"gpu-type": "in(a100,h100)"}]
        )
        wants.append(Want(f"w{i}", needs, selector, rng.randint(1, top), float(rng.randint(0, 3))))
    limit = rng.choice([0, 0, 0, 1, 2, 3, 5])
    return nodes, residents, wants, Limits(max_running_models=limit, min_residency=10.0)


@pytest.mark.parametrize(("size", "cases"), [(1, 3000), (4, 300), (12, 30)])
def test_scheduler_matches_a_plain_reading_of_the_rules(size: int, cases: int) -> None:
    rng = random.Random(11 + size)
    for case in range(cases):
        nodes, residents, wants, limits = random_case(rng, size)
        got = shape(decide(nodes, residents, wants, limits, NOW))
        assert got == reference(nodes, residents, wants, limits, NOW), case

"""The replica rules of the scheduler (DESIGN §13), one scenario each: the count from the load
and its delays, surplus replicas as first victims, scale-out never evicting equal priority,
spread over nodes then GPUs, draining replicas counted as leaving, max_running_models counting
every replica."""

from __future__ import annotations

from dataclasses import replace

from proxifier.scheduler import (
    Evict,
    Limits,
    Node,
    Place,
    Policy,
    Replica,
    Resident,
    Trend,
    Wait,
    Want,
    decide,
    desired_replicas,
    surplus,
    to_drain,
    to_move,
)
from tests.unit.test_scheduler import NOW, node, resident, run, want

GiB = 1024**3


def replica(name: str, model: str, on: int = 1, surplus: bool = False, **kw: object) -> Resident:
    return replace(resident(name, on, **kw), model=model, surplus=surplus)  # type: ignore[arg-type]


def scale_out(name: str, model: str, priority: int = 5, gpus: float = 1) -> Want:
    return replace(want(name, gpus, priority), model=model, scale_out=True)


def load(name: str, in_flight: int, queued: int = 0, state: str = "ready") -> Replica:
    return Replica(name, state, in_flight, queued, 0.0 if state == "ready" else None)


AUTO = Policy(min_replicas=1, max_replicas=4, target=2, upscale_delay=5, downscale_delay=120)


# --- the count ---------------------------------------------------------------------------------


def test_scale_out_waits_for_the_upscale_delay_then_jumps_to_the_load() -> None:
    busy = [load("chat", 2, 6)]  # 8 ongoing, target 2: 4 replicas' worth
    first = desired_replicas(AUTO, busy, 0, Trend(), NOW)
    assert first.desired == 1 and first.trend.over_since == NOW
    assert "4 wanted once it lasts 5 s" in first.reason
    later = desired_replicas(AUTO, busy, 0, first.trend, NOW + 4.9)
    assert later.desired == 1 and later.trend.over_since == NOW
    due = desired_replicas(AUTO, busy, 0, later.trend, NOW + 5)
    assert due.desired == 4 and due.trend == Trend()
    assert due.reason.startswith("scaled out")


def test_a_dip_restarts_the_upscale_delay() -> None:
    first = desired_replicas(AUTO, [load("chat", 2, 6)], 0, Trend(), NOW)
    dip = desired_replicas(AUTO, [load("chat", 2)], 0, first.trend, NOW + 3)
    assert dip.desired == 1 and dip.trend == Trend()
    again = desired_replicas(AUTO, [load("chat", 2, 6)], 0, dip.trend, NOW + 6)
    assert again.desired == 1 and again.trend.over_since == NOW + 6


def test_requests_waiting_for_a_placement_count_as_load() -> None:
    due = desired_replicas(AUTO, [load("chat", 2)], 4, Trend(over_since=NOW - 10), NOW)
    assert due.desired == 3


def test_scale_in_waits_for_the_downscale_delay_and_never_below_the_floor() -> None:
    idle = [load("chat", 0), load("chat#2", 0), load("chat#3", 1)]
    first = desired_replicas(AUTO, idle, 0, Trend(), NOW)
    assert first.desired == 3 and first.trend.under_since == NOW
    due = desired_replicas(AUTO, idle, 0, first.trend, NOW + 120)
    assert due.desired == 1 and due.reason.startswith("scaled in")


def test_below_the_floor_is_restored_at_once() -> None:
    fixed = Policy(min_replicas=3, max_replicas=3)
    restored = desired_replicas(fixed, [load("chat", 0), load("chat#2", 0)], 0, Trend(), NOW)
    assert restored.desired == 3 and "2 of at least 3" in restored.reason


def test_the_count_stays_within_max_replicas() -> None:
    flood = [load("a", 2, 50), load("b", 2, 50), load("c", 2, 50), load("d", 2, 50)]
    held = desired_replicas(AUTO, flood, 0, Trend(), NOW)
    assert held.desired == 4 and "at max_replicas (4)" in held.reason


def test_draining_replicas_are_counted_as_leaving() -> None:
    # Two replicas, one of them draining: only one counts, so the load asks for a second
    # (with a fixed count at once) rather than counting the leaving one as capacity.
    replicas = [load("chat", 2), load("chat#2", 1, state="draining")]
    fixed = Policy(min_replicas=2, max_replicas=2)
    assert desired_replicas(fixed, replicas, 0, Trend(), NOW).desired == 2
    assert "1 of at least 2" in desired_replicas(fixed, replicas, 0, Trend(), NOW).reason
    assert surplus(AUTO, replicas) == set()


def test_surplus_are_the_newest_above_the_floor() -> None:
    replicas = [
        Replica("chat#3", "ready", 0, 0, 50.0),
        Replica("chat", "ready", 0, 0, 10.0),
        Replica("chat#2", "starting", 0, 0, None),
    ]
    assert surplus(AUTO, replicas) == {"chat#3", "chat#2"}
    assert surplus(Policy(min_replicas=2, max_replicas=4), replicas) == {"chat#2"}
    assert surplus(Policy(), replicas[1:2]) == set()  # an on-demand model's one instance


def test_scale_in_drains_starting_then_the_least_busy_and_keeps_the_oldest() -> None:
    replicas = [
        Replica("chat", "ready", 3, 0, 10.0),
        Replica("chat#2", "ready", 1, 0, 20.0),
        Replica("chat#3", "ready", 1, 0, 30.0),
        Replica("chat#4", "starting", 0, 0, None),
    ]
    assert to_drain(replicas, 2) == ["chat#4", "chat#3"]
    assert to_drain(replicas, 9) == ["chat#4", "chat#3", "chat#2"]  # never the oldest


# --- placement --------------------------------------------------------------------------------


def test_a_surplus_replica_is_the_first_victim_of_an_equal_priority() -> None:
    # One GPU per node, both held: replica 2 of chat (surplus) goes before replica 1 of
    # another model of the same priority, in one decision.
    residents = [
        replica("chat", "chat", 1, last_used=900.0),
        replica("chat#2", "chat", 2, surplus=True, last_used=999.0),
        resident("other", 3, last_used=1.0),
    ]
    actions = run([node(1), node(2), node(3)], residents, [want("new")])
    assert actions == [Evict("chat#2", "new", "surplus"), Place("new", "n2")]


def test_a_priority_9_model_evicts_a_surplus_replica_before_a_lower_model() -> None:
    residents = [
        replica("chat", "chat", 1, priority=5),
        replica("chat#2", "chat", 2, surplus=True, priority=5, last_used=999.0),
        resident("batch", 3, priority=2, last_used=1.0),
    ]
    actions = run([node(1), node(2), node(3)], residents, [want("urgent", priority=9)])
    assert actions == [Evict("chat#2", "urgent", "surplus"), Place("urgent", "n2")]


def test_a_surplus_replica_of_a_higher_priority_is_no_victim() -> None:
    residents = [replica("chat#2", "chat", 1, surplus=True, priority=8)]
    actions = run([node(1)], residents, [want("low", priority=5)])
    assert len(actions) == 1 and isinstance(actions[0], Wait)


def test_a_busy_surplus_replica_is_never_evicted() -> None:
    residents = [replica("chat#2", "chat", 1, surplus=True, in_flight=1)]
    actions = run([node(1)], residents, [want("new", priority=9)])
    assert len(actions) == 1 and isinstance(actions[0], Wait)


def test_scale_out_never_swaps_out_an_equal_priority_model() -> None:
    residents = [replica("chat", "chat", 1, last_used=500.0), resident("peer", 2)]  # idle
    actions = run([node(1), node(2)], residents, [scale_out("chat#2", "chat")])
    assert len(actions) == 1 and isinstance(actions[0], Wait)
    # ...while a first instance of an equal priority would swap it out
    assert run([node(1), node(2)], residents, [want("third")])[0] == Evict("peer", "third", "swap")


def test_scale_out_evicts_a_lower_priority() -> None:
    residents = [replica("chat", "chat", 1), resident("batch", 2, priority=3)]
    actions = run([node(1), node(2)], residents, [scale_out("chat#2", "chat")])
    assert actions == [Evict("batch", "chat#2", "priority"), Place("chat#2", "n2")]


def test_scale_out_never_evicts_another_models_surplus_of_equal_priority() -> None:
    residents = [replica("chat", "chat", 1), replica("docs#2", "docs", 2, surplus=True)]
    actions = run([node(1), node(2)], residents, [scale_out("chat#2", "chat")])
    assert len(actions) == 1 and isinstance(actions[0], Wait)


def test_replicas_spread_over_nodes_before_sharing_one() -> None:
    # n1 has a free GPU beside replica 1 and is the best fit; the next replica still goes
    # to the emptier n2, a host loss never taking both.
    residents = [replica("chat", "chat", 1, gpus=1)]
    nodes = [node(1, gpus=2), node(2, gpus=4)]
    actions = run(nodes, residents, [scale_out("chat#2", "chat")])
    assert actions == [Place("chat#2", "n2")]
    # Without the model's replica there, n1 is the best fit.
    assert run(nodes, [resident("other", 1)], [want("x")]) == [Place("x", "n1")]


def test_replicas_share_a_node_when_no_other_fits() -> None:
    residents = [replica("chat", "chat", 1, gpus=1), resident("full", 2, gpus=1)]
    actions = run([node(1, gpus=2), node(2)], residents, [scale_out("chat#2", "chat")])
    assert actions == [Place("chat#2", "n1")]


def test_replicas_placed_in_one_pass_spread_too() -> None:
    wants = [
        replace(want("chat", since=1.0), model="chat"),
        scale_out("chat#2", "chat"),
        scale_out("chat#3", "chat"),
    ]
    actions = run([node(1, gpus=4), node(2, gpus=4), node(3, gpus=4)], [], wants)
    assert sorted(a.node_id for a in actions if isinstance(a, Place)) == ["n1", "n2", "n3"]


def _gpu_node(n: int, gpus: int) -> Node:
    total = {"CPU": 8.0, "GPU": float(gpus)}
    return Node(f"n{n}", f"10.0.0.{n}", total, dict(total), {}, True, 24 * GiB)


def _on_gpu(name: str, model: str, gpu: int, node_n: int = 1, fraction: float = 0.5) -> Resident:
    return Resident(
        name, f"n{node_n}", {"GPU": fraction}, 5, False, "ready", 0, 0, 0.0, 0.0,
        {gpu: fraction}, model,
    )  # fmt: skip


def _memory_scale_out(name: str, model: str, gib: float) -> Want:
    return Want(name, {"CPU": 0.0}, {}, 5, NOW, gib * GiB, model, True)


def _free(nodes: list[Node], residents: list[Resident]) -> list[Node]:
    out = []
    for n in nodes:
        free = dict(n.total)
        for r in residents:
            if r.node_id == n.node_id:
                free["GPU"] -= r.holds["GPU"]
        out.append(replace(n, free=free))
    return out


def test_by_memory_a_replica_goes_to_another_node_then_another_gpu() -> None:
    # Binpack would put a 12 GiB replica on the half-free GPU 0 of n1, beside replica 1.
    residents = [_on_gpu("chat", "chat", 0)]
    two_nodes = _free([_gpu_node(1, 2), _gpu_node(2, 1)], residents)
    [place] = decide(two_nodes, residents, [_memory_scale_out("chat#2", "chat", 12)], Limits(), NOW)
    assert isinstance(place, Place) and place.node_id == "n2"
    # One node: Ray puts a share on the GPU with the least room that holds it, so a GPU
    # apart from replica 1 is only had where replica 1's GPU has no room left for it.
    full = [_on_gpu("chat", "chat", 0, fraction=0.9)]
    one_node = _free([_gpu_node(1, 2)], full)
    [place] = decide(one_node, full, [_memory_scale_out("chat#2", "chat", 12)], Limits(), NOW)
    assert isinstance(place, Place) and place.node_id == "n1"


def test_max_running_models_counts_every_replica() -> None:
    residents = [replica("chat", "chat", 1), replica("chat#2", "chat", 2, surplus=True)]
    limits = Limits(max_running_models=2)
    actions = run([node(1, gpus=2), node(2, gpus=2)], residents, [want("new")], limits)
    # Room on both nodes, but two llama-server processes already run: a surplus replica goes.
    assert actions == [Evict("chat#2", "new", "capacity"), Place("new", "n1")] or actions == [
        Evict("chat#2", "new", "capacity"),
        Place("new", "n2"),
    ]


# --- requests waiting behind a full replica ------------------------------------------------------


def test_requests_waiting_behind_a_full_replica_move_to_a_new_ones_free_slots() -> None:
    # A burst queued at the first replica; the second is ready with both slots free.
    moves = to_move([load("chat", 2, queued=5), load("chat#2", 0)], slots=2)
    assert moves == {"chat": 2}


def test_moves_take_from_the_longest_queue_first_so_queues_even_out() -> None:
    replicas = [load("a", 2, queued=4), load("b", 2, queued=1), load("c", 0)]
    assert to_move(replicas, slots=3) == {"a": 3}


def test_no_move_without_a_ready_replica_with_room_and_nobody_waiting() -> None:
    assert to_move([load("a", 2, queued=3), load("b", 0, state="starting")], slots=2) == {}
    assert to_move([load("a", 2, queued=3), load("b", 1, queued=1)], slots=2) == {}
    assert to_move([load("a", 1), load("b", 0)], slots=2) == {}  # nobody waits

"""Placement by GPU memory (DESIGN §10): several models share one GPU through Ray's fractional
GPUs; eviction frees memory on one GPU; a model bigger than a GPU takes whole GPUs."""

from __future__ import annotations

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
    gpu_fraction,
)

NOW = 1000.0
GiB = 1024**3


def gpu_node(n: int, gpus: int = 1, size_gib: float = 24, free: float | None = None) -> Node:
    total = {"CPU": 8.0, "GPU": float(gpus)}
    free_amounts = {"CPU": 8.0, "GPU": float(gpus) if free is None else free}
    return Node(f"n{n}", f"10.0.0.{n}", total, free_amounts, {}, True, size_gib * GiB)


def on_gpu(
    name: str,
    fraction: float,
    gpu: int | None = 0,
    node: int = 1,
    priority: int = 5,
    busy: bool = False,
    preload: bool = False,
) -> Resident:
    """A ready, idle (unless `busy`) model holding `fraction` of GPU `gpu` (None: not reported
    yet) on node n<node>."""
    return Resident(
        name=name,
        node_id=f"n{node}",
        holds={"GPU": fraction},
        priority=priority,
        preload=preload,
        state="ready",
        in_flight=1 if busy else 0,
        queued=0,
        last_used=0.0,
        ready_since=0.0,
        gpus={gpu: fraction} if gpu is not None else {},
    )


def memory_want(name: str, gib: float, priority: int = 5) -> Want:
    return Want(name, {"CPU": 0.0}, {}, priority, NOW, gpu_memory=gib * GiB)


def run(
    nodes: Sequence[Node],
    residents: Sequence[Resident],
    wants: Sequence[Want],
    placement: str = "binpack",
) -> list[Action]:
    return decide(nodes, residents, wants, Limits(placement=placement), NOW)


def test_fractions() -> None:
    assert gpu_fraction(7 * GiB, 24 * GiB) == 0.3
    assert gpu_fraction(12 * GiB, 24 * GiB) == 0.5
    assert gpu_fraction(30 * GiB, 24 * GiB) == 2.0
    assert gpu_fraction(0, 24 * GiB) == 0.0


def test_three_7_gib_models_share_one_24_gib_gpu() -> None:
    node = gpu_node(1)
    residents: list[Resident] = []
    for name in ("a", "b", "c"):
        actions = run([node], residents, [memory_want(name, 7)])
        assert actions == [Place(name, "n1", 0.3)]
        residents.append(on_gpu(name, 0.3))
    # A fourth of lower priority does not fit beside them (0.1 left): it waits.
    (waiting,) = run([node], residents, [memory_want("d", 7, priority=4)])
    assert isinstance(waiting, Wait) and "7.0 GiB of GPU memory" in waiting.reason


def test_a_bigger_model_of_higher_priority_evicts_the_idle_lowest_on_that_gpu() -> None:
    node = gpu_node(1, gpus=2)
    residents = [
        on_gpu("low-old", 0.3, priority=2),
        on_gpu("low", 0.3, priority=3),
        on_gpu("mid", 0.3, priority=4),
        on_gpu("big", 0.84, gpu=1, priority=9),  # the other GPU: higher priority, kept
    ]
    actions = run([node], residents, [memory_want("new", 12, priority=8)])
    assert actions == [
        Evict("low-old", "new", "priority"),
        Evict("low", "new", "priority"),
        Place("new", "n1", 0.5),
    ]


def test_eviction_never_stops_a_model_on_another_gpu_for_nothing() -> None:
    # GPU 0 has 0.4 free; the cheap victim sits on GPU 1, where stopping it frees 0.3 beside
    # 0.6 taken by a busy model: 0.4 either way, not the 0.5 a 12 GiB model needs.
    node = gpu_node(1, gpus=2)
    residents = [
        on_gpu("cheap", 0.3, gpu=1, priority=1),
        on_gpu("busy", 0.6, gpu=1, priority=2, busy=True),
        on_gpu("kept", 0.6, gpu=0, priority=9),
    ]
    (action,) = run([node], residents, [memory_want("new", 12, priority=5)])
    assert isinstance(action, Wait)


def test_a_model_bigger_than_a_gpu_takes_whole_gpus() -> None:
    actions = run([gpu_node(1, gpus=4)], [on_gpu("small", 0.3, gpu=0)], [memory_want("huge", 30)])
    assert actions == [Place("huge", "n1", 2.0)]


def test_a_model_bigger_than_any_node_fails_with_its_need_and_each_gpus_free_memory() -> None:
    nodes = [gpu_node(1, gpus=1), gpu_node(2, gpus=1, size_gib=16)]
    residents = [on_gpu("small", 0.25, gpu=0, node=1)]
    (failed,) = run(nodes, residents, [memory_want("huge", 30)])
    assert isinstance(failed, Fail)
    assert failed.reason.startswith(
        "model 'huge' cannot be placed: it needs 30.0 GiB of GPU memory; no node has that."
    )
    assert "node 10.0.0.1: 1 GPU(s) of 24.0 GiB, free 18.0 GiB" in failed.reason
    assert "node 10.0.0.2: 1 GPU(s) of 16.0 GiB, free 16.0 GiB" in failed.reason


def test_on_a_node_of_unknown_gpu_size_a_model_takes_a_whole_gpu() -> None:
    unknown = Node("n1", "10.0.0.1", {"GPU": 1.0}, {"GPU": 1.0}, {}, True)
    assert run([unknown], [], [memory_want("m", 7)]) == [Place("m", "n1", 1.0)]
    # Beside a full node of known size, the unknown one still serves.
    full = gpu_node(2)
    residents = [on_gpu("big", 0.9, node=2, priority=9)]
    assert run([full, unknown], residents, [memory_want("m", 7)]) == [Place("m", "n1", 1.0)]
    (failed,) = run([unknown], [on_gpu("x", 1.0, priority=9)], [memory_want("m", 7)])
    assert isinstance(failed, Wait)
    two = Node("n1", "10.0.0.1", {"GPU": 1.0}, {"GPU": 1.0}, {}, True)
    (failed,) = run(
        [two],
        [],
        [
            memory_want("huge", 30),
        ],
    )
    assert failed == Place("huge", "n1", 1.0)  # of unknown size: it may be big enough


@pytest.mark.parametrize(("placement", "chosen"), [("binpack", "n1"), ("spread", "n2")])
def test_binpack_fills_the_fullest_gpu_spread_the_emptiest(placement: str, chosen: str) -> None:
    nodes = [gpu_node(1), gpu_node(2)]
    residents = [on_gpu("half", 0.5, node=1), on_gpu("tenth", 0.1, node=2)]
    (placed,) = run(nodes, residents, [memory_want("m", 7)], placement)
    assert placed == Place("m", chosen, 0.3)


def test_one_pass_packs_several_wants_without_overcommitting_a_gpu() -> None:
    wants = [memory_want(f"m{i}", 7) for i in range(4)]
    actions = run([gpu_node(1, gpus=2)], [], wants)
    placed = [a for a in actions if isinstance(a, Place)]
    assert len(placed) == 4 and all(a.gpus == 0.3 for a in placed)  # 3 on one GPU, 1 on the other
    actions = run([gpu_node(1, gpus=1)], [], wants)
    assert sum(isinstance(a, Place) for a in actions) == 3
    assert isinstance(actions[-1], Wait)


def test_residents_not_reported_yet_are_assumed_where_ray_first_fits_them() -> None:
    # Two unreported 0.6 models: Ray's first fit puts one on each GPU; a 0.5 want fits nowhere.
    node = gpu_node(1, gpus=2)
    residents = [
        on_gpu("x", 0.6, gpu=None, priority=9),
        on_gpu("y", 0.6, gpu=None, priority=9),
    ]
    (action,) = run([node], residents, [memory_want("m", 12)])
    assert isinstance(action, Wait)


def test_a_whole_gpu_want_and_memory_residents_share_the_accounting() -> None:
    # A memory model holds 0.3 of GPU 0; an explicit num_gpus 1 model gets GPU 1, and the
    # next memory want fits beside the first on GPU 0, not on the whole-GPU model's card.
    node = gpu_node(1, gpus=2)
    whole = Want("whole", {"GPU": 1.0}, {}, 5, NOW)
    actions = run([node], [on_gpu("a", 0.3)], [whole, memory_want("b", 7, priority=4)])
    assert actions == [Place("whole", "n1"), Place("b", "n1", 0.3)]


def placements(actions: Sequence[Action]) -> Mapping[str, str]:
    return {a.model: a.node_id for a in actions if isinstance(a, Place)}


def test_preloaded_and_busy_models_are_never_victims() -> None:
    node = gpu_node(1)
    residents = [
        on_gpu("pre", 0.5, priority=1, preload=True),
        on_gpu("busy", 0.4, priority=1, busy=True),
    ]
    (action,) = run([node], residents, [memory_want("m", 7, priority=10)])
    assert isinstance(action, Wait) and not placements([action])


def ray_places(table: list[float], share: float) -> bool:
    """Ray's own choice for a share: the GPU with the least room that holds it (whole GPUs:
    the first all-free ones). False when it cannot place it (the actor would sit pending)."""
    if share < 1:
        room = [(free, gpu) for gpu, free in enumerate(table) if free + 1e-6 >= share]
        if not room:
            return False
        table[min(room)[1]] -= share
        return True
    empty = [gpu for gpu, free in enumerate(table) if free >= 1 - 1e-6][: int(share)]
    for gpu in empty:
        table[gpu] = 0.0
    return len(empty) == int(share)


@pytest.mark.parametrize("placement", ["binpack", "spread"])
def test_every_placement_of_a_pass_is_one_ray_can_make(placement: str) -> None:
    node = gpu_node(1, gpus=2, size_gib=80, free=1.75)
    wants = [memory_want(f"m{gib}", gib, priority=9 - i) for i, gib in enumerate((10, 20, 50, 30))]
    actions = run([node], [on_gpu("old", 0.25, priority=10)], wants, placement)
    table = [0.75, 1.0]
    placed = [a for a in actions if isinstance(a, Place)]
    assert placed and all(a.gpus is not None and ray_places(table, a.gpus) for a in placed)


def test_a_whole_gpu_want_is_never_placed_where_only_shares_of_gpus_are_free() -> None:
    # GPU 0: an idle 0.5 and a busy 0.25; GPU 1: a busy 0.5. Free in all: 0.75 + 0.5, but no
    # whole GPU can be had: nothing is evicted for nothing, and it waits.
    node = gpu_node(1, gpus=2, free=0.75)
    residents = [
        on_gpu("idle", 0.5, gpu=0, priority=3),
        on_gpu("busy0", 0.25, gpu=0, priority=3, busy=True),
        on_gpu("busy1", 0.5, gpu=1, priority=3, busy=True),
    ]
    whole = Want("whole", {"GPU": 1.0}, {}, 9, NOW)
    (action,) = run([node], residents, [whole])
    assert isinstance(action, Wait)


def test_gpus_ray_counts_as_taken_by_other_work_are_not_used() -> None:
    # Ray says the node's GPU is taken (by a workload that is not ours): no placement on it.
    taken = gpu_node(1, free=0.0)
    (action,) = run([taken], [], [memory_want("m", 7)])
    assert isinstance(action, Wait)

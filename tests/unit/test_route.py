"""The replica router (serve_app.route): power of two choices over the replicas' last known
load; a replica that is leaving or not ready is never chosen while a ready one has room."""

from __future__ import annotations

import random
from collections import Counter

from serve_app.route import ReplicaView, choose, route


def view(name: str, in_use: int = 0, queued: int = 0, state: str = "ready") -> ReplicaView:
    return ReplicaView(handle=f"handle-{name}", name=name, state=state, in_use=in_use,
                       queued=queued, parallel=2)  # fmt: skip


def test_none_known_asks_the_controller() -> None:
    assert route(()) is None
    assert route((view("a", state="draining"), view("b", state="stopping"))) is None


def test_one_replica_is_chosen_whatever_its_load() -> None:
    assert route((view("a", 2, 9),)) == "handle-a"


def test_of_two_drawn_the_less_loaded_wins() -> None:
    replicas = (view("busy", 2, 3), view("free", 0))
    assert all(choose(replicas, random.Random(seed)).name == "free" for seed in range(20))


def test_a_ready_replica_with_room_beats_starting_and_draining_ones() -> None:
    replicas = (view("new", state="starting"), view("old", 1), view("leaving", state="draining"))
    assert {choose(replicas, random.Random(seed)).name for seed in range(30)} == {"old"}


def test_with_every_ready_one_full_a_request_may_wait_in_a_starting_one() -> None:
    replicas = (view("full", 2, 4), view("loading", state="starting"))
    picks = {choose(replicas, random.Random(seed)).name for seed in range(30)}
    assert picks == {"loading"}  # its queue is empty: less loaded than the full one
    assert choose((view("x", state="draining"), view("y", 2, 1)), random.Random(1)).name == "y"


def test_load_spreads_over_equal_replicas_without_a_herd() -> None:
    rng = random.Random(7)
    replicas = tuple(view(f"r{i}") for i in range(4))
    picks = Counter(choose(replicas, rng).name for _ in range(4000))
    assert set(picks) == {"r0", "r1", "r2", "r3"}
    assert min(picks.values()) > 700  # equal loads: every replica gets its share


def test_the_least_loaded_replica_is_chosen_far_more_than_the_most_loaded() -> None:
    rng = random.Random(3)
    replicas = (view("idle"), view("mid", 1), view("more", 1, 1), view("full", 2, 2))
    picks = Counter(choose(replicas, rng).name for _ in range(3000))
    assert picks["idle"] > picks["mid"] > picks["more"]
    assert "full" not in picks  # no free slot while others have one

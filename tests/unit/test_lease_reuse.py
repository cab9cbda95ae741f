"""ModelLeases: when a replica may hold a finished lease, hand it to its next request, or must
give it back (proxifier.lease_reuse)."""

from __future__ import annotations

from typing import Any

from proxifier.lease_reuse import ModelLeases, releases

ACTOR, OTHER_ACTOR = object(), object()


def finish(
    leases: ModelLeases,
    lease_id: str,
    *,
    now: float,
    granted_at: float | None = None,
    handle: Any = ACTOR,
    served: int = 1,
    from_queue: bool = False,
    clean: bool = True,
) -> tuple[bool, list[str]]:
    held, to_release = leases.finish(
        handle,
        {"lease_id": lease_id},
        granted_at=now if granted_at is None else granted_at,
        served=served,
        now=now,
        from_queue=from_queue,
        clean=clean,
    )
    return held, [entry.lease["lease_id"] for entry in to_release]


def test_a_clean_finish_is_held_and_the_next_request_takes_it_over() -> None:
    leases = ModelLeases(hold=0.01)
    assert finish(leases, "L", now=1.0, served=3) == (True, [])
    taken = leases.take_over(ACTOR, now=1.005)
    assert taken is not None and taken.lease["lease_id"] == "L" and taken.served == 3
    assert leases.take_over(ACTOR, now=1.005) is None  # one request per lease at a time


def test_the_newest_held_lease_is_taken_first() -> None:
    leases = ModelLeases(hold=1.0)
    finish(leases, "old", now=1.0)
    finish(leases, "new", now=1.1)
    taken = leases.take_over(ACTOR, now=1.2)
    assert taken is not None and taken.lease["lease_id"] == "new"


def test_a_lease_granted_from_the_queue_goes_back_at_once() -> None:
    leases = ModelLeases(hold=1.0)
    assert finish(leases, "L", now=1.0, from_queue=True) == (False, ["L"])
    assert leases.held == []


def test_nothing_is_held_while_our_request_waits_nor_shortly_after() -> None:
    leases = ModelLeases(hold=1.0, contention_hold=2.0)
    finish(leases, "held-before", now=0.5)
    # Joining the queue gives back what was held: another request may be waiting for it.
    assert [e.lease["lease_id"] for e in leases.joined_queue(now=1.0)] == ["held-before"]
    assert finish(leases, "during-wait", now=10.0) == (False, ["during-wait"])
    leases.left_queue(now=20.0)
    assert finish(leases, "just-after", now=21.9) == (False, ["just-after"])
    assert leases.take_over(ACTOR, now=21.9) is None
    assert finish(leases, "later", now=22.1) == (True, [])
    assert leases.take_over(ACTOR, now=22.2) is not None


def test_hold_zero_gives_every_lease_back_at_once() -> None:
    leases = ModelLeases(hold=0.0)
    assert finish(leases, "L", now=1.0) == (False, ["L"])


def test_an_unclean_finish_is_held_only_to_ride_back() -> None:
    # The client went away or llama-server failed mid-answer: the slot may be unusable, so
    # no request takes it over; it still rides back with the next enqueue.
    leases = ModelLeases(hold=1.0)
    assert finish(leases, "L", now=1.0, clean=False) == (True, [])
    assert leases.take_over(ACTOR, now=1.1) is None
    assert [lease_id for lease_id, _ in releases(leases.take_all(ACTOR))] == ["L"]


def test_a_lease_goes_back_to_the_fifo_after_max_reuse_age() -> None:
    leases = ModelLeases(hold=1.0, max_reuse_age=0.25)
    assert finish(leases, "young", now=1.2, granted_at=1.0) == (True, [])
    assert leases.take_over(ACTOR, now=1.3) is None  # 0.3 s since its grant
    assert finish(leases, "old", now=2.0, granted_at=1.0) == (True, [])
    assert [e.lease["lease_id"] for e in leases.take_all(ACTOR)] == ["young", "old"]


def test_leases_of_an_actor_the_model_left_go_back_at_once() -> None:
    leases = ModelLeases(hold=1.0)
    finish(leases, "from-old-actor", now=1.0, handle=OTHER_ACTOR)
    assert finish(leases, "from-new-actor", now=1.1) == (True, ["from-old-actor"])
    assert leases.take_over(OTHER_ACTOR, now=1.2) is None


def test_take_all_is_per_actor_and_due_is_per_lease() -> None:
    leases = ModelLeases(hold=0.5)
    finish(leases, "a", now=1.0)
    finish(leases, "b", now=1.3)
    assert leases.next_due() == 1.5
    assert [e.lease["lease_id"] for e in leases.due(now=1.6)] == ["a"]
    assert leases.next_due() == 1.8
    assert leases.take_all(OTHER_ACTOR) == []
    assert [e.lease["lease_id"] for e in leases.take_all(ACTOR)] == ["b"]
    assert leases.next_due() is None


def test_releases_carry_how_many_requests_each_lease_served() -> None:
    leases = ModelLeases(hold=1.0)
    finish(leases, "a", now=1.0, served=4)
    assert releases(leases.take_all(ACTOR)) == [("a", 4)]


def test_a_request_waits_in_the_replicas_line_only_when_one_of_ours_will_free_a_slot() -> None:
    leases = ModelLeases(hold=0.05)
    assert not leases.may_wait_locally(in_line=0)  # nothing known: ask the actor
    leases.saturated = True
    assert not leases.may_wait_locally(in_line=0)  # full, but none of the slots is ours
    leases.in_use.add("a")
    assert leases.may_wait_locally(in_line=0)  # ours will finish and hand its slot over
    leases.saturated = False
    assert not leases.may_wait_locally(in_line=0)  # a slot may be free at the actor: ask
    assert leases.may_wait_locally(in_line=2)  # others are already in line: behind them
    leases.in_use.clear()
    leases.waiting = 1
    # Ours queued at the actor but none running (a model still starting): the slots that
    # free come from the actor, so ask it.
    assert not leases.may_wait_locally(in_line=0)
    leases.in_use.add("b")
    assert leases.may_wait_locally(in_line=0)  # behind ours that wait at the actor
    leases.hold = 0
    assert not leases.may_wait_locally(in_line=2)  # lease_hold 0: every slot goes back


def test_a_finished_lease_goes_to_the_line_only_while_young_clean_and_none_of_ours_queues() -> None:
    leases = ModelLeases(hold=0.05, max_reuse_age=1.0)
    assert leases.hands_over(granted_at=10.0, now=10.5, clean=True, in_line=1)
    assert not leases.hands_over(granted_at=10.0, now=10.5, clean=True, in_line=0)
    assert not leases.hands_over(granted_at=10.0, now=11.0, clean=True, in_line=1)  # too old
    assert not leases.hands_over(granted_at=10.0, now=10.5, clean=False, in_line=1)
    leases.waiting = 1  # ours queued at the actor first: it gets the slot there
    assert not leases.hands_over(granted_at=10.0, now=10.5, clean=True, in_line=1)
    leases.waiting, leases.hold = 0, 0
    assert not leases.hands_over(granted_at=10.0, now=10.5, clean=True, in_line=1)

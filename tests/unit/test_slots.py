"""SlotQueue: every outcome of a request for a slot, FIFO grants, expiry, clearing, reaping."""

from __future__ import annotations

import pytest

from proxifier.errors import LeaseError
from proxifier.slots import Outcome, SlotQueue

FAR = 1e9


def opened(slots: int = 2, max_queue: int = 3) -> SlotQueue:
    queue = SlotQueue(slots, max_queue)
    queue.open(instance=1, now=0.0)
    return queue


def test_granted_at_once_when_open_with_a_free_slot() -> None:
    queue = opened()
    outcome, lease = queue.request("a", now=1.0, deadline=FAR)
    assert outcome is Outcome.GRANTED and lease is not None
    assert (lease.request_id, lease.instance, lease.granted_at) == ("a", 1, 1.0)
    assert queue.free_slots() == 1 and queue.busy


def test_queued_while_closed_then_granted_in_order_on_open() -> None:
    queue = SlotQueue(2, 5)
    for name in "abc":
        assert queue.request(name, 0.0, FAR) == (Outcome.QUEUED, None)
    assert [queue.position(n) for n in "abc"] == [1, 2, 3]
    granted = queue.open(instance=7, now=1.0)
    assert [lease.request_id for lease in granted] == ["a", "b"]
    assert queue.position("c") == 1


def test_queued_when_all_slots_are_busy() -> None:
    queue = opened(slots=1)
    queue.request("a", 0.0, FAR)
    assert queue.request("b", 0.0, FAR) == (Outcome.QUEUED, None)


def test_a_newcomer_never_jumps_the_queue() -> None:
    queue = SlotQueue(1, 5)
    queue.request("early", 0.0, FAR)
    queue.open(instance=1, now=0.0)  # "early" holds the slot
    queue.request("waiting", 0.0, FAR)
    (lease,) = [lease for lease in queue.leases.values()]
    assert queue.release(lease.lease_id, 1.0)[0].request_id == "waiting"
    # A free slot with someone queued goes to the queue, not to the newcomer.
    assert queue.request("newcomer", 1.0, FAR) == (Outcome.QUEUED, None)


def test_full_when_the_queue_is_at_its_bound() -> None:
    queue = opened(slots=1, max_queue=2)
    queue.request("a", 0.0, FAR)
    queue.request("b", 0.0, FAR)
    queue.request("c", 0.0, FAR)
    assert queue.request("d", 0.0, FAR) == (Outcome.FULL, None)
    assert len(queue.waiters) == 2


def test_release_grants_the_oldest_waiter() -> None:
    queue = opened(slots=1)
    _, lease = queue.request("a", 0.0, FAR)
    queue.request("b", 0.0, FAR)
    queue.request("c", 0.0, FAR)
    assert lease is not None
    granted = queue.release(lease.lease_id, now=5.0)
    assert [g.request_id for g in granted] == ["b"]
    assert queue.served == 1 and queue.last_release == 5.0


def test_a_lease_passed_from_request_to_request_counts_every_request() -> None:
    queue = opened(slots=1)
    _, lease = queue.request("a", 0.0, FAR)
    assert lease is not None
    queue.release(lease.lease_id, now=1.0, served=7)
    assert (queue.served, queue.granted) == (7, 1)


def test_grants_are_numbered_in_order() -> None:
    queue = SlotQueue(1, 10)
    for index in range(5):
        queue.request(f"r{index}", 0.0, FAR)
    order = []
    (first,) = queue.open(1, 0.0)
    current = first
    while current is not None:
        order.append((current.request_id, current.seq))
        granted = queue.release(current.lease_id, 1.0)
        current = granted[0] if granted else None
    assert order == [(f"r{i}", i) for i in range(5)]


def test_releasing_a_lease_never_granted_is_a_loud_bug() -> None:
    queue = opened()
    with pytest.raises(LeaseError, match="never granted"):
        queue.release("nope", 0.0)


def test_a_request_id_cannot_wait_twice() -> None:
    queue = SlotQueue(1, 5)
    queue.request("a", 0.0, FAR)
    with pytest.raises(LeaseError, match="already holds or awaits"):
        queue.request("a", 0.0, FAR)


def test_close_voids_leases_and_keeps_waiters() -> None:
    queue = opened(slots=1)
    _, lease = queue.request("a", 0.0, FAR)
    queue.request("b", 0.0, FAR)
    assert lease is not None
    assert [v.request_id for v in queue.close()] == ["a"]
    assert not queue.is_open and list(queue.waiters) == ["b"]
    # The holder of a voided lease may still release it: a no-op, not a bug.
    assert queue.release(lease.lease_id, 1.0) == []
    assert [g.request_id for g in queue.open(2, 2.0)] == ["b"]


def test_expire_takes_out_only_waiters_past_their_deadline() -> None:
    queue = SlotQueue(1, 5)
    queue.request("soon", 0.0, deadline=10.0)
    queue.request("later", 0.0, deadline=20.0)
    assert queue.expire(now=9.9) == []
    assert [w.request_id for w in queue.expire(now=10.0)] == ["soon"]
    assert list(queue.waiters) == ["later"]


def test_clear_and_cancel() -> None:
    queue = SlotQueue(1, 5)
    for name in "abc":
        queue.request(name, 0.0, FAR)
    assert queue.cancel("b") is not None and queue.cancel("b") is None
    assert [w.request_id for w in queue.clear()] == ["a", "c"]
    assert not queue.busy


def test_reap_reclaims_leases_whose_holder_vanished() -> None:
    queue = opened(slots=1)
    _, lease = queue.request("lost", 0.0, FAR)
    queue.request("next", 0.0, FAR)
    assert queue.reap(now=50.0, max_lease_time=60.0) == ([], [])
    reclaimed, granted = queue.reap(now=61.0, max_lease_time=60.0)
    assert [r.request_id for r in reclaimed] == ["lost"]
    assert [g.request_id for g in granted] == ["next"]
    assert lease is not None and queue.release(lease.lease_id, 62.0) == []


def test_a_renewed_lease_lives_as_long_as_its_holder_renews_it() -> None:
    queue = opened(slots=1)
    _, lease = queue.request("stream", 0.0, FAR, holder="replica-a")
    assert lease is not None and lease.holder == "replica-a"
    for now in range(5, 3600, 5):  # a stream of an hour, renewed every 5 s
        assert queue.renew("replica-a", [lease.lease_id], float(now)) == []
        assert queue.reap(float(now) + 1, max_lease_time=60.0, lease_ttl=6.0) == ([], [])
    assert lease.lease_id in queue.leases


def test_a_lease_nobody_renews_goes_back_after_lease_ttl_to_the_next_waiter() -> None:
    queue = opened(slots=1)
    _, lost = queue.request("lost", 0.0, FAR, holder="replica-a")
    queue.request("next", 1.0, FAR, holder="replica-b")
    assert queue.reap(now=5.9, max_lease_time=3600.0, lease_ttl=6.0) == ([], [])
    reclaimed, granted = queue.reap(now=6.1, max_lease_time=3600.0, lease_ttl=6.0)
    assert [r.request_id for r in reclaimed] == ["lost"]
    assert [(g.request_id, g.holder) for g in granted] == [("next", "replica-b")]
    assert lost is not None and queue.release(lost.lease_id, 7.0) == []  # late release: no-op


def test_renewal_counts_only_the_holders_own_leases_and_names_the_unknown() -> None:
    queue = opened(slots=2)
    _, mine = queue.request("mine", 0.0, FAR, holder="a")
    _, theirs = queue.request("theirs", 0.0, FAR, holder="b")
    assert mine is not None and theirs is not None
    unknown = queue.renew("a", [mine.lease_id, theirs.lease_id, "gone"], 5.0)
    assert unknown == [theirs.lease_id, "gone"]
    reclaimed, _ = queue.reap(now=7.0, max_lease_time=3600.0, lease_ttl=6.0)
    assert [r.request_id for r in reclaimed] == ["theirs"]  # a's renewal did not keep b's


def test_leases_without_a_holder_only_expire_after_max_lease_time() -> None:
    queue = opened(slots=1)
    queue.request("job", 0.0, FAR)  # the model actor's own (a respond-async job)
    assert queue.reap(now=100.0, max_lease_time=3600.0, lease_ttl=6.0) == ([], [])
    assert [r.request_id for r in queue.reap(3601.0, 3600.0, 6.0)[0]] == ["job"]


def test_idle_clock_runs_from_the_last_release_never_while_busy() -> None:
    queue = SlotQueue(1, 5)
    assert queue.idle_for(100.0) == 0.0  # closed
    queue.open(1, now=10.0)
    assert queue.idle_for(15.0) == 5.0  # idle since it opened
    _, lease = queue.request("long", 20.0, FAR)
    assert queue.idle_for(500.0) == 0.0  # a long generation is never idle
    assert lease is not None
    queue.release(lease.lease_id, now=600.0)
    assert queue.idle_for(630.0) == 30.0


def test_oldest_wait() -> None:
    queue = SlotQueue(1, 5)
    assert queue.oldest_wait(5.0) == 0.0
    queue.request("a", 2.0, FAR)
    queue.request("b", 4.0, FAR)
    assert queue.oldest_wait(5.0) == 3.0


def test_a_request_id_holding_a_lease_cannot_ask_again_until_released() -> None:
    queue = opened()
    _, lease = queue.request("a", 0.0, FAR)
    with pytest.raises(LeaseError):
        queue.request("a", 0.0, FAR)
    assert lease is not None
    queue.release(lease.lease_id, 1.0)
    assert queue.request("a", 2.0, FAR)[0] is Outcome.GRANTED

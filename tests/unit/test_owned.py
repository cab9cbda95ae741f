"""A request's slots and queue place (serve_app.backend.Owned): whatever is left when the request
ends goes back exactly once, and a slot or place that arrives after it ended goes straight back
(the client left while the actor's answer was on its way)."""

from __future__ import annotations

from serve_app.call import Owned


def test_what_is_left_goes_back_once_when_the_request_ends() -> None:
    owned, log = Owned(), []

    def release(lease_id: str) -> None:
        if owned.drop(lease_id):  # what Proxy._release does first
            log.append(lease_id)

    owned.add("a", object(), lambda: release("a"))
    owned.add("b", object(), lambda: release("b"))
    release("a")  # the normal end of the answer
    owned.close()  # the guard, when the request ends
    owned.close()
    assert log == ["a", "b"]


def test_a_slot_that_arrives_after_the_request_ended_goes_straight_back() -> None:
    owned, log = Owned(), []
    owned.close()

    def release() -> None:
        if owned.drop("late"):
            log.append("late")

    owned.add("late", object(), release)
    assert log == ["late"] and owned.leases == {}


def test_a_queue_place_is_left_when_the_request_ends_before_its_wait() -> None:
    owned, log = Owned(), []
    owned.queued("req_1", lambda: log.append("left req_1"))
    owned.queued("req_2", lambda: log.append("left req_2"))
    owned.left("req_2")  # its wait ended normally: nothing to leave
    owned.close()
    assert log == ["left req_1"]
    owned.queued("req_3", lambda: log.append("left req_3"))  # arrives after the end
    assert log == ["left req_1", "left req_3"]

"""The model state machine, the restart budget and the readiness poll schedule."""

from __future__ import annotations

import itertools

import pytest

from proxifier.lifecycle import (
    InvalidTransition,
    ModelState,
    RestartBudget,
    check_transition,
    health_poll_delays,
    serve_apps_gone,
    start_phases,
)

S = ModelState


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.STOPPED, S.STARTING),
        (S.STARTING, S.READY),
        (S.STARTING, S.FAILED),
        (S.STARTING, S.STOPPING),
        (S.READY, S.STOPPING),
        (S.READY, S.RESTARTING),
        (S.RESTARTING, S.STARTING),
        (S.RESTARTING, S.FAILED),
        (S.STOPPING, S.STOPPED),
        (S.FAILED, S.STARTING),
        (S.FAILED, S.STOPPING),
    ],
)
def test_allowed_transitions(old: ModelState, new: ModelState) -> None:
    assert check_transition(old, new) is new


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.STOPPED, S.READY),
        (S.READY, S.STARTING),
        (S.STOPPING, S.STARTING),
        (S.READY, S.FAILED),
        (S.STOPPED, S.STOPPING),
    ],
)
def test_forbidden_transitions_fail_loudly(old: ModelState, new: ModelState) -> None:
    with pytest.raises(InvalidTransition):
        check_transition(old, new)


def test_restart_delays_double_then_the_budget_is_spent() -> None:
    budget = RestartBudget(max_restarts=3, window=300.0)
    assert [budget.on_crash(t) for t in (0.0, 10.0, 20.0)] == [1.0, 2.0, 4.0]
    assert budget.on_crash(30.0) is None


def test_old_crashes_leave_the_window() -> None:
    budget = RestartBudget(max_restarts=3, window=300.0)
    for t in (0.0, 10.0, 20.0):
        budget.on_crash(t)
    # Five minutes after the first crash, it no longer counts.
    assert budget.on_crash(300.0) == 4.0
    assert budget.on_crash(305.0) is None


def test_zero_restarts_fails_at_the_first_crash() -> None:
    assert RestartBudget(max_restarts=0).on_crash(0.0) is None


def test_health_polls_start_every_20_ms_and_back_off_to_half_a_second() -> None:
    delays = list(itertools.islice(health_poll_delays(), 40))
    assert delays[0] == 0.02
    # A model that loads in 0.1 s is seen ready within ~20% of that: no wait over 25 ms yet.
    assert sum(delays[:4]) > 0.1 and max(delays[:4]) < 0.035
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert delays[-1] == 0.5  # a long load is polled every half second


def test_a_start_reports_each_phase_it_went_through() -> None:
    first = {"wanted": 100.0, "placed": 100.01, "actor": 100.05}
    assert start_phases(first, spawned=100.07, ready=100.2) == {
        "decide": 0.01,
        "actor": 0.04,
        "prepare": 0.02,
        "load": 0.13,
    }
    # A restart of a running actor is only its own preparation and load.
    assert start_phases({"actor": 5.0}, spawned=5.5, ready=7.0) == {"prepare": 0.5, "load": 1.5}


def test_the_models_go_when_every_serve_application_using_them_is_deleted() -> None:
    watched = {"proxifier"}
    assert serve_apps_gone(watched, None)  # serve shutdown: Serve itself is gone
    assert serve_apps_gone(watched, {"other": "RUNNING"})  # serve delete proxifier
    assert serve_apps_gone(watched, {"proxifier": "DELETING"})
    assert not serve_apps_gone(watched, {"proxifier": "RUNNING"})
    assert not serve_apps_gone(watched, {"proxifier": "DEPLOYING"})  # a redeploy
    assert not serve_apps_gone({"a", "b"}, {"b": "RUNNING"})
    assert not serve_apps_gone(set(), None)  # no ingress ever used it (tests, `proxifier serve`)

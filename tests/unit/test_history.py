"""The hosts harness's history checker (tests/multihost/history.py): each invariant it keeps
is broken once here, and said in words."""

from __future__ import annotations

from tests.multihost.history import FAIL, INFO, OK, Op, Window, check, error_code, outcomes

TEXT = "hello world"


def op(id: int, outcome: str | None, model: str = "m", **fields: object) -> Op:
    made = Op(id, model, stream=True, invoked=10.0 + id, completed=11.0 + id, outcome=outcome)
    for key, value in fields.items():
        setattr(made, key, value)
    return made


def test_a_clean_history_breaks_nothing() -> None:
    history = [op(1, OK, text=TEXT), op(2, FAIL, status=503, code="model_failed")]
    assert check(history, lambda _: TEXT) == []
    assert outcomes(history) == {"fail:model_failed": 1, "ok": 1}


def test_each_broken_invariant_is_named() -> None:
    history = [
        op(1, OK, text=TEXT),
        op(1, OK, text=TEXT),  # recorded twice
        op(2, None),  # no outcome
        op(3, OK, text="hello"),  # a cut answer passed as whole
        op(4, FAIL, status=500, note="Internal Server Error"),  # not OpenAI-shaped
        op(5, INFO, note="no answer within 30 s"),  # no fault anywhere near it
    ]
    problems = check(history, lambda _: TEXT)
    assert problems[0] == "request 1 recorded 2 times"
    assert [p.split(" (")[0] for p in problems[1:]] == [
        "request 2",
        "request 3",
        "request 4",
        "request 5",
    ]
    assert "no outcome" in problems[1] and "wrong content" in problems[2]
    assert "no OpenAI-shaped error" in problems[3] and "outside any fault" in problems[4]


def test_an_info_is_allowed_only_for_a_faulted_model_in_flight_during_the_fault() -> None:
    lost = op(5, INFO, model="on-the-lost-host")  # in flight from 15 to 16
    window = Window(frozenset({"on-the-lost-host"}), start=15.5, end=20.0)
    assert check([lost], lambda _: TEXT, [window]) == []
    assert check([lost], lambda _: TEXT, [Window(frozenset({"other"}), 15.5, 20.0)])
    assert check([lost], lambda _: TEXT, [Window(window.models, start=17.0, end=20.0)])
    assert check([lost], lambda _: TEXT, [Window(window.models, start=15.5)]) == []


def test_error_code_reads_openai_shaped_errors_only() -> None:
    shaped = {"error": {"message": "m", "type": "t", "code": "queue_full"}}
    assert error_code(shaped) == "queue_full"
    assert error_code({"error": {"message": "m", "type": "server_error"}}) == "server_error"
    assert error_code({"detail": "Not Found"}) is None
    assert error_code({"error": "text"}) is None

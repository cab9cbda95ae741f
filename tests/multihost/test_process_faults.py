"""A process dies or hangs on a healthy host, under load: a llama-server killed mid-stream, a
model actor killed with its llama-server running, a llama-server stopped (SIGSTOP: it neither
answers nor exits, which only the model actor's liveness probe notices). Every stream that was
cut is told why (an OpenAI-shaped error, never a silent cut or a hang), the model is served
again by a fresh instance, the model on the other host never notices, and afterwards no
llama-server runs that no live model owns."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.multihost.cluster import ProductOnHosts, dump
from tests.multihost.history import FAIL, OK, Background, Op, check, outcomes
from tests.multihost.workload import ask

MODELS: dict[str, dict[str, Any]] = {
    # Streams of 8 tokens, 50 ms apart: most requests are mid-stream at any moment; one that
    # stops for 5 s mid-way is cut (the product's default is 60 s: a test need not wait it).
    "slow-w1": {
        "num_gpus": 0,
        "labels": {"host": "w1"},
        "env": {"FAKE_LLAMA_TOKEN_DELAY": "0.05"},
        "upstream_idle_timeout": 5,
    },
    "steady-w2": {"num_gpus": 0, "labels": {"host": "w2"}},
    # Takes 5 s to load: long enough to lose the controller in the middle.
    "slow-load": {"num_gpus": 0, "labels": {"host": "w2"}, "env": {"FAKE_LLAMA_LOAD_DELAY": "5"}},
}
LOADED = ["slow-w1", "steady-w2"]  # the models under load


def in_flight_at(history: list[Op], moment: float, model: str) -> list[Op]:
    return [
        op
        for op in history
        if op.model == model and op.invoked < moment and (op.completed or moment + 1) > moment
    ]


def kill_under_load(product: ProductOnHosts, what: str) -> None:
    """SIGKILL `what` ("pid": the llama-server, "actor_pid": its model actor) of slow-w1 on
    w1 while clients stream from both models; then check the history and the quiet state."""
    with product.client(timeout=60) as http:
        warm = {model: ask(http, model) for model in LOADED}
        assert {m: a.status_code for m, a in warm.items()} == dict.fromkeys(LOADED, 200)
        expected = warm["steady-w2"].json()["choices"][0]["message"]["content"]
        before = product.models(http)["slow-w1"]
        assert before["pid"] in product.llama_servers()["w1"]
        with Background(product.async_client, LOADED, clients=6) as load:
            product.wait_until("the load runs", lambda: len(load.history) > 12, 30)
            killed = time.monotonic()
            os.kill(before[what], signal.SIGKILL)
            back = product.wait_until(
                "slow-w1 is served by a fresh llama-server",
                lambda: (
                    ask(http, "slow-w1").is_success
                    and product.models(http)["slow-w1"]["pid"] not in (None, before["pid"])
                ),
                60,
            )
            product.wait_until("the load goes on", lambda: len(load.history) > 60, 60)
        history = load.history
        product.assert_quiet(http, LOADED)

    numbers = {"killed": what, "back_s": round(back, 1), "outcomes": outcomes(history)}
    dump(product.net.root / f"numbers-{what}.json", numbers)
    dump(product.net.root / f"history-{what}.json", [vars(op) for op in history])
    print(f"{what} killed: {numbers}")
    # No fault between hosts here: no request may go unanswered, and every cut is explained.
    assert check(history, lambda op: expected) == []
    cut = in_flight_at(history, killed, "slow-w1")
    assert cut, "the kill should have caught requests in flight"
    assert all(op.outcome in (OK, FAIL) for op in cut)
    assert all(op.outcome == OK for op in history if op.model == "steady-w2")


def test_a_llama_server_killed_mid_stream(product: ProductOnHosts) -> None:
    kill_under_load(product, "pid")


def test_a_model_actor_killed_with_its_llama_server_running(product: ProductOnHosts) -> None:
    kill_under_load(product, "actor_pid")


def test_a_hung_llama_server_is_found_by_its_liveness_probe_and_replaced(
    product: ProductOnHosts,
) -> None:
    """With the product's default probe (10 s, 5 s, 3 misses) the hung instance is killed
    within about 35 s; its requests in flight end with an error, and the model answers again
    from a fresh instance. Clients wait up to 90 s: longer than the probe, so none has to give
    up (before the probe, every request to it waited for upstream_timeout, 600 s)."""
    with product.client(timeout=60) as http:
        warm = {model: ask(http, model) for model in LOADED}
        expected = warm["steady-w2"].json()["choices"][0]["message"]["content"]
        hung = product.models(http)["slow-w1"]["pid"]
        with Background(product.async_client, LOADED, clients=6, deadline=90) as load:
            product.wait_until("the load runs", lambda: len(load.history) > 12, 30)
            stopped = time.monotonic()
            os.kill(hung, signal.SIGSTOP)
            try:
                back = product.wait_until(
                    "slow-w1 is served by a fresh llama-server",
                    lambda: (
                        product.models(http)["slow-w1"]["pid"] not in (None, hung)
                        and ask(http, "slow-w1").is_success
                    ),
                    90,
                )
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(hung, signal.SIGCONT)  # if it still exists, let it be killed
            count = len(load.history)
            product.wait_until("the load goes on", lambda: len(load.history) > count + 30, 60)
        history = load.history
        assert "did not answer /health 3 times" in product.models(http)["slow-w1"]["last_error"]
        product.assert_quiet(http, LOADED)
    print(f"hung llama-server: back in {back:.1f} s, {outcomes(history)}")
    assert check(history, lambda op: expected) == []
    cut = in_flight_at(history, stopped, "slow-w1")
    assert cut and all(op.outcome in (OK, FAIL) for op in cut)
    # A stream the stop caught mid-way ends after upstream_idle_timeout, before the probe.
    assert any(op.stream and op.code == "upstream_timeout" for op in cut), outcomes(cut)
    assert all(op.outcome == OK for op in history if op.model == "steady-w2")


def test_the_controller_killed_while_a_model_loads_loads_it_once(product: ProductOnHosts) -> None:
    """Ray restarts the controller, which adopts the loading model's actor: the request that
    started the load is answered from that one llama-server, never a second one."""
    with product.client(timeout=60) as http:
        controllers = product.net.processes(product.head, "ray::Controller")
        assert len(controllers) == 1, controllers
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(ask, http, "slow-load")  # starts the load
            product.wait_until(
                "slow-load loads",
                lambda: product.models(http)["slow-load"]["state"] == "starting",
                30,
            )
            loading = product.llama_servers()["w2"]
            os.kill(controllers[0], signal.SIGKILL)
            answer = first.result(timeout=120)
        assert answer.status_code == 200, answer.text
        restarted = product.net.processes(product.head, "ray::Controller")
        assert restarted and restarted != controllers
        status = product.models(http)["slow-load"]
        assert status["instance"] == 1 and status["pid"] in loading, status
        product.assert_quiet(http, [*LOADED, "slow-load"])

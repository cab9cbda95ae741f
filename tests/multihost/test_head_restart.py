"""The head's GCS server dies and comes back, with GCS fault tolerance backed by a real Redis
(on a host of its own; the head started with RAY_REDIS_ADDRESS, as Ray documents it). During
the outage the model already running keeps answering, a start and a cluster view fail fast with
a 503 that says the control plane is away (never a hang), and after the GCS returns the stopped
model starts and nothing runs twice. Then the whole head is lost for good: clients get errors
at once, never a hang, and once the workers' Ray gives up on the GCS no llama-server is left."""

from __future__ import annotations

import time
from typing import Any

from tests.multihost.cluster import ProductOnHosts, dump
from tests.multihost.history import OK, Background, check, outcomes
from tests.multihost.workload import ask

STORE = "store"
MODELS: dict[str, dict[str, Any]] = {
    "ready-w1": {"num_gpus": 0, "labels": {"host": "w1"}},
    "cold-w2": {"num_gpus": 0, "labels": {"host": "w2"}},
}
# How long a raylet, a driver or a worker waits for a GCS that went away before it exits (Ray's
# default 60 s, shortened for test time): the outage below stays well inside it.
RAY_ENV = {"RAY_gcs_rpc_server_reconnect_timeout_s": "25"}
OUTAGE = 12.0  # seconds the GCS stays down


def test_a_gcs_restart_with_redis_keeps_ready_models_serving(product: ProductOnHosts) -> None:
    with product.client(timeout=30) as http:
        warm = ask(http, "ready-w1")
        assert warm.status_code == 200, warm.text
        expected = warm.json()["choices"][0]["message"]["content"]
        with Background(product.async_client, ["ready-w1"], clients=4) as load:
            product.wait_until("the load runs", lambda: len(load.history) > 12, 30)
            argv = product.kill_gcs()
            down = time.monotonic()
            started = time.monotonic()
            cold = ask(http, "cold-w2")  # needs the GCS: placing, a new actor
            cold_s = time.monotonic() - started
            started = time.monotonic()
            view = http.get("/admin/cluster")
            view_s = time.monotonic() - started
            health = http.get("/health")
            while time.monotonic() - down < OUTAGE:
                time.sleep(0.1)  # the outage's length is the point: nothing to await
            restarted = time.monotonic()
            product.start_gcs(argv)
            back = product.wait_until(
                "cold-w2 starts once the GCS is back", lambda: ask(http, "cold-w2").is_success, 60
            )
            count = len(load.history)
            product.wait_until("the load goes on", lambda: len(load.history) > count + 12, 30)
        history = load.history
        during = sum(
            1
            for op in history
            if op.outcome == OK and op.invoked >= down and (op.completed or restarted) < restarted
        )
        product.assert_quiet(http, list(MODELS))

    numbers = {
        "outage_s": round(restarted - down, 1),
        "start_refused_in_s": round(cold_s, 1),
        "cluster_view_refused_in_s": round(view_s, 1),
        "answered_during_outage": during,
        "cold_start_after_gcs_back_s": round(back, 1),
        "outcomes": outcomes(history),
    }
    dump(product.net.root / "numbers-gcs.json", numbers)
    print(f"GCS restart with Redis: {numbers}")
    for refused in (cold, view):
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "control_plane_unavailable", refused.text
        assert "control plane" in refused.json()["error"]["message"]
    assert health.status_code == 200, health.text  # the ingress and the controller are up
    assert during > 0, "the running model must keep answering while the GCS is away"
    assert check(history, lambda op: expected) == []
    assert all(op.outcome == OK for op in history), outcomes(history)


def test_the_head_lost_for_good_leaves_errors_not_hangs_and_no_orphan(
    product: ProductOnHosts,
) -> None:
    net = product.net
    with product.client(timeout=30) as http:
        for model in MODELS:
            assert ask(http, model).status_code == 200
    assert all(product.llama_servers()[w] for w in ("w1", "w2"))
    with Background(product.async_client, list(MODELS), clients=4) as load:
        product.wait_until("the load runs", lambda: len(load.history) > 12, 30)
        net.crash(product.head)  # GCS, raylet, HTTP front, ingress, controller: all at once
        crashed = time.monotonic()
        count = len(load.history)
        product.wait_until("clients keep hearing", lambda: len(load.history) > count + 20, 30)
    history = load.history
    after = [op for op in history if op.invoked >= crashed]
    assert after and all(op.outcome != OK for op in after)
    # Errors, at once: no request that met the lost head waited out its client's deadline.
    slowest = max((op.completed or crashed) - max(op.invoked, crashed) for op in history)
    assert slowest < 5, f"a request hung {slowest:.1f} s after the head was lost"
    # The workers' Ray gives up on the GCS (RAY_ENV above), and their model actors go with it,
    # their llama-servers too (the parent-death signal): nothing is left orphaned.
    gone = product.wait_until(
        "no llama-server outlives the cluster",
        lambda: not any(product.llama_servers().values()),
        60,
    )
    print(f"head lost: {outcomes(after)}, no llama-server {gone:.1f} s on, slowest {slowest:.1f} s")

"""ModelActor on a local Ray cluster with the fake llama-server: leases, the queue, async jobs."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import ray

from proxifier.config import ModelConfig, Settings
from proxifier.errors import ModelRetired, QueueCleared, QueueFull, QueueTimeout
from tests.conftest import MakeActor
from tests.helpers import wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def chat(lease: dict, **extra: object) -> httpx.Response:
    return httpx.post(
        f"{lease['url']}/v1/chat/completions",
        json={**CHAT, **extra},
        headers={"Authorization": f"Bearer {lease['api_key']}"},
        timeout=30,
    )


def test_acquire_starts_the_model_and_the_lease_reaches_llama_server(make_actor: MakeActor) -> None:
    actor = make_actor(parallel=2)
    lease = ray.get(actor.acquire.remote("first"), timeout=30)
    # The node's address, which replicas on any node reach (never loopback on a cluster).
    assert lease["url"].startswith(f"http://{ray.util.get_node_ip_address()}:")
    assert lease["api_key"]
    assert chat(lease).status_code == 200
    # The instance key is what protects llama-server: without it, nothing.
    assert httpx.post(f"{lease['url']}/v1/chat/completions", json=CHAT).status_code == 401
    stats = ray.get(actor.stats.remote())
    assert (stats["state"], stats["in_flight"], stats["busy"]) == ("ready", 1, True)
    assert "api_key" not in stats and lease["api_key"] not in str(stats)
    ray.get(actor.release.remote(lease["lease_id"]))
    stats = ray.get(actor.stats.remote())
    assert (stats["in_flight"], stats["requests_served"], stats["busy"]) == (0, 1, False)
    assert stats["last_used"] is not None and stats["rss_bytes"] > 0
    assert any("listening" in line for line in stats["log_tail"])


def test_200_concurrent_acquires_start_one_process_and_are_served_in_fifo_order(
    make_actor: MakeActor,
) -> None:
    actor = make_actor(parallel=4, max_queue_size=500, env={"FAKE_LLAMA_LOAD_DELAY": "0.5"})
    pending = [actor.acquire.remote(f"r{i}") for i in range(200)]
    leases = []
    held = 0
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=60)
        assert done, "no lease within 60 s"
        lease = ray.get(done[0])
        held += 1
        assert held <= 4, "never more leases out than slots"
        leases.append(lease)
        ray.get(actor.release.remote(lease["lease_id"]))
        held -= 1
    stats = ray.get(actor.stats.remote())
    events = ray.get(actor.events_since.remote())
    assert stats["instance"] == 1
    assert [e["kind"] for e in events].count("starting") == 1
    assert {lease["instance"] for lease in leases} == {1}
    granted = sorted(leases, key=lambda lease: lease["seq"])
    tickets = [lease["ticket"] for lease in granted]
    assert tickets == sorted(tickets) and len(set(tickets)) == 200, "granted in queue order"
    assert stats["requests_served"] == 200


def test_queue_bound_exactly_five_wait_and_the_rest_are_refused_at_once(
    make_actor: MakeActor,
) -> None:
    actor = make_actor(parallel=1, max_queue_size=5, env={"FAKE_LLAMA_LOAD_DELAY": "30"})
    refs = [actor.acquire.remote(f"r{i}") for i in range(10)]
    refused, waiting = ray.wait(refs, num_returns=5, timeout=20)
    for ref in refused:
        with pytest.raises(QueueFull) as caught:
            ray.get(ref)
        assert caught.value.retry_after == 30
        assert caught.value.message == "Service temporarily unavailable - queue is full"
    status = ray.get(actor.queue_status.remote())
    assert status["depth"] == 5 and [w["position"] for w in status["waiting"]] == [1, 2, 3, 4, 5]
    assert status["state"] == "starting"
    assert ray.get(actor.clear_queue.remote()) == 5  # and every waiter is answered
    for ref in waiting:
        with pytest.raises(QueueCleared):
            ray.get(ref, timeout=10)


def test_a_waiter_past_its_deadline_gets_its_error(make_actor: MakeActor) -> None:
    actor = make_actor(env={"FAKE_LLAMA_LOAD_DELAY": "30"})
    with pytest.raises(QueueTimeout) as caught:
        ray.get(actor.acquire.remote("late", time.time() + 0.5), timeout=30)
    assert "in the queue of model" in caught.value.message
    assert "(model state: starting)" in caught.value.message
    assert ray.get(actor.queue_status.remote())["depth"] == 0


def test_queue_timeout_setting_bounds_the_wait(make_actor: MakeActor) -> None:
    actor = make_actor(queue_timeout=0.5, env={"FAKE_LLAMA_LOAD_DELAY": "30"})
    with pytest.raises(QueueTimeout):
        ray.get(actor.acquire.remote("no-deadline"), timeout=30)


def test_clearing_the_queue_answers_every_waiter(make_actor: MakeActor) -> None:
    actor = make_actor(env={"FAKE_LLAMA_LOAD_DELAY": "30"})
    refs = [actor.acquire.remote(f"r{i}") for i in range(3)]
    wait_for(lambda: ray.get(actor.queue_status.remote())["depth"] == 3)
    assert ray.get(actor.position.remote("r0")) in {1, 2, 3}
    assert ray.get(actor.clear_queue.remote()) == 3
    for ref in refs:
        with pytest.raises(QueueCleared, match="the queue was cleared by an admin"):
            ray.get(ref, timeout=10)


def test_a_release_riding_with_an_enqueue_serves_the_oldest_waiter_first(
    make_actor: MakeActor,
) -> None:
    actor = make_actor(parallel=1)
    held = ray.get(actor.acquire.remote("holder"), timeout=30)
    waiting = actor.acquire.remote("waited-first")
    wait_for(lambda: ray.get(actor.queue_status.remote())["depth"] == 1)
    # The holder's slot, given back with a newcomer's enqueue, goes to the request that
    # waited; the newcomer queues behind it. A lease id the actor never granted (it was
    # restarted since) is skipped without failing the call.
    released = [("lease-from-a-past-life", 1), (held["lease_id"], 3)]
    answer = ray.get(actor.enqueue.remote("newcomer", None, None, released))
    assert answer["queued"]["position"] == 1
    assert ray.get(waiting, timeout=10)["request_id"] == "waited-first"
    stats = ray.get(actor.stats.remote())
    # The lease served three requests at the replica that held it; one grant per lease.
    assert (stats["requests_served"], stats["leases_granted"]) == (3, 2)


def test_release_many_gives_every_slot_back(make_actor: MakeActor) -> None:
    actor = make_actor(parallel=2)
    leases = [ray.get(actor.acquire.remote(f"r{i}"), timeout=30) for i in range(2)]
    ray.get(actor.release_many.remote([(lease["lease_id"], 2) for lease in leases]))
    stats = ray.get(actor.stats.remote())
    assert (stats["in_flight"], stats["requests_served"]) == (0, 4)


def test_a_lease_never_released_expires_after_max_lease_time(make_actor: MakeActor) -> None:
    actor = make_actor(
        parallel=1, settings={"max_lease_time": 0.5, "queue": {"cleanup_interval": 0.1}}
    )
    ray.get(actor.acquire.remote("holder-dies"), timeout=30)
    # The only slot is taken and never given back; the reaper reclaims it for the next caller.
    lease = ray.get(actor.acquire.remote("next"), timeout=10)
    assert lease["request_id"] == "next"
    events = [e["kind"] for e in ray.get(actor.events_since.remote())]
    assert "leases_reclaimed" in events


def test_a_slot_its_holder_stops_renewing_goes_to_the_next_waiter(make_actor: MakeActor) -> None:
    actor = make_actor(parallel=1, settings={"lease_ttl": 1})
    dead = ray.get(actor.acquire.remote("dead", holder="replica-dead"), timeout=30)
    live = actor.acquire.remote("live", holder="replica-live")  # waits for the only slot
    # Nobody renews the dead replica's slot: the waiter gets it within about lease_ttl.
    lease = ray.get(live, timeout=30)
    assert lease["request_id"] == "live"
    reclaimed = [e for e in ray.get(actor.events_since.remote()) if e["kind"] == "leases_reclaimed"]
    assert reclaimed and reclaimed[0]["holders"] == ["replica-dead"]
    ray.get(actor.release.remote(dead["lease_id"]))  # a late release changes nothing
    assert ray.get(actor.stats.remote())["in_flight"] == 1


def test_a_renewed_slot_is_kept_past_lease_ttl(make_actor: MakeActor) -> None:
    actor = make_actor(parallel=1, settings={"lease_ttl": 1})
    lease = ray.get(actor.acquire.remote("stream", holder="replica-a"), timeout=30)
    waiter = actor.acquire.remote("waiter", holder="replica-b")
    renewed_until = time.monotonic() + 3  # three lease_ttl's, renewed as a replica does
    while time.monotonic() < renewed_until:
        assert ray.get(actor.renew.remote("replica-a", [lease["lease_id"]])) == []
        time.sleep(0.2)
    status = ray.get(actor.queue_status.remote())
    assert [entry["request_id"] for entry in status["leases"]] == ["stream"]
    assert status["depth"] == 1  # the waiter still waits: the slot was never taken away
    ray.get(actor.release.remote(lease["lease_id"]))
    assert ray.get(waiter, timeout=10)["request_id"] == "waiter"


def test_idle_clock_runs_from_the_last_release(make_actor: MakeActor) -> None:
    actor = make_actor()
    lease = ray.get(actor.acquire.remote("long"), timeout=30)
    assert ray.get(actor.stats.remote())["idle_for"] == 0.0
    ray.get(actor.release.remote(lease["lease_id"]))
    released = ray.get(actor.stats.remote())["last_used"]
    wait_for(lambda: ray.get(actor.stats.remote())["idle_for"] > 0.1)
    stats = ray.get(actor.stats.remote())
    assert stats["last_used"] == released


def test_async_job_runs_when_the_model_is_ready(make_actor: MakeActor) -> None:
    actor = make_actor(env={"FAKE_LLAMA_LOAD_DELAY": "0.5"})
    accepted = ray.get(
        actor.submit.remote("job-1", "/v1/chat/completions", {**CHAT, "stream": True})
    )
    assert accepted == {"request_id": "job-1", "position": 1, "model_state": "starting"}
    pending = ray.get(actor.result.remote("job-1"))
    assert pending["status"] == "pending" and pending["position"] == 1
    wait_for(lambda: ray.get(actor.result.remote("job-1"))["status"] == "done")
    done = ray.get(actor.result.remote("job-1"))
    assert done["http_status"] == 200
    assert done["body"]["object"] == "chat.completion"  # stream was turned off for the job
    assert ray.get(actor.result.remote("nobody"))["status"] == "unknown"
    assert ray.get(actor.stats.remote())["in_flight"] == 0


def test_async_job_that_cannot_be_queued_keeps_its_error(make_actor: MakeActor) -> None:
    actor = make_actor(queue_timeout=0.3, env={"FAKE_LLAMA_LOAD_DELAY": "30"})
    ray.get(actor.submit.remote("job-late", "/v1/chat/completions", CHAT))
    wait_for(lambda: ray.get(actor.result.remote("job-late"))["status"] == "done")
    done = ray.get(actor.result.remote("job-late"))
    assert done["http_status"] == 503
    assert done["body"]["error"]["code"] == "queue_timeout"


def test_stop_handshake_refuses_while_busy_then_retires(make_actor: MakeActor) -> None:
    actor = make_actor()
    lease = ray.get(actor.acquire.remote("busy"), timeout=30)
    refused = ray.get(actor.request_stop.remote("idle"))
    assert refused == {"accepted": False, "reason": "busy: 1 in flight, 0 waiting"}
    ray.get(actor.release.remote(lease["lease_id"]))
    assert ray.get(actor.request_stop.remote("idle"))["accepted"] is True
    assert ray.get(actor.stats.remote())["state"] == "stopped"
    with pytest.raises(ModelRetired):
        ray.get(actor.acquire.remote("raced"))


def test_reload_with_a_process_change_keeps_the_queue(
    make_actor: MakeActor, fake_server: Path, tiny_model: Path
) -> None:
    actor = make_actor(parallel=1)
    holder = ray.get(actor.acquire.remote("holder"), timeout=30)
    waiter = actor.acquire.remote("waiter")
    wait_for(lambda: ray.get(actor.queue_status.remote())["depth"] == 1)
    changed = ModelConfig(
        model_path=str(tiny_model), llama_server=str(fake_server), parallel=1, context_length=1024
    )
    stats = ray.get(actor.reload.remote(changed, Settings()), timeout=30)
    assert stats["instance"] == 2
    lease = ray.get(waiter, timeout=30)
    assert lease["instance"] == 2 and lease["request_id"] == "waiter"
    assert chat(lease).status_code == 200
    # The lease of the stopped instance is void; releasing it is harmless.
    ray.get(actor.release.remote(holder["lease_id"]))
    ray.get(actor.release.remote(lease["lease_id"]))


def test_reload_of_a_live_field_touches_nothing(
    make_actor: MakeActor, fake_server: Path, tiny_model: Path
) -> None:
    actor = make_actor()
    before = ray.get(actor.start.remote(), timeout=30)
    changed = ModelConfig(
        model_path=str(tiny_model), llama_server=str(fake_server), priority=9, max_queue_size=7
    )
    after = ray.get(actor.reload.remote(changed, Settings()), timeout=30)
    assert (after["instance"], after["pid"]) == (before["instance"], before["pid"])
    assert after["max_queue_size"] == 7


def test_async_results_are_kept_for_result_ttl_only(make_actor: MakeActor) -> None:
    actor = make_actor(settings={"result_ttl": 0.3, "queue": {"cleanup_interval": 0.1}})
    ray.get(actor.submit.remote("short-lived", "/v1/completions", {"prompt": "hi"}))
    wait_for(lambda: ray.get(actor.result.remote("short-lived"))["status"] == "done")
    assert ray.get(actor.result.remote("short-lived"))["body"]["object"] == "text_completion"
    wait_for(lambda: ray.get(actor.result.remote("short-lived"))["status"] == "unknown")


def test_logs_show_this_models_llama_server_output(make_actor: MakeActor) -> None:
    actor = make_actor()
    ray.get(actor.start.remote(), timeout=30)
    lines = ray.get(actor.logs.remote(50))
    assert any("=== proxifier: llama-server instance 1" in line for line in lines)
    assert any("model loaded" in line for line in lines)

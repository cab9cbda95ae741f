"""ModelActor lifecycle: start failures, crashes and restarts, stopping, and no orphan processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import ray

from proxifier.errors import ModelFailed, Unavailable
from tests.conftest import MakeActor
from tests.helpers import alive, wait_for, wait_gone

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def chat(lease: dict, stream: bool = False) -> httpx.Response:
    return httpx.post(
        f"{lease['url']}/v1/chat/completions",
        json={**CHAT, "stream": stream},
        headers={"Authorization": f"Bearer {lease['api_key']}"},
        timeout=30,
    )


def test_start_is_single_flight(make_actor: MakeActor) -> None:
    actor = make_actor(env={"FAKE_LLAMA_LOAD_DELAY": "0.3"})
    results = ray.get([actor.start.remote() for _ in range(20)], timeout=60)
    assert {r["pid"] for r in results} == {results[0]["pid"]}
    assert ray.get(actor.stats.remote())["instance"] == 1


def test_a_failed_start_reports_the_servers_stderr(make_actor: MakeActor) -> None:
    actor = make_actor(env={"FAKE_LLAMA_FAIL_LOAD": "error: tensor 'blk.0' is corrupt (fake)"})
    with pytest.raises(ModelFailed) as caught:
        ray.get(actor.start.remote(), timeout=30)
    assert "exited with code 1 while loading" in caught.value.message
    assert "error: tensor 'blk.0' is corrupt (fake)" in caught.value.message
    stats = ray.get(actor.stats.remote())
    assert stats["state"] == "failed" and "corrupt" in stats["last_error"]
    # It refuses requests until its cooldown ends, saying why and when to come back.
    with pytest.raises(ModelFailed) as refused:
        ray.get(actor.acquire.remote("r"))
    assert "corrupt" in refused.value.message
    assert 0 < refused.value.retry_after <= 60


def test_a_waiter_hears_about_a_failed_start_at_once(make_actor: MakeActor) -> None:
    actor = make_actor(env={"FAKE_LLAMA_FAIL_LOAD": "error: out of memory (fake)"})
    with pytest.raises(ModelFailed, match="out of memory"):
        ray.get(actor.acquire.remote("waiting"), timeout=20)


def test_missing_model_file_is_an_error_at_start(make_actor: MakeActor, tmp_path: Path) -> None:
    actor = make_actor(model_path=str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelFailed, match=r"absent\.gguf' does not exist"):
        ray.get(actor.start.remote(), timeout=20)


def test_startup_timeout_fails_a_model_that_never_gets_ready(make_actor: MakeActor) -> None:
    actor = make_actor(startup_timeout=0.5, env={"FAKE_LLAMA_LOAD_DELAY": "60"})
    with pytest.raises(ModelFailed, match=r"not ready after 0.5s \(startup_timeout\)"):
        ray.get(actor.start.remote(), timeout=30)
    assert ray.get(actor.stats.remote())["pid"] is None


def test_an_admin_start_skips_the_cooldown(make_actor: MakeActor) -> None:
    actor = make_actor(startup_timeout=0.5, env={"FAKE_LLAMA_LOAD_DELAY": "60"})
    with pytest.raises(ModelFailed):
        ray.get(actor.start.remote(), timeout=30)
    with pytest.raises(ModelFailed, match="failed to start"):
        ray.get(actor.start.remote(force=True), timeout=30)
    assert ray.get(actor.stats.remote())["instance"] == 2


def test_crash_mid_request_restarts_and_the_next_request_succeeds(make_actor: MakeActor) -> None:
    actor = make_actor(env={"FAKE_LLAMA_CRASH_AFTER": "1"})
    lease = ray.get(actor.acquire.remote("one"), timeout=30)
    assert chat(lease).status_code == 200
    ray.get(actor.release.remote(lease["lease_id"]))
    first_pid = ray.get(actor.stats.remote())["pid"]
    lease = ray.get(actor.acquire.remote("two"), timeout=30)
    stream = httpx.stream(
        "POST",
        f"{lease['url']}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"Authorization": f"Bearer {lease['api_key']}"},
    )
    with pytest.raises(httpx.TransportError), stream as response:  # the holder sees the failure
        for _ in response.iter_lines():
            pass
    ray.get(actor.release.remote(lease["lease_id"]))  # a voided lease: harmless
    # The actor notices the crash on its own (the process exits), not on the next request.
    wait_for(lambda: ray.get(actor.stats.remote())["restarts"] == 1, timeout=30)
    lease = ray.get(actor.acquire.remote("three"), timeout=30)  # waits out the restart
    assert lease["instance"] == 2
    assert chat(lease).status_code == 200
    stats = ray.get(actor.stats.remote())
    assert stats["restarts"] == 1 and stats["pid"] != first_pid
    assert "exited with code 134 while serving" in stats["last_error"]
    assert not alive(first_pid)


def test_a_hung_llama_server_is_killed_and_restarted(make_actor: MakeActor) -> None:
    """A stopped process never exits: only the liveness probe notices it. Its request in
    flight ends (the connection closes with the kill), and the next one gets a fresh instance."""
    actor = make_actor(
        settings={"liveness_interval": 0.2, "liveness_timeout": 0.2, "liveness_failures": 2},
        env={"FAKE_LLAMA_TOKEN_DELAY": "0.05"},
    )
    lease = ray.get(actor.acquire.remote("one"), timeout=30)
    hung_pid = ray.get(actor.stats.remote())["pid"]
    stream = httpx.stream(
        "POST",
        f"{lease['url']}/v1/chat/completions",
        json={**CHAT, "max_tokens": 200, "stream": True},
        headers={"Authorization": f"Bearer {lease['api_key']}"},
        timeout=30,
    )
    with pytest.raises(httpx.TransportError), stream as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
        os.kill(hung_pid, signal.SIGSTOP)  # mid-stream: it neither answers nor exits
        for _ in lines:
            pass
    ray.get(actor.release.remote(lease["lease_id"]))
    lease = ray.get(actor.acquire.remote("two"), timeout=30)  # waits out the restart
    assert lease["instance"] == 2 and chat(lease).status_code == 200
    stats = ray.get(actor.stats.remote())
    assert "did not answer /health 2 times in a row" in stats["last_error"]
    assert stats["restarts"] == 1
    assert wait_gone(hung_pid)


def test_after_the_restart_budget_the_model_fails_with_the_reason(make_actor: MakeActor) -> None:
    actor = make_actor(settings={"max_restarts": 1}, env={"FAKE_LLAMA_CRASH_AFTER": "0"})
    for attempt in range(2):
        lease = ray.get(actor.acquire.remote(f"r{attempt}"), timeout=30)
        with pytest.raises(httpx.TransportError):
            chat(lease)
        if attempt == 0:
            wait_for(lambda: ray.get(actor.stats.remote())["state"] != "ready")
    wait_for(lambda: ray.get(actor.stats.remote())["state"] == "failed")
    with pytest.raises(ModelFailed) as caught:
        ray.get(actor.acquire.remote("after"))
    assert "crashed 2 times within 300s" in caught.value.message
    assert "crashing on purpose" in caught.value.message


def test_a_server_ignoring_sigterm_is_killed_after_stop_grace(make_actor: MakeActor) -> None:
    actor = make_actor(settings={"stop_grace": 0.5}, env={"FAKE_LLAMA_IGNORE_SIGTERM": "1"})
    pid = ray.get(actor.start.remote(), timeout=30)["pid"]
    stats = ray.get(actor.stop.remote("test"), timeout=30)
    assert stats["state"] == "stopped" and stats["pid"] is None
    assert wait_gone(pid)
    events = ray.get(actor.events_since.remote())
    assert events[-1]["kind"] == "stopped" and events[-1]["code"] == -signal.SIGKILL


def test_stop_answers_waiters(make_actor: MakeActor) -> None:
    actor = make_actor(env={"FAKE_LLAMA_LOAD_DELAY": "30"})
    ref = actor.acquire.remote("waiting")
    wait_for(lambda: ray.get(actor.queue_status.remote())["depth"] == 1)
    ray.get(actor.stop.remote("admin stop"), timeout=30)
    with pytest.raises(Unavailable, match=r"was stopped \(admin stop\) while the request waited"):
        ray.get(ref, timeout=10)


# --- no orphans -------------------------------------------------------------------------------


def test_no_orphan_after_a_normal_stop(make_actor: MakeActor) -> None:
    actor = make_actor()
    pid = ray.get(actor.start.remote(), timeout=30)["pid"]
    ray.get(actor.stop.remote(), timeout=30)
    assert wait_gone(pid)


def test_no_orphan_after_ray_kill(make_actor: MakeActor) -> None:
    actor = make_actor()
    pid = ray.get(actor.start.remote(), timeout=30)["pid"]
    ray.kill(actor)
    assert wait_gone(pid)


def test_no_orphan_after_sigkill_of_the_actor_process(make_actor: MakeActor) -> None:
    actor = make_actor()
    stats = ray.get(actor.start.remote(), timeout=30)
    os.kill(stats["actor_pid"], signal.SIGKILL)
    assert wait_gone(stats["actor_pid"])
    assert wait_gone(stats["pid"])


def test_no_orphan_after_ray_shutdown(fake_server: Path, tiny_model: Path, tmp_path: Path) -> None:
    # Its own driver and cluster: the session's cluster must stay up for the other tests.
    script = textwrap.dedent(
        f"""
        import os, ray
        from actors.model import create_model_actor
        from proxifier.config import ModelConfig, Settings
        ray.init(address="local", num_cpus=1, include_dashboard=False,
                 runtime_env={{"env_vars": {{"PROXIFIER_HOME": {str(tmp_path)!r}}}}})
        model = ModelConfig(model_path={str(tiny_model)!r}, llama_server={str(fake_server)!r})
        actor = create_model_actor("shutdown-test", model, Settings(), {str(tmp_path)!r})
        print(ray.get(actor.start.remote(), timeout=60)["pid"], flush=True)
        ray.shutdown()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pid = int(result.stdout.strip().splitlines()[-1])
    assert wait_gone(pid)


# --- GPUs ------------------------------------------------------------------------------------


def test_llama_server_gets_the_gpus_ray_assigned(make_actor: MakeActor) -> None:
    actor = make_actor(options={"num_gpus": 1})
    stats = ray.get(actor.start.remote(), timeout=30)
    assert len(stats["gpu_ids"]) == 1
    environ = Path(f"/proc/{stats['pid']}/environ").read_bytes().split(b"\0")
    child = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    assert child["CUDA_VISIBLE_DEVICES"] == stats["gpu_ids"][0]


def test_model_env_reaches_llama_server(make_actor: MakeActor) -> None:
    actor = make_actor(env={"PROXIFIER_TEST_MARK": "from-config"})
    pid = ray.get(actor.start.remote(), timeout=30)["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"PROXIFIER_TEST_MARK=from-config" in environ


# --- lifecycle changes that overlap ------------------------------------------------------------


def test_a_stop_during_a_start_answers_the_starter(make_actor: MakeActor) -> None:
    actor = make_actor(env={"FAKE_LLAMA_LOAD_DELAY": "30"})
    starting = actor.start.remote()
    wait_for(lambda: ray.get(actor.stats.remote())["pid"] is not None)
    ray.get(actor.stop.remote("admin"), timeout=30)
    with pytest.raises(Unavailable, match="was stopped while starting"):
        ray.get(starting, timeout=30)


def test_the_stop_handshake_is_refused_during_a_reload(
    make_actor: MakeActor, fake_server: Path, tiny_model: Path
) -> None:
    from proxifier.config import ModelConfig, Settings

    env = {"FAKE_LLAMA_IGNORE_SIGTERM": "1"}
    actor = make_actor(env=env, settings={"stop_grace": 1.5})
    ray.get(actor.start.remote(), timeout=30)
    changed = ModelConfig(
        model_path=str(tiny_model), llama_server=str(fake_server), env=env, context_length=999
    )
    reloading = actor.reload.remote(changed, Settings(stop_grace=1.5))
    wait_for(lambda: ray.get(actor.stats.remote())["state"] == "stopping")
    answer = ray.get(actor.request_stop.remote("idle"))
    assert answer == {"accepted": False, "reason": "a stop or reload is in progress"}
    assert ray.get(reloading, timeout=60)["instance"] == 2
    assert ray.get(actor.stats.remote())["state"] == "ready"


def test_an_unexpected_error_while_starting_fails_the_model(
    make_actor: MakeActor, tmp_path: Path
) -> None:
    broken = tmp_path / "llama-server"
    broken.write_text("#!/nonexistent/interpreter\n")  # executable, but exec fails
    broken.chmod(0o755)
    actor = make_actor(llama_server=str(broken))
    with pytest.raises(ModelFailed, match="could not start llama-server"):
        ray.get(actor.start.remote(), timeout=30)
    assert ray.get(actor.stats.remote())["state"] == "failed"


def test_the_instance_key_is_not_on_the_command_line_and_its_file_is_gone(
    make_actor: MakeActor,
) -> None:
    actor = make_actor()
    lease = ray.get(actor.acquire.remote("r"), timeout=30)
    pid = ray.get(actor.stats.remote())["pid"]
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert lease["api_key"].encode() not in b" ".join(command_line)  # `ps` shows this to all
    key_file = Path(command_line[command_line.index(b"--api-key-file") + 1].decode())
    # Read by llama-server when it started, then removed with its folder (a private one:
    # 0700, tests/unit/test_key_file.py), which no start leaves behind.
    assert not key_file.exists() and not key_file.parent.exists()
    ray.get(actor.release.remote(lease["lease_id"]))

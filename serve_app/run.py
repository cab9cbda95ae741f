"""`proxifier serve`: join or start a Ray cluster, deploy the app, wait, and clean up on exit.

The driver only: it builds nothing itself (serve_app.app does) and never imports proxifier.cli.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from proxifier.config import (
    AUTH_DISABLED,
    ConfigError,
    load_auth_config,
    load_models_config,
    model_path_warnings,
)
from proxifier.console import RAY_LOGGERS, event_line, table
from proxifier.examples import ALL_INTERFACES, reachable_host, try_it
from proxifier.home import proxifier_home
from proxifier.startup import (
    PORT_RELEASE_WAIT,
    answers,
    haproxy_side_ports,
    marked_cluster,
    ports_released,
    ray_marker,
    serve_environment,
    taken_ports,
)
from serve_app.worker_setup import HOOK


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def say(message: str) -> None:
    print(message, flush=True)


def serve_forever(
    config: str,
    host: str | None,
    port: int | None,
    address: str | None,
    replicas: int,
    insecure: bool,
    ingress: str = "haproxy",
    verbose: bool = False,
) -> int:
    try:
        models = load_models_config(config)
        auth_path = models.auth_path()
        auth = load_auth_config(auth_path) if auth_path else AUTH_DISABLED
    except ConfigError as error:
        for issue in error.issues:
            print(f"error: {issue}", file=sys.stderr)
        print("the configuration was not accepted; nothing was started", file=sys.stderr)
        return 1
    for warning in model_path_warnings(models, config):
        print(f"warning: {warning}", file=sys.stderr)
    host = host or models.settings.host
    port = port or models.settings.port
    if not auth.enabled and not is_loopback(host) and not insecure:
        print(
            f"error: refusing to listen on {host} with auth off: anyone who can reach it could "
            "run and stop models. Set settings.auth_file (see README), bind 127.0.0.1, or "
            "pass --insecure if this network is yours alone.",
            file=sys.stderr,
        )
        return 2

    import ray
    from ray import serve

    from actors.controller import get_controller
    from serve_app.app import APP_NAME, build_app

    if not verbose:
        # The console is the product's: Ray's and Serve's INFO lines (route tables, ports,
        # HAProxy reloads) stay in their log files, which are named below.
        for name in RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    # Every worker of this job, Serve's HTTP proxy included, ignores the timeout headers
    # clients could otherwise set (serve_app/hardening.py), and has a model actor's code
    # loaded before it becomes one (serve_app/worker_setup.py).
    serve_env = serve_environment(haproxy=ingress == "haproxy")
    os.environ.update(serve_env)
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": HOOK, "env_vars": serve_env}
    job: dict[str, Any] = {
        "namespace": "proxifier",
        "runtime_env": runtime_env,
        "log_to_driver": verbose,  # the workers' output, Serve's and HAProxy's included
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    side = haproxy_side_ports() if ingress == "haproxy" else ()
    ports = [port, *side]

    def waiting(taken: list[str]) -> None:
        say(f"waiting up to {PORT_RELEASE_WAIT:.0f} s for ports to be let go: {'; '.join(taken)}")

    taken = ports_released(host, ports, side, on_wait=waiting)
    if taken:
        return _ports_taken(taken)
    started_local = False
    if address and address not in ("local", "auto"):
        if not answers(address):
            print(
                f"error: no Ray cluster answers at {address} (--address or RAY_ADDRESS); start "
                "one there (`ray start --head`), or leave both out to start a local one",
                file=sys.stderr,
            )
            return 2
        say(f"joining the Ray cluster at {address}")
        ray.init(address=address, **job)
    else:
        marked = None if address == "local" else marked_cluster()
        if marked is not None and not answers(marked):
            say(
                f"a Ray cluster is marked at {marked} (in {ray_marker()}) but nothing answers "
                "there (stopped without `ray stop`?)"
            )
            marked = None
        if marked is not None:
            ray.init(address="auto", **job)
            say("joined the running Ray cluster on this machine")
        else:
            say("starting a local Ray cluster")
            os.environ.pop("RAY_ADDRESS", None)
            ray.init(address="local", **job)
            started_local = True

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        say(f"\nreceived {signal.Signals(signum).name}; stopping")
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            serve.start(http_options={"host": host, "port": port, "request_timeout_s": None})
            serve.run(
                build_app(
                    {"config": str(Path(config).resolve()), "replicas": replicas, "host": host}
                ),
                name=APP_NAME,
                route_prefix="/",
                blocking=False,
            )
        except Exception:
            # A port taken after the check (an earlier instance's HAProxy that came back, or
            # another program): name it rather than Serve's own failure.
            taken = taken_ports(host, ports, side)
            if taken:
                return _ports_taken(taken)
            raise
        controller = get_controller()
        client_host = reachable_host(host)
        url = f"http://{f'[{client_host}]' if ':' in client_host else client_host}:{port}"
        where = f" (listening on every interface, {host})" if host in ALL_INTERFACES else ""
        say(
            f"\nLLM Proxifier is serving {url}/v1{where}"
            f" (dashboard: {url}/dashboard, API docs: {url}/docs)"
        )
        _print_models(ray.get(controller.status.remote(), timeout=60))
        say("\nTry it:")
        for line in try_it(url, next(iter(models.models), "MODEL"), auth):
            say(f"  {line}")
        say(
            f"\nLogs: Ray, Serve and HAProxy in {_ray_logs()}; llama-server in "
            f"{proxifier_home() / 'logs'}" + ("" if verbose else " (--verbose prints Ray's here)")
        )
        say("\nCtrl-C stops the server and every model it started.")
        _follow_events(controller, stop)
    finally:
        _shutdown(started_local)
    return 0


def _ports_taken(taken: list[str]) -> int:
    for problem in taken:
        print(f"error: {problem}", file=sys.stderr)
    print(
        "an earlier instance may still be running: stop it (or that process), or choose "
        "another --port",
        file=sys.stderr,
    )
    return 3


def _follow_events(controller: Any, stop: threading.Event) -> None:
    """Print the controller's events an operator wants (ready, failed, downloads, reloads)
    as they happen, until `stop`. A slow or restarting controller only delays them."""
    import ray

    seq = -1  # from the start: a preloaded model may have loaded before the table above
    while not stop.wait(1.0):
        try:
            events = ray.get(controller.events_since.remote(seq), timeout=30)
        except Exception:  # the controller restarts or is busy: try again
            continue
        for event in events:
            seq = max(seq, event["seq"])
            line = event_line(event)
            if line is not None:
                say(line)


def _ray_logs() -> str:
    """This node's Ray log folder (where Serve's and HAProxy's logs are too)."""
    try:
        from ray._private.worker import _global_node

        return str(Path(_global_node.get_logs_dir_path()))
    except Exception:  # a Ray without the private accessor: its usual place
        return str(Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "session_latest" / "logs")


def _shutdown(started_local: bool) -> None:
    import ray
    from ray import serve

    from actors.controller import get_controller
    from serve_app.app import APP_NAME

    if not ray.is_initialized():
        return
    try:
        controller = get_controller()
        ray.get(controller.shutdown.remote(), timeout=120)
        ray.kill(controller, no_restart=True)
    except Exception as error:  # keep cleaning up whatever else is there
        print(f"warning: stopping the models: {error}", file=sys.stderr)
    if started_local:
        # The whole cluster goes: Serve with it (its own graceful shutdown waits 30 s for
        # HAProxy here, and would only stop what ray.shutdown stops anyway).
        ray.shutdown()
    else:
        try:
            serve.delete(APP_NAME)
        except Exception as error:
            print(f"warning: removing the Serve application: {error}", file=sys.stderr)
    say("stopped")


def _print_models(statuses: list[dict[str, Any]]) -> None:
    say("")
    rows = [["MODEL", "STATE", "PRIORITY", "GROUP", "START"]]
    for status in statuses:
        start = "preload" if status["preload"] else "auto" if status["auto_start"] else "on demand"
        rows.append(
            [
                status["name"],
                status["state"],
                str(status["priority"]),
                status["resource_group"],
                start,
            ]
        )
    say(table(rows))

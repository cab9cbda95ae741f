"""The watchers: auth.yaml on disk (its keys take effect as it changes) and the Serve applications
using this controller (when they are gone, the models stop and the controller ends). They act only
through the facade's callbacks; they hold no model state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import ray

from actors.controller.config_files import ConfigFiles
from actors.controller.facts import observed
from actors.ray_glue import serve_applications
from proxifier.config import AuthConfig, ConfigError, ModelsConfig
from proxifier.lifecycle import serve_apps_gone

AUTH_POLL_INTERVAL = 1.0  # seconds between looks at auth.yaml's modification time
SERVE_WATCH_INTERVAL = 2.0  # seconds between looks at whether the Serve application still exists


async def watch_auth_file(
    files: ConfigFiles,
    config: Callable[[], ModelsConfig],
    auth: Callable[[], AuthConfig],
    set_auth: Callable[[AuthConfig], None],
    accept: Callable[[ModelsConfig], None],
    event: Callable[..., Any],
) -> None:
    """auth.yaml takes effect when it changes on disk (keys added or removed, no restart);
    a bad edit is rejected and the keys in force stay. `set_auth`: the new keys are in force;
    `accept`: a restarted controller goes on with them."""
    seen = files.auth_stamp(config())
    while True:
        await asyncio.sleep(AUTH_POLL_INTERVAL)
        path = files.auth_path(config())
        current = files.auth_stamp(config())
        if current == seen:
            continue
        seen = current
        try:
            loaded = files.load_auth(config())
        except ConfigError as error:
            event("config_rejected", file=str(path), errors=[str(i) for i in error.issues])
            continue
        if loaded != auth():
            set_auth(loaded)
            event("auth_reloaded", keys=len(loaded.api_keys), enabled=loaded.enabled)
            accept(config())


class ServeWatcher:
    """Serve applications whose ingress replicas use this controller: when they are all
    deleted, the models stop and the controller goes (serve deploy/shutdown, KubeRay)."""

    def __init__(self, shutdown: Callable[[], Awaitable[None]], event: Callable[..., Any]) -> None:
        self._shutdown = shutdown
        self._event = event
        self.serve_apps: set[str] = set()
        self._serve_watch: asyncio.Future[None] | None = None

    def serve_app(self, name: str) -> None:
        """An ingress replica of Serve application `name` uses this controller (said at its start
        and at each of its health checks)."""
        if name not in self.serve_apps:
            self._event("serve_app_watched", application=name)
        self.serve_apps.add(name)
        if self._serve_watch is None or self._serve_watch.done():
            self._serve_watch = asyncio.ensure_future(self._watch_serve())
            self._serve_watch.add_done_callback(observed)

    async def _watch_serve(self) -> None:
        """Stop every model and end this controller once the Serve applications it serves
        are gone: nothing else would stop llama-server after `serve shutdown`. Gone is what
        Serve itself says (seen twice in a row), never a silence: a Serve that does not
        answer may be restarting."""
        gone_in_a_row = 0
        while gone_in_a_row < 2:
            await asyncio.sleep(SERVE_WATCH_INTERVAL)
            try:
                statuses = await serve_applications()
            except Exception:  # Serve restarting or busy: not known to be gone
                continue
            gone = serve_apps_gone(self.serve_apps, statuses)
            gone_in_a_row = gone_in_a_row + 1 if gone else 0
        self._event("serve_app_deleted", applications=sorted(self.serve_apps))
        await self._shutdown()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

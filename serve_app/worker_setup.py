"""What every Ray worker process of the product runs as it starts (Ray's
`worker_process_setup_hook`, set in the job's runtime env by `proxifier serve`)."""

from __future__ import annotations

import importlib
import logging

from serve_app.hardening import ignore_client_timeout_headers

HOOK = "serve_app.worker_setup.prepare_worker"
# Imported ahead of need: a spare worker (actors/warm_workers.py) that becomes a model actor
# then runs its start at once instead of first importing these (~0.2 s on 2 cores). Most of
# the job's workers (the ingress, the controller, model actors) import them anyway.
PRELOADED = ("actors.model",)


def prepare_worker() -> None:
    ignore_client_timeout_headers()
    for module in PRELOADED:
        try:
            importlib.import_module(module)
        except Exception as error:  # a hook that raises ends the worker: only speed is lost
            logging.getLogger("proxifier").warning("could not preload %s: %r", module, error)

"""One model instance as a Ray actor: its llama-server, its slots and queue, its async jobs.

The controller creates and kills these; the ingress asks them for slots. Nothing here imports
the controller or the ingress. `actor` (the facade) imports every other module of the package,
so importing `actors.model` (a spare worker preloads it) loads all of them:
`instance` and `llama_process` (the llama-server), `admission` (slots, queue, leases), `jobs`
(respond-async), `event_log`, `stats`, `instance_files`.
"""

from actors.model.actor import (
    NAMESPACE,
    ModelActor,
    actor_name,
    cluster_singleton_options,
    create_model_actor,
    model_of,
)

__all__ = [
    "NAMESPACE",
    "ModelActor",
    "actor_name",
    "cluster_singleton_options",
    "create_model_actor",
    "model_of",
]

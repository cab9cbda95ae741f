"""One model instance as a Ray actor: its llama-server, its slots and queue, its async jobs.

The controller creates and kills these; the ingress asks them for slots. Nothing here imports
the controller or the ingress.
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

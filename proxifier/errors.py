"""Typed errors that cross from actors to the ingress and become OpenAI-shaped HTTP answers.
Plain exception classes: no I/O, no imports of the product (every floor may raise them).

Each error knows its HTTP status, its OpenAI `type`, a stable `code` and, when trying again makes
sense, how many seconds to wait (`retry_after`). They survive pickling (Ray re-raises them in the
caller as the same class), so the ingress can `except QueueFull:` around an actor call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar


class ProxifierError(Exception):
    """Base: a request the product answers with an error instead of a result."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.retry_after))

    def retry_after_header(self) -> str | None:
        """Whole seconds for the Retry-After header (never 0: clients treat it as "now")."""
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after)))

    def body(self, anthropic: bool = False) -> dict[str, Any]:
        """The OpenAI-shaped body, or the Anthropic one for `/v1/messages` clients."""
        if anthropic:
            return anthropic_body(self.status, self.message, self.code)
        return {"error": {"message": self.message, "type": self.error_type, "code": self.code}}


# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors); its SDK
# retries 429, 5xx and overloaded_error, honouring Retry-After.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`; `code` (the proxifier's stable
    code, such as queue_full) rides along, which Anthropic clients ignore."""
    error: dict[str, str] = {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}
    if code:
        error["code"] = code
    return {"type": "error", "error": error}


def _rebuild(cls: type[ProxifierError], message: str, retry_after: float | None) -> ProxifierError:
    error = cls.__new__(cls)
    ProxifierError.__init__(error, message, retry_after=retry_after)
    return error


class Unavailable(ProxifierError):
    """503: the model cannot take the request now; `retry_after` says when to try again."""

    status = 503
    error_type = "service_unavailable"
    code = "model_unavailable"


class QueueFull(Unavailable):
    code = "queue_full"


class ControlPlaneAway(Unavailable):
    """Ray's control plane (the GCS on the head) does not answer: what needs it (placing a
    model, reading the nodes) cannot be done now; models already running still serve."""

    code = "control_plane_unavailable"


class QueueTimeout(Unavailable):
    code = "queue_timeout"


class QueueCleared(Unavailable):
    code = "queue_cleared"


class ModelFailed(Unavailable):
    """The model failed to start or crashed too often; it refuses requests until its cooldown."""

    code = "model_failed"


class ActorGone(Unavailable):
    """The model's actor died (its node was lost, or it was killed) while a request used it."""

    code = "model_actor_gone"


class ModelRetired(Unavailable):
    """The actor agreed to stop; the caller should ask the controller for a fresh one."""

    code = "model_stopping"


class Rerouted(Unavailable):
    """The replica a request waited for gave its place up to a replica with a free slot (the
    controller moves waiting requests there): the caller routes the request again."""

    code = "model_rerouted"


class InvalidRequest(ProxifierError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class Forbidden(ProxifierError):
    status = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class NotFound(ProxifierError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    @classmethod
    def named(cls, name: str, available: Iterable[str]) -> ModelNotFound:
        """The 404 for `name`, listing the models the caller may use (`available`)."""
        listed = ", ".join(sorted(available)) or "none"
        return cls(f"The model '{name}' does not exist. Available models: {listed}")


class Refused(ProxifierError):
    """409: the action conflicts with the model's configuration (stopping a preloaded model)."""

    status = 409
    error_type = "invalid_request_error"
    code = "refused"


class PayloadTooLarge(ProxifierError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class UpstreamFailed(ProxifierError):
    """502: llama-server refused the connection or broke it while answering."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_failed"


class UpstreamTimeout(ProxifierError):
    """504: llama-server went silent for longer than upstream_timeout."""

    status = 504
    error_type = "upstream_error"
    code = "upstream_timeout"


class LeaseError(ProxifierError):
    """A lease used in a way that is a bug in the caller (released twice, never granted)."""

    code = "lease_error"

"""What a configured model can be asked to do (`capabilities`), and the 400s for a request it
was not started to answer: before anything starts it (`refusal`) and when llama-server itself
says 501 (`unsupported`). Pure: no I/O; the paths themselves are `proxifier.endpoints`'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxifier.endpoints import Can, Endpoint
from proxifier.errors import InvalidRequest

if TYPE_CHECKING:
    from proxifier.config import ModelConfig

# The config field that starts a model for what a path needs (the others need no field).
FIELD_FOR: dict[Can, str] = {Can.EMBEDDINGS: "embeddings", Can.RERANK: "reranking"}


def capabilities(model: ModelConfig, fill_in_middle: bool | None = None) -> list[Can]:
    """What a configured model can be asked to do. A model started for embeddings or
    reranking is a dedicated model, not a chat model (llama.cpp's advice for those flags).
    `fill_in_middle`: whether its GGUF has FIM tokens, when known (`proxifier.gguf_facts`)."""
    found = []
    if not (model.embeddings or model.reranking):
        found.append(Can.CHAT)
    if model.embeddings:
        found.append(Can.EMBEDDINGS)
    if model.reranking:
        found.append(Can.RERANK)
    if fill_in_middle and Can.CHAT in found:
        found.append(Can.INFILL)
    return found


def refusal(endpoint: Endpoint, name: str, model: ModelConfig) -> InvalidRequest | None:
    """A 400 for a request the model was not started to answer (before anything starts it),
    naming the config field to set; None when the model can take it (or only llama-server
    knows, as for infill)."""
    if endpoint.needs is None or endpoint.needs not in FIELD_FOR:
        return None
    field = FIELD_FOR[endpoint.needs]
    if getattr(model, field):
        return None
    return InvalidRequest(
        f"model '{name}' was not started for {endpoint.needs.value}: set '{field}: true' for "
        f"it in models.yaml (or use a model that has it) to call {endpoint.path}"
    )


def unsupported(endpoint: Endpoint, name: str, upstream_message: str) -> InvalidRequest:
    """llama-server said 501 (not supported): a 400 in the client's terms, saying what the
    model lacks and what to do about it."""
    if endpoint.needs is Can.INFILL:
        return InvalidRequest(
            f"model '{name}' cannot fill in the middle: its GGUF file has no FIM (prefix, "
            f"suffix, middle) tokens; use a code model that has them for /infill "
            f"(llama-server: {upstream_message})"
        )
    field = FIELD_FOR.get(endpoint.needs) if endpoint.needs is not None else None
    hint = f"set '{field}: true' for it in models.yaml" if field else "use another model"
    return InvalidRequest(
        f"model '{name}' cannot answer {endpoint.path}: {hint} (llama-server: {upstream_message})"
    )

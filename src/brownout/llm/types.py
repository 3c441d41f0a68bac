"""Plain data shared by the model client, the local model supervisor, the JSON guard and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import Field

from brownout.policies._base import PolicyConfig

__all__ = ["CUT_SHORT", "ChatResult", "EndpointConfig", "Message", "ProbeResult"]

CUT_SHORT: Final = "cut_short"
"""The ``finish_reason`` of an answer given up at its time limit, of which the caller kept what the
model had written (``ModelClient.chat(salvage=...)``)."""

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": "..."}``."""


class EndpointConfig(PolicyConfig):
    """One OpenAI-compatible endpoint serving a model role (vLLM, llama.cpp server, Ollama, ...)."""

    url: str = Field(description="base URL, e.g. http://127.0.0.1:8081 (the client appends /v1/...)")
    model: str = Field(default="default", description="the 'model' field sent in requests")
    api_key: str | None = Field(default=None, description="sent as a bearer token when set")
    json_schema: bool = Field(
        default=True,
        description="the endpoint honours response_format json_schema (grammar-constrained decoding)",
    )
    stream: bool = Field(
        default=True,
        description=(
            "ask for the answer as a stream of tokens, so that a call given up on (its timeout, its "
            "caller's deadline) ends the generation and frees the server's slot at once; off for a "
            "server that cannot stream"
        ),
    )
    max_concurrency: int = Field(
        default=16,
        ge=1,
        le=4096,
        description=(
            "most requests in flight to this endpoint at once; the client's adaptive limit stays at or "
            "below it and further calls wait in the client's queue (a local model server: its slots)"
        ),
    )


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A chat completion that came back: the text and where and how fast it was served.

    ``finish_reason`` is the server's (``stop``, ``length``...), or :data:`CUT_SHORT` for an answer
    given up at its time limit whose written part the caller chose to keep.
    """

    content: str
    role: str
    endpoint: str
    latency: float
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    """The model the server says answered (its ``model`` field), when it says."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of a health probe (a tiny test inference under a timeout) of one endpoint.

    ``latency`` is the inference alone; ``queued`` the seconds the probe waited for a free slot in
    the client's queue before it was sent. ``busy`` means every slot was in use by calls that are
    being answered: the probe was not sent (or got no slot in time), and the endpoint counts as
    healthy -- a model that is only busy is not down.
    """

    role: str
    endpoint: str
    healthy: bool
    latency: float
    error: str | None = None
    busy: bool = False
    queued: float = 0.0

"""The three browser checks that apply while API keys are off: Host, Origin and Content-Type.
Pure: headers in, a refusal (status, message, code) or None out.

With API keys off (the demo default), a web page the user happens to open must not drive the
server from the user's browser. Three checks, as Ollama added after its DNS-rebinding reports:

- Host: only a loopback name or the configured host (a rebound DNS name pointing at 127.0.0.1
  carries the attacker's host name);
- Origin: a state-changing request from a browser page of another origin is refused (the same
  origin, and the configured `cors_origins`, are fine);
- Content-Type: a POST must be JSON when it says what it is (a cross-site `<form>` can only send
  text/plain, urlencoded or multipart bodies, which need no CORS preflight).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})
ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_name(host: str) -> str:
    """The name part of a Host header or an origin's netloc: no port, no IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def browser_refusal(
    method: str,
    headers: Mapping[str, str],
    bound_host: str,
    allowed_origins: Collection[str] = (),
    path: str = "/",
) -> tuple[int, str, str] | None:
    """Why this request is refused while API keys are off, or None to let it through.
    A GET of `/upstream/...` changes state too (it starts the model, which may stop others):
    from another site's page (its Origin, or the browser's `Sec-Fetch-Site: cross-site`,
    which even an image tag's request carries) it is refused like a POST."""
    host = headers.get("host", "")
    name = host_name(host)
    if bound_host not in ANY_ADDRESS and name not in LOOPBACK_NAMES | {bound_host.lower()}:
        return (
            403,
            f"Host '{host}' is not this server's (DNS rebinding?): use localhost, 127.0.0.1 or "
            f"'{bound_host}', or turn API keys on",
            "host_not_allowed",
        )
    upstream = path == "/upstream" or path.startswith("/upstream/")
    if method in SAFE_METHODS and not upstream:
        return None
    origin = headers.get("origin")
    if upstream and origin is None and headers.get("sec-fetch-site") == "cross-site":
        origin = "another site"
    if origin is not None and origin not in allowed_origins and not _same_origin(origin, host):
        return (
            403,
            f"Requests from the web page at {origin} may not change this server; add the origin "
            "to cors_origins in auth.yaml, or turn API keys on",
            "origin_not_allowed",
        )
    if method in SAFE_METHODS:
        return None
    content_type = headers.get("content-type")
    if content_type is not None and content_type.split(";")[0].strip().lower() not in (
        "application/json",
        "",
    ):
        return (
            415,
            f"POST bodies must be application/json, not {content_type.split(';')[0].strip()}",
            "unsupported_media_type",
        )
    return None


def _same_origin(origin: str, host: str) -> bool:
    netloc = urlsplit(origin).netloc.lower()
    return bool(netloc) and netloc == host.strip().lower()

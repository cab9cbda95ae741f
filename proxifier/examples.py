"""The "Try it" lines `proxifier serve` prints: a curl and a Python line that work as printed,
with the key they need when auth is on and an address a client can reach when the server listens
on every interface. Pure but for `reachable_host`, which asks the OS for this host's address."""

from __future__ import annotations

import json
import shlex
import socket
import sys

from proxifier.auth import ADMIN, required_permissions
from proxifier.config import AuthConfig

KEY_VARIABLE = "PROXIFIER_API_KEY"
ALL_INTERFACES = frozenset({"0.0.0.0", "::", ""})


def reachable_host(host: str) -> str:
    """The address to print for a server bound to `host`: itself, unless it is every
    interface, which no client can connect to: then this host's outward address (the one a
    route to the outside would use; nothing is sent), else its name, else loopback."""
    if host not in ALL_INTERFACES:
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:  # no route at all (an isolated host)
            address = ""
    if address and address != "0.0.0.0":
        return address
    name = socket.gethostname()
    try:
        socket.getaddrinfo(name, None)
    except OSError:
        return "127.0.0.1"
    return name


def key_names(auth: AuthConfig) -> list[str]:
    """The keys that may send inference requests (the permission table's chat row, or
    admin), to say which one to use."""
    opening = (required_permissions("POST", "/v1/chat/completions") or frozenset()) | {ADMIN}
    return sorted(
        name
        for name, entry in auth.api_keys.items()
        if opening & {str(p) for p in entry.permissions}
    )


def try_it(base_url: str, model: str, auth: AuthConfig, python: str = sys.executable) -> list[str]:
    """The lines to print under "Try it:". `python`: the interpreter the last one names (the
    one serving, which has the OpenAI client: no virtual environment to activate first)."""
    chat = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}]})
    curl = f"curl {base_url}/v1/chat/completions -H 'Content-Type: application/json'"
    lines = []
    if auth.enabled:
        names = key_names(auth)
        which = f" (one of: {', '.join(names)})" if names else ""
        lines.append(f"auth is on: export {KEY_VARIABLE}=<a key with the models permission>{which}")
        curl += f' -H "Authorization: Bearer ${KEY_VARIABLE}"'
        key = f'os.environ["{KEY_VARIABLE}"]'
    else:
        key = '"none"'  # the client insists on one; the server asks for none
    lines.append(f"{curl} -d {shlex.quote(chat)}")
    code = (
        "import os; from openai import OpenAI; "
        f'c = OpenAI(base_url="{base_url}/v1", api_key={key}); '
        f'r = c.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hi"}]); '
        "print(r.choices[0].message.content)"
    )
    lines.append(f"{shlex.quote(python)} -c {shlex.quote(code)}")
    return lines

"""A local stand-in for the Hugging Face Hub (no network here): the paths and headers
`huggingface_hub` reads to download a file and list a repository, pointed to with HF_ENDPOINT.

It serves files from memory, answers unknown repositories and files the way the Hub does
(404 with `X-Error-Code`/`X-Error-Message`), honours `Range` (resumed downloads), can require
a token for a private repository, and can hold a file's second half until a test lets it go,
so a test sees a download in progress without timing anything."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")
INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(/revision/(?P<revision>[^/]+))?$")


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None  # private: this bearer token is needed
    commit: str = ""

    def __post_init__(self) -> None:
        digest = hashlib.sha1(json.dumps(sorted(self.files)).encode()).hexdigest()
        self.commit = self.commit or digest


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    # (repo, file) -> released when the test lets the file's second half go
    holds: dict[tuple[str, str], threading.Event] = field(default_factory=dict)
    downloads: list[tuple[str, str]] = field(default_factory=list)  # GETs of file bodies
    url: str = ""

    def hold(self, repo: str, file: str) -> threading.Event:
        """Serve half of the file, then wait for the returned event."""
        gate = self.holds[(repo, file)] = threading.Event()
        return gate


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _repo(self, name: str) -> Repo | None:
            repo = hub.repos.get(name)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
                return None
            return repo

        def do_HEAD(self) -> None:
            self._resolve(body=False)

        def do_GET(self) -> None:
            info = INFO.match(self.path.split("?")[0])
            if info:
                repo = self._repo(info["repo"])
                if repo is not None:
                    data = json.dumps({
                        "id": info["repo"],
                        "modelId": info["repo"],
                        "sha": repo.commit,
                        "private": repo.token is not None,
                        "siblings": [{"rfilename": name} for name in sorted(repo.files)],
                    }).encode()  # fmt: skip
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                return
            self._resolve(body=True)

        def _resolve(self, body: bool) -> None:
            match = RESOLVE.match(self.path.split("?")[0])
            if not match:
                self._error(404, "EntryNotFound", f"no route {self.path}")
                return
            repo = self._repo(match["repo"])
            if repo is None:
                return
            data = repo.files.get(match["file"])
            if data is None:
                self._error(404, "EntryNotFound", f"{match['file']} does not exist on main")
                return
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if ranged and body:
                start = int(ranged[1])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            hub.downloads.append((match["repo"], match["file"]))
            gate = hub.holds.get((match["repo"], match["file"]))
            if gate is None:
                self.wfile.write(data[start:])
                return
            half = max(start, len(data) // 2)
            self.wfile.write(data[start:half])
            self.wfile.flush()
            gate.wait(120)  # the test's own deadline is shorter; this only bounds a stray thread
            self.wfile.write(data[half:])

    return Handler


@contextmanager
def running_hub(host: str = "127.0.0.1") -> Iterator[FakeHub]:
    """A FakeHub listening on a free port until the block ends; its `url` is HF_ENDPOINT."""
    hub = FakeHub()
    server = ThreadingHTTPServer((host, 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        for gate in hub.holds.values():
            gate.set()
        server.shutdown()
        server.server_close()

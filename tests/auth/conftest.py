"""The product with auth on: the seed's auth.yaml example plus one key per permission."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import deployed

KEYS = {
    "admin": "k-admin",
    "models": "k-models",
    "config": "k-config",
    "read": "k-read",
}


def auth_config(extra_keys: dict[str, Any] | None = None) -> dict[str, Any]:
    seed = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "configs" / "auth.yaml").read_text()
    )
    keys = seed["api_keys"]
    for permission, key in KEYS.items():
        keys[f"{permission}-only"] = {"key": key, "permissions": [permission]}
    keys["chat-only-key"] = {"key": "k-chat-only", "permissions": ["models"], "models": ["chat"]}
    keys["burst-key"] = {"key": "k-burst", "permissions": ["read"]}
    keys["claude-key"] = {"key": "k-claude", "permissions": ["models"]}
    keys.update(extra_keys or {})
    seed["rate_limits"]["burst"] = 5
    seed["rate_limits"]["claude"] = 2
    seed["cors_origins"] = ["https://app.example.com"]
    return seed


@dataclass
class Secured:
    url: str
    controller: Any
    auth_path: Path

    def write_auth(self, data: dict[str, Any]) -> None:
        self.auth_path.write_text(yaml.safe_dump(data))


@pytest.fixture(scope="package")
def secured(
    proxifier_home: Path,
    fake_server: Path,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Secured]:
    folder = tmp_path_factory.mktemp("secured")
    fake = {"model_path": str(tiny_model), "llama_server": str(fake_server), "num_gpus": 0}
    (folder / "auth.yaml").write_text(yaml.safe_dump(auth_config()))
    (folder / "models.yaml").write_text(
        yaml.safe_dump(
            {
                "settings": {"auth_file": "auth.yaml"},
                "models": {"chat": {**fake, "preload": True}, "other": fake},
            }
        )
    )
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    with deployed(
        proxifier_home, folder / "models.yaml", replicas=2, ready="chat", headers=admin
    ) as (url, controller):
        yield Secured(url, controller, folder / "auth.yaml")

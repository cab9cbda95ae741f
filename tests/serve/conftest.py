"""One deployment of the whole product (two ingress replicas, the controller, fake and real
llama-servers) shared by the tests of this package."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import deployed


@dataclass
class Deployment:
    url: str
    controller: Any
    config_path: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def status(self, model: str) -> dict[str, Any]:
        return httpx.get(f"{self.url}/admin/models/{model}/status", timeout=30).json()


def models_config(fake: Path, real: str, tiny: Path, hub_url: str, cache: Path) -> dict[str, Any]:
    def fake_model(**fields: Any) -> dict[str, Any]:
        return {"model_path": str(tiny), "llama_server": str(fake), "num_gpus": 0, **fields}

    def from_hub(repo: str, **fields: Any) -> dict[str, Any]:
        model = fake_model(hf_repo=repo, env={"HF_ENDPOINT": hub_url}, **fields)
        del model["model_path"]
        return model

    return {
        "settings": {
            "model_cache": str(cache),
            "max_body_size": "64KiB",
            "max_json_keys": 100,
            "body_timeout": 3,
            "queue": {"keepalive_interval": 0.5},
        },
        "models": {
            "chat": fake_model(
                aliases=["gpt-4o-mini"],
                parallel=4,
                preload=True,
                resource_group="production",
                priority=9,
            ),
            "real": {
                "model_path": str(tiny),
                "llama_server": real,
                "num_gpus": 0,
                "embeddings": True,
                "context_length": 1024,
                "parallel": 2,
            },
            "rerank": {
                "model_path": str(tiny),
                "llama_server": real,
                "num_gpus": 0,
                "reranking": True,
                "context_length": 512,
                "parallel": 1,
            },
            # The seed's way to ask for embeddings or reranking: flags in additional_args
            # (string and list form), which count as the fields.
            "seed-embed": {
                "model_path": str(tiny),
                "llama_server": real,
                "num_gpus": 0,
                "additional_args": "--embeddings --pooling mean",
                "context_length": 512,
                "parallel": 1,
            },
            "seed-rerank": fake_model(additional_args=["--rerank"]),
            "nofim": fake_model(env={"FAKE_LLAMA_NO_FIM": "1"}),
            "slowstream": fake_model(env={"FAKE_LLAMA_TOKEN_DELAY": "0.3"}),
            "sleepy": fake_model(env={"FAKE_LLAMA_TOKEN_DELAY": "5"}, upstream_timeout=2),
            # Its first token (and with it the headers) takes 3 s, within upstream_timeout;
            # the 3 s to the next one are past its upstream_idle_timeout.
            "stalls": fake_model(
                env={"FAKE_LLAMA_TOKEN_DELAY": "3"}, upstream_timeout=30, upstream_idle_timeout=1
            ),
            "loading": fake_model(env={"FAKE_LLAMA_LOAD_DELAY": "3"}, parallel=1),
            "tight": fake_model(
                # queue_timeout: long enough that a second request surely finds the queue
                # full on a loaded machine, short enough to wait out in a test.
                env={"FAKE_LLAMA_LOAD_DELAY": "60"},
                parallel=1,
                max_queue_size=1,
                queue_timeout=10,
            ),
            "crashy": fake_model(env={"FAKE_LLAMA_CRASH_AFTER": "0"}),
            "broken": fake_model(env={"FAKE_LLAMA_FAIL_LOAD": "error: corrupt model (fake)"}),
            "qwen-32b": fake_model(resource_group="production", priority=8),
            "model-name": fake_model(resource_group="development", priority=3),
            "hf": from_hub("proxifier-tests/tiny-GGUF", hf_file="tiny-Q8_0.gguf"),
            "hf-tagged": from_hub("proxifier-tests/tiny-GGUF:Q4_K_M"),
            "hf-missing": from_hub("proxifier-tests/no-such-repo", hf_file="model.gguf"),
        },
    }


@pytest.fixture(scope="package")
def deployment(
    proxifier_home: Path,
    fake_server: Path,
    real_server: str,
    tiny_model: Path,
    hub: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("serve")
    path = folder / "models.yaml"
    config = models_config(fake_server, real_server, tiny_model, hub.url, folder / "model-cache")
    path.write_text(yaml.safe_dump(config))
    with deployed(proxifier_home, path, replicas=2, ready="chat") as (url, controller):
        yield Deployment(url, controller, path)


os.environ.setdefault("RAY_AUTH_MODE", "disabled")

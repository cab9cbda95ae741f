"""The deployment files as the tests read them: configs/serve.yaml, and the ConfigMap and the
RayService of deploy/kuberay/rayservice.yaml."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SERVE_YAML = REPO / "configs" / "serve.yaml"
RAYSERVICE_YAML = REPO / "deploy" / "kuberay" / "rayservice.yaml"


def serve_yaml() -> dict[str, Any]:
    return yaml.safe_load(SERVE_YAML.read_text())


def kuberay_documents() -> dict[str, dict[str, Any]]:
    """The file's documents by kind (it holds one of each)."""
    documents = [d for d in yaml.safe_load_all(RAYSERVICE_YAML.read_text()) if d]
    kinds = [d["kind"] for d in documents]
    assert sorted(kinds) == ["ConfigMap", "RayService"], kinds
    return {d["kind"]: d for d in documents}


def rayservice() -> dict[str, Any]:
    return kuberay_documents()["RayService"]


def configmap() -> dict[str, Any]:
    return kuberay_documents()["ConfigMap"]


def serve_config_v2(service: dict[str, Any]) -> dict[str, Any]:
    """serveConfigV2 is a string holding YAML (KubeRay sends it to Serve as it is)."""
    text = service["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string (`|` block), not a map"
    return yaml.safe_load(text)


def groups(service: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, group spec) for the head group and each worker group."""
    cluster = service["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """The Ray container: KubeRay runs Ray in the pod's first container."""
    return group["template"]["spec"]["containers"][0]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


@dataclass(frozen=True)
class Mounted:
    volume: dict[str, Any]
    mount: dict[str, Any]

    def file(self, key: str) -> PurePosixPath:
        """Where the container sees `key` of the volume's ConfigMap or Secret."""
        if self.mount.get("subPath"):
            assert self.mount["subPath"] == key, (self.mount, key)
            return PurePosixPath(self.mount["mountPath"])
        return PurePosixPath(self.mount["mountPath"]) / key


def mounted(group: dict[str, Any], source: str, name: str) -> Mounted | None:
    """The Ray container's mount of the `source` volume ("configMap", "secret",
    "persistentVolumeClaim") named `name`, if it has one."""
    volumes = group["template"]["spec"].get("volumes", [])
    names = {"configMap": "name", "secret": "secretName", "persistentVolumeClaim": "claimName"}
    for volume in volumes:
        if volume.get(source, {}).get(names[source]) != name:
            continue
        for mount in ray_container(group).get("volumeMounts", []):
            if mount["name"] == volume["name"]:
                return Mounted(volume, mount)
    return None


def start_resources(group: dict[str, Any]) -> dict[str, float]:
    """The custom resources `ray start` gets from rayStartParams.resources, read the way KubeRay
    reads it (quotes around the JSON trimmed, pod.go getResourcesMap)."""
    text = group.get("rayStartParams", {}).get("resources")
    return {} if text is None else json.loads(text.strip("'\"` "))

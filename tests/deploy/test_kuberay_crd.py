"""deploy/kuberay/rayservice.yaml against KubeRay's RayService CRD and the operator's own checks,
offline: the field names below were read from KubeRay v1.7.0 (2026-08-19),
ray-operator/config/crd/bases/ray.io_rayservices.yaml (version v1) and
ray-operator/controllers/ray/utils/validation.go. The API server prunes an unknown field without
a word (and `kubectl apply` only warns), so a misspelt `minReplica` would quietly not apply:
here it fails."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import (
    configmap,
    groups,
    ray_container,
    rayservice,
    serve_config_v2,
    start_resources,
)


def names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Every property the CRD knows at each path this file writes to (all of them, so that a
# misspelling is never taken for some other field), and the ones it requires.
RCC = "spec.rayClusterConfig"
FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "": (names("apiVersion kind metadata spec status"), names("")),
    "spec": (
        names(
            "deploymentUnhealthySecondThreshold excludeHeadPodFromServeSvc managedBy "
            "rayClusterConfig rayClusterDeletionDelaySeconds serveConfigV2 serveService "
            "serviceUnhealthySecondThreshold suspend upgradeStrategy"
        ),
        names("rayClusterConfig"),
    ),
    RCC: (
        names(
            "authOptions autoscalerOptions enableInTreeAutoscaling gcsFaultToleranceOptions "
            "headGroupSpec headServiceAnnotations historyServerOptions managedBy networkPolicy "
            "rayVersion suspend tlsOptions upgradeStrategy workerGroupSpecs"
        ),
        names("headGroupSpec"),
    ),
    f"{RCC}.authOptions": (names("enableK8sTokenAuth mode secretName"), names("")),
    f"{RCC}.headGroupSpec": (
        names(
            "enableIngress headService ingressOptions labels rayStartParams resources "
            "serviceType template"
        ),
        names("template"),
    ),
    f"{RCC}.workerGroupSpecs[]": (
        names(
            "groupName idleTimeoutSeconds labels maxReplicas minReplicas numOfHosts priority "
            "rayStartParams replicas resources scaleStrategy suspend template"
        ),
        names("groupName maxReplicas minReplicas template"),
    ),
}
# The pod template is the same schema under both groups (core/v1 PodTemplateSpec).
POD = {
    ".template": (names("metadata spec"), names("")),
    ".template.spec": (
        names(
            "activeDeadlineSeconds affinity automountServiceAccountToken containers dnsConfig "
            "dnsPolicy enableServiceLinks ephemeralContainers hostAliases hostIPC hostNetwork "
            "hostPID hostUsers hostname hostnameOverride imagePullSecrets initContainers "
            "nodeName nodeSelector os overhead preemptionPolicy priority priorityClassName "
            "readinessGates resourceClaims resources restartPolicy runtimeClassName "
            "schedulerName schedulingGates schedulingGroup securityContext serviceAccount "
            "serviceAccountName setHostnameAsFQDN shareProcessNamespace subdomain "
            "terminationGracePeriodSeconds tolerations topologySpreadConstraints volumes"
        ),
        names("containers"),
    ),
    ".template.spec.containers[]": (
        names(
            "args command env envFrom image imagePullPolicy lifecycle livenessProbe name ports "
            "readinessProbe resizePolicy resources restartPolicy restartPolicyRules "
            "securityContext startupProbe stdin stdinOnce terminationMessagePath "
            "terminationMessagePolicy tty volumeDevices volumeMounts workingDir"
        ),
        names("name"),
    ),
    ".template.spec.containers[].env[]": (names("name value valueFrom"), names("name")),
    ".template.spec.containers[].ports[]": (
        names("containerPort hostIP hostPort name protocol"),
        names("containerPort"),
    ),
    ".template.spec.containers[].resources": (names("claims limits requests"), names("")),
    ".template.spec.containers[].volumeMounts[]": (
        names("mountPath mountPropagation name readOnly recursiveReadOnly subPath subPathExpr"),
        names("mountPath name"),
    ),
    ".template.spec.volumes[]": (
        names(
            "awsElasticBlockStore azureDisk azureFile cephfs cinder configMap csi downwardAPI "
            "emptyDir ephemeral fc flexVolume flocker gcePersistentDisk gitRepo glusterfs "
            "hostPath image iscsi name nfs persistentVolumeClaim photonPersistentDisk "
            "portworxVolume projected quobyte rbd scaleIO secret storageos vsphereVolume"
        ),
        names("name"),
    ),
    ".template.spec.volumes[].configMap": (names("defaultMode items name optional"), names("")),
    ".template.spec.volumes[].secret": (
        names("defaultMode items optional secretName"),
        names(""),
    ),
    ".template.spec.volumes[].persistentVolumeClaim": (
        names("claimName readOnly"),
        names("claimName"),
    ),
}
for group_path in (f"{RCC}.headGroupSpec", f"{RCC}.workerGroupSpecs[]"):
    FIELDS.update({group_path + suffix: known for suffix, known in POD.items()})

# Leaves whose type the CRD fixes: maps of strings (`additionalProperties: {type: string}`),
# int32s, strings; resource quantities are int-or-string.
STRING_MAPS = ("rayStartParams", "labels", "nodeSelector")
INTEGERS = {"replicas", "minReplicas", "maxReplicas", "containerPort", "numOfHosts"}
STRINGS = {"serveConfigV2", "rayVersion", "groupName", "image", "mountPath", "subPath"}
ENUMS = {f"{RCC}.authOptions.mode": {"disabled", "token"}}
GPU = "nvidia.com/gpu"  # the NVIDIA device plugin's resource name


def problems(document: Any, path: str = "") -> list[str]:
    """Every unknown or missing field and every mistyped leaf, by path."""
    found: list[str] = []
    if isinstance(document, dict):
        known = FIELDS.get(path)
        if known is not None:
            fields, required = known
            found += [f"{path}: unknown field {k!r}" for k in sorted(set(document) - fields)]
            found += [f"{path}: missing {k!r}" for k in sorted(required - set(document))]
        for key, value in document.items():
            child = f"{path}.{key}" if path else key
            if key in STRING_MAPS and isinstance(value, dict) and known is not None:
                found += [
                    f"{child}.{k}: {v!r} is not a string"
                    for k, v in value.items()
                    if not isinstance(v, str)
                ]
            elif key in INTEGERS and not isinstance(value, int):
                found.append(f"{child}: {value!r} is not an integer")
            elif key in STRINGS and not isinstance(value, str):
                found.append(f"{child}: {value!r} is not a string")
            if child in ENUMS and value not in ENUMS[child]:
                found.append(f"{child}: {value!r} is not one of {sorted(ENUMS[child])}")
            found += problems(value, child)
    elif isinstance(document, list):
        for item in document:
            found += problems(item, f"{path}[]")
    return found


def test_the_rayservice_uses_only_fields_the_crd_has() -> None:
    service = rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert problems(service) == []


WORKER_POD = ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec")


@pytest.mark.parametrize(
    ("where", "wrong"),
    [
        (("spec",), "serveConfigv2"),
        (("spec", "rayClusterConfig", "headGroupSpec"), "rayStartParam"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0), "minReplica"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0), "groupname"),
        (WORKER_POD, "volume"),
        ((*WORKER_POD, "containers", 0, "volumeMounts", 0), "mountpath"),
    ],
)
def test_a_misspelt_field_is_caught(where: tuple[str | int, ...], wrong: str) -> None:
    service = copy.deepcopy(rayservice())
    node: Any = service
    for step in where:
        node = node[step]
    right = next(k for k in node if k.lower().rstrip("s") == wrong.lower().rstrip("s"))
    node[wrong] = node.pop(right)
    assert problems(service), f"{right} -> {wrong} went unnoticed"


def test_a_mistyped_value_is_caught() -> None:
    service = copy.deepcopy(rayservice())
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    worker["rayStartParams"]["num-gpus"] = 1  # YAML `1`, not "1": the API server refuses it
    assert problems(service)


# --- what the operator checks beyond the schema (validation.go, KubeRay v1.5+) ----------------


def test_groups_pass_the_operators_checks() -> None:
    service = rayservice()
    for name, group in groups(service):
        params = group.get("rayStartParams", {})
        assert "labels" not in params, f"{name}: KubeRay refuses rayStartParams.labels"
        start_keys = {"num-cpus", "num-gpus", "memory", "resources"} & set(params)
        assert not (start_keys and group.get("resources")), f"{name}: resources set twice"
        for key, value in group.get("labels", {}).items():  # they become pod labels too
            assert re.fullmatch(r"([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", key)
            assert re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", value), value
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    cluster = service["spec"]["rayClusterConfig"]
    if cluster.get("authOptions", {}).get("mode") == "token":
        major, minor = (int(part) for part in cluster["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 52), "token auth needs Ray 2.52+"


def test_gpu_workers_declare_what_their_pods_get() -> None:
    workers = [group for name, group in groups(rayservice()) if name != "head"]
    assert workers
    for group in workers:
        limits = ray_container(group)["resources"]["limits"]
        assert GPU in limits, f"{group['groupName']}: no {GPU} limit"
        assert int(group["rayStartParams"]["num-gpus"]) == int(limits[GPU])
        assert all(isinstance(q, int | float) for q in start_resources(group).values())


def test_ray_version_is_the_one_this_package_runs() -> None:
    import ray

    assert rayservice()["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_configmap_is_a_configmap_of_strings() -> None:
    data = configmap()
    assert (data["apiVersion"], data["kind"]) == ("v1", "ConfigMap")
    assert set(data) <= {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"}
    assert all(isinstance(v, str) for v in data["data"].values())
    assert yaml.safe_load(data["data"]["models.yaml"])
    # serveConfigV2 parses on its own too (the other test file checks it against Serve).
    assert serve_config_v2(rayservice())["applications"]

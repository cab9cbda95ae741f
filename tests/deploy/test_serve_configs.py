"""configs/serve.yaml and the RayService's serveConfigV2 are Serve configs that Ray accepts, for
this application: the builder they name, the models.yaml they hand it, and the runtime env
that the hardening hook and Serve's throughput settings need (issue 16). No Ray cluster."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from proxifier.config import ModelsConfig, load_models_config
from proxifier.startup import serve_environment
from serve_app.app import build_app, config_path
from serve_app.worker_setup import HOOK
from tests.deploy.manifests import (
    REPO,
    configmap,
    container_env,
    groups,
    mounted,
    ray_container,
    rayservice,
    serve_config_v2,
    serve_yaml,
    start_resources,
)

# What `proxifier serve` runs Serve with (serve_app/run.py): HAProxy in front, throughput mode.
SERVE_ENV = serve_environment(haproxy=True)


def the_app(schema: ServeDeploySchema) -> ServeApplicationSchema:
    assert [app.name for app in schema.applications] == ["proxifier"]
    return schema.applications[0]


def imported(import_path: str) -> Any:
    """What Serve imports for `module:attribute` (the form both files use)."""
    module, colon, attribute = import_path.partition(":")
    assert colon, f"{import_path!r}: write module:attribute"
    return getattr(importlib.import_module(module), attribute)


def env_subset(env: dict[str, str]) -> dict[str, str | None]:
    return {name: env.get(name) for name in SERVE_ENV}


@pytest.fixture(scope="module")
def local() -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(serve_yaml())


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    return rayservice()


@pytest.fixture(scope="module")
def kube(service: dict[str, Any]) -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(serve_config_v2(service))


@pytest.fixture
def kube_models(tmp_path: Path) -> ModelsConfig:
    """The ConfigMap's models.yaml through the product's own loader (what build_app runs)."""
    file = tmp_path / "models.yaml"
    file.write_text(configmap()["data"]["models.yaml"])
    return load_models_config(file)


# --- configs/serve.yaml ----------------------------------------------------------------------


def test_serve_yaml_builds_this_application(local: ServeDeploySchema) -> None:
    app = the_app(local)
    assert imported(app.import_path) is build_app
    assert app.route_prefix == "/"
    assert int(app.args["replicas"]) >= 1


def test_serve_yaml_config_is_found_from_any_folder(
    local: ServeDeploySchema, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `serve deploy` builds the app in a Ray worker that does not run in the repository.
    monkeypatch.chdir(tmp_path)
    path = config_path(the_app(local).args["config"])
    assert path == REPO / "configs" / "demo.yaml"
    assert load_models_config(path).models


def test_a_relative_config_in_the_current_folder_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "configs").mkdir()
    own = tmp_path / "configs" / "demo.yaml"
    own.write_text("models: {}\n")
    monkeypatch.chdir(tmp_path)
    assert config_path("configs/demo.yaml") == own  # `serve run` from the user's own folder
    assert config_path(str(own)) == own
    # Found nowhere: the path as asked, from here, so that the loader's error names it.
    assert config_path("configs/absent.yaml") == tmp_path / "configs" / "absent.yaml"


def hook_of(runtime_env: dict[str, Any]) -> str:
    """The setup hook an application's workers run. Ray 2.60 converts the
    `worker_process_setup_hook` field into this variable only in ray.init's job runtime env, so
    the file sets the variable itself (and the field, which must agree with it)."""
    variable = runtime_env["env_vars"][WORKER_PROCESS_SETUP_HOOK_ENV_VAR]
    assert runtime_env.get("worker_process_setup_hook", variable) == variable
    return variable


def test_serve_yaml_runtime_env_has_the_hook_and_serve_settings(local: ServeDeploySchema) -> None:
    runtime_env = the_app(local).runtime_env
    assert hook_of(runtime_env) == HOOK
    assert env_subset(runtime_env["env_vars"]) == SERVE_ENV
    # The Serve controller reads them at its start, and its proxies and HAProxy inherit them;
    # its proxy (HAProxy's fallback) takes HTTP too, so it runs the hook as well.
    assert local.controller_options is not None
    assert local.controller_options.runtime_env is not None
    assert hook_of(local.controller_options.runtime_env) == HOOK
    assert env_subset(local.controller_options.runtime_env["env_vars"]) == SERVE_ENV


def test_serve_yaml_binds_loopback_without_auth(local: ServeDeploySchema) -> None:
    # The demo has no auth file: the product only serves loopback then (README).
    demo = load_models_config(REPO / "configs" / "demo.yaml")
    assert demo.settings.auth_file is None
    assert local.http_options.host == "127.0.0.1"


# --- the RayService ----------------------------------------------------------------------------


def test_rayservice_serve_config_builds_this_application(kube: ServeDeploySchema) -> None:
    app = the_app(kube)
    assert imported(app.import_path) is build_app
    assert hook_of(app.runtime_env) == HOOK
    assert env_subset(app.runtime_env["env_vars"]) == SERVE_ENV
    # The Serve controller takes Serve's settings from the pods' env; the hook from here.
    assert kube.controller_options is not None and kube.controller_options.runtime_env
    assert hook_of(kube.controller_options.runtime_env) == HOOK


def test_rayservice_and_serve_yaml_describe_the_same_application(
    kube: ServeDeploySchema, local: ServeDeploySchema
) -> None:
    ours, theirs = the_app(local), the_app(kube)
    assert (theirs.import_path, theirs.route_prefix) == (ours.import_path, ours.route_prefix)
    assert theirs.runtime_env == ours.runtime_env
    assert kube.http_options.request_timeout_s == local.http_options.request_timeout_s


def test_every_container_starts_serve_with_the_apps_settings(service: dict[str, Any]) -> None:
    # The Serve controller, its proxies and HAProxy take them from the pod (KubeRay starts the
    # controller); each replica reads them again from the app's runtime_env: they must agree.
    for name, group in groups(service):
        assert env_subset(container_env(ray_container(group))) == SERVE_ENV, name


def test_args_config_is_the_configmap_file_on_every_pod(
    kube: ServeDeploySchema, service: dict[str, Any]
) -> None:
    # The builder may run on any node, and it reads the file where it runs.
    config = the_app(kube).args["config"]
    assert Path(config).is_absolute()
    data = configmap()
    name, keys = data["metadata"]["name"], set(data["data"])
    for group_name, group in groups(service):
        mount = mounted(group, "configMap", name)
        assert mount is not None, f"{group_name}: ConfigMap {name} is not mounted"
        assert "models.yaml" in keys
        assert str(mount.file("models.yaml")) == config, group_name


def test_configmap_models_yaml_passes_the_config_loader(kube_models: ModelsConfig) -> None:
    assert kube_models.models
    # Reachable inside the cluster, so API keys are on: the file comes from a Secret on the
    # head, where the controller reads it.
    assert kube_models.settings.host == "0.0.0.0"
    auth = kube_models.auth_path()
    assert auth is not None and auth.is_absolute()
    head = dict(groups(rayservice()))["head"]
    secret = mounted(head, "secret", "proxifier-auth")
    assert secret is not None and str(secret.file(auth.name)) == str(auth)


def selector_matches(selector: str, value: str | None) -> bool:
    """Ray's label selector values: `v`, `!v`, `in(a,b)`, `!in(a,b)`."""
    negated = selector.startswith("!")
    body = selector[1:] if negated else selector
    wanted = set(body[3:-1].split(",")) if body.startswith("in(") else {body}
    return (value not in wanted) if negated else (value in wanted)


def test_every_model_fits_some_worker_group(kube_models: ModelsConfig) -> None:
    # A model no node can hold waits for placement forever: its labels and resources must be
    # what some group's `ray start` declares.
    workers = [group for name, group in groups(rayservice()) if name != "head"]

    def holds(group: dict[str, Any], labels: dict[str, str], resources: dict[str, float]) -> bool:
        node_labels, node_resources = group.get("labels", {}), start_resources(group)
        return all(selector_matches(s, node_labels.get(k)) for k, s in labels.items()) and all(
            node_resources.get(r, 0) >= q for r, q in resources.items()
        )

    for name, model in kube_models.models.items():
        fits = [group for group in workers if holds(group, model.labels, model.resources)]
        assert fits, f"model {name}: no worker group has {model.labels} and {model.resources}"


def test_model_files_are_on_every_pod(kube_models: ModelsConfig) -> None:
    # The controller (head) reads each file's header to size it; llama-server (GPU worker)
    # loads it: the volume is mounted at the same place on both.
    for group_name, group in groups(rayservice()):
        claim = mounted(group, "persistentVolumeClaim", "proxifier-models")
        assert claim is not None, group_name
        root = Path(claim.mount["mountPath"])
        for name, model in kube_models.models.items():
            path = Path(model.model_path or "")
            assert path.is_absolute() and path.is_relative_to(root), (group_name, name, path)

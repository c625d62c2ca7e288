"""The KubeRay manifests (deploy/kuberay/) and the image (deploy/Dockerfile), checked offline.

Core objects are validated against the pinned Kubernetes version's OpenAPI schemas
(kubernetes-validate, strict: an unknown field is an error). The RayCluster is a custom
resource those schemas do not cover, so its pod templates are validated as core
PodTemplates, and what ties the files to txproc is checked against txproc itself: the
commands parse with `txproc serve`'s own parser, the ports are the ones it listens on, the
Ray version is the locked one, the Services select pods that exist and name ports they have.
The image is built only where a container runtime answers.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from actors.app.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
# The Kubernetes version the manifests are written for (docs/operations.md).
KUBERNETES_VERSION = "1.34.0"
IMAGE_UID = 10001


def _documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _ray_cluster() -> dict[str, Any]:
    (cluster,) = [d for d in _documents() if d["kind"] == "RayCluster"]
    return cluster


def _groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return list(group["template"]["spec"]["containers"])


def _locked(name: str) -> str:
    lock = (ROOT / "deploy" / "requirements" / "service.txt").read_text()
    found = re.search(rf"^{re.escape(name)}==([^\s\\]+)", lock, re.MULTILINE)
    assert found, name
    return found.group(1)


def test_core_objects_are_valid_for_the_pinned_kubernetes() -> None:
    core = [d for d in _documents() if d["kind"] != "RayCluster"]
    assert {d["kind"] for d in core} >= {"Service", "NetworkPolicy"}
    for doc in core:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_pod_template_of_the_ray_cluster_is_a_valid_pod_template() -> None:
    cluster = _ray_cluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    for group in _groups(cluster):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "txproc"},
             "template": group["template"]}, KUBERNETES_VERSION, strict=True)


def test_a_validation_failure_is_reported() -> None:
    """The check can fail: a misspelt field of a pod template is an error."""
    template = _groups(_ray_cluster())[0]["template"]
    broken = {**template, "spec": {**template["spec"], "containerz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "txproc"},
             "template": broken}, KUBERNETES_VERSION, strict=True)


def test_ray_version_and_image_match_the_locks_and_the_project() -> None:
    cluster = _ray_cluster()
    assert cluster["spec"]["rayVersion"] == _locked("ray")
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                        re.MULTILINE)
    assert version
    images = {c["image"] for g in _groups(cluster)
              for c in [*_containers(g), *g["template"]["spec"].get("initContainers", [])]}
    assert images == {f"txproc:{version.group(1)}"}


def test_the_head_runs_serve_with_flags_serve_accepts() -> None:
    (head,) = _containers(_ray_cluster()["spec"]["headGroupSpec"])
    script = " ".join(head["args"])
    command = script[script.index("exec txproc serve") + len("exec txproc "):]
    argv = shlex.split(command.split(";")[0])
    args = _parser().parse_args(argv)  # exits (SystemExit) on a flag serve does not have
    assert args.command == "serve" and args.ray_address == "auto" and args.host == "0.0.0.0"
    assert args.key_file.endswith("/jwt.keys")
    mounts = {m["mountPath"] for m in head["volumeMounts"]}
    assert str(Path(args.key_file).parent) in mounts and args.data_dir in mounts
    defaults = _parser().parse_args(["serve"])
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports == {"http": defaults.http_port, "rpc": defaults.rpc_port,
                     "metrics": args.metrics_port}


def test_every_pod_is_ready_only_when_its_front_is_and_runs_unprivileged() -> None:
    for group in _groups(_ray_cluster()):
        spec = group["template"]["spec"]
        assert spec["securityContext"]["runAsUser"] == IMAGE_UID
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in _containers(group):
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz",
                                                              "port": "http"}
            assert container["resources"]["requests"]["cpu"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            env = {e["name"]: e for e in container.get("env", [])}
            assert "secretKeyRef" in env["TXPROC_DATABASE_URL"]["valueFrom"], \
                "the database URL (with its password) comes from a Secret"


def test_services_select_pods_and_ports_that_exist() -> None:
    cluster = _ray_cluster()
    pod_labels = [{**g["template"]["metadata"]["labels"],
                   "ray.io/cluster": cluster["metadata"]["name"]}  # set by the operator
                  for g in _groups(cluster)]
    port_names = {p["name"] for g in _groups(cluster) for c in _containers(g)
                  for p in c["ports"]}
    services = [d for d in _documents() if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} >= {"txproc-http", "txproc-rpc"}
    for service in services:
        selector = service["spec"]["selector"]
        matched = [labels for labels in pod_labels
                   if all(labels.get(k) == v for k, v in selector.items())]
        assert len(matched) == len(pod_labels), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, port


def test_no_secret_material_is_in_the_manifests() -> None:
    assert not [d for d in _documents() if d["kind"] == "Secret"]


def test_the_dockerfile_copies_what_exists_and_runs_as_the_manifests_uid() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / source).exists(), source
    assert "--require-hashes -r deploy/requirements/service.txt" in dockerfile
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in dockerfile
    packages = re.search(r"include = \[([^\]]+)\]", (ROOT / "pyproject.toml").read_text())
    assert packages
    for package in re.findall(r'"(\w+)\*"', packages.group(1)):
        assert f"COPY {package} {package}" in dockerfile, package


def _container_runtime() -> str | None:
    for runtime in ("docker", "podman"):
        if shutil.which(runtime) and subprocess.run(
                [runtime, "info"], capture_output=True, timeout=30, check=False).returncode == 0:
            return runtime
    return None


@pytest.mark.timeout(1800)
@pytest.mark.skipif(_container_runtime() is None, reason="no container runtime answers here")
def test_the_image_builds_and_runs_txproc() -> None:
    runtime = _container_runtime()
    assert runtime
    tag = "txproc:test-build"
    subprocess.run([runtime, "build", "-f", "deploy/Dockerfile", "-t", tag, "."], cwd=ROOT,
                   check=True, timeout=1700)
    done = subprocess.run([runtime, "run", "--rm", tag, "--help"], capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0 and "serve" in done.stdout

"""Kubernetes manifests for a plan: Kubernetes runs the pods and restarts them; Chorus renders.

Per node of the plan, a Triton Deployment pinned to that node (``kubernetes.io/hostname``)
with the plan's GPUs requested, and a Service. Its repository is rendered by an init container
(``chorus render --node``) from the ensemble's files, which a PersistentVolumeClaim holds
(``ensemble.yaml`` and the model files beside it, as on a workstation), into an emptyDir;
Triton then serves it with explicit model control and every API but health behind the key.
A node with GPUs runs NVIDIA's official Triton image (ONNX Runtime backend); a node without
runs the Chorus image's bundled Triton (``chorus node``).

The combiner is a Deployment of ``replicas`` pods behind a Service: each routes every member to
the nodes holding it (``combiner.json`` in a ConfigMap, the nodes named by their Services);
it scales horizontally. The plan in the ConfigMap numbers each node's GPUs as its pod sees
them: the device plugin hands a pod the number of GPUs it requests, numbered from 0, so the
GPUs a node's instances use become 0, 1, ... in the order of their host indices (which of the
node's GPUs the pod gets is the plugin's choice). The restricted-API key and the endpoint's
bearer token are Secrets. Every pod runs as a non-root user, without privilege escalation or
capabilities, with resource requests and limits.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from combiner import CascadeRoute
from orchestrator.deploying.launch import RESTRICTED
from orchestrator.errors import ChorusError
from orchestrator.planning.plan import Plan
from orchestrator.planning.spec import Ensemble

__all__ = ["TRITON_IMAGE", "as_pods_see_it", "render_kubernetes"]

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.12-py3"  # has the gRPC cancellation fix
_USER = 1000
_KEY_HEADER = "chorus-key"


def _dns(name: str) -> str:
    """A DNS-1123 label from a name (lowercase, digits, '-'); a name cut to 63 characters ends
    in a digest of the whole, so that two cut names differ."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if len(label) > 63:
        label = f"{label[:54].rstrip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return label or "x"


# what a kubelet registers as a node's kubernetes.io/hostname: a lowercase DNS label
_HOSTNAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?")


def _check_nodes(nodes: tuple[str, ...]) -> None:
    """ChorusError unless every node can be pinned by its hostname label."""
    for node in nodes:
        if not _HOSTNAME.fullmatch(node):
            raise ChorusError(
                f"node {node!r} cannot be a Kubernetes node's hostname (at most 63 lowercase "
                "letters, digits, '-' or '.', a letter or digit at each end): name the nodes "
                "in the hardware file as the cluster does"
            )


def _check_names(app: str, services: dict[str, str]) -> None:
    """ChorusError unless each node's Deployment and Service get a name of their own: two
    nodes named alike but for punctuation, or a node named 'combiner', would share one, and a
    node's Triton would be dropped without a word."""
    taken = {app: "the combiner's Service", f"{app}-combiner": "the combiner's Deployment"}
    for node, name in services.items():
        # its Service and Deployment, and its manifest's file and its pods' label
        for named in (name, f"node-{_dns(node)}.yaml"):
            other = taken.setdefault(named, f"node {node!r}")
            if other != f"node {node!r}":
                raise ChorusError(
                    f"node {node!r} would be named {named!r} in Kubernetes, as {other} is: "
                    "rename it in the hardware file"
                )


def _security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": _USER,
        "runAsGroup": _USER,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _probe(path: str, port: int, delay: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "initialDelaySeconds": delay,
        "periodSeconds": 5,
        "failureThreshold": 6,
    }


def render_kubernetes(
    ensemble: Ensemble,
    plan: Plan,
    out: Path,
    image: str = "chorus:latest",
    triton_image: str = TRITON_IMAGE,
    models_claim: str = "chorus-models",
    ensemble_path: str = "ensemble.yaml",
    replicas: int = 2,
    namespace: str | None = None,
    cascade: CascadeRoute | None = None,
) -> list[Path]:
    """Write the manifests into ``out`` (one file per kind of object); returns the files.
    ``ensemble_path``: where the ensemble file lies in the claim; ``cascade``: the combiner
    calls the members tier by tier. The two Secrets get fresh random values each time: apply
    them once, or replace them together with the pods."""
    plan = as_pods_see_it(plan)
    _check_nodes(plan.nodes())
    app = _dns(f"chorus-{ensemble.name}")
    meta: dict[str, Any] = {"namespace": namespace} if namespace else {}
    labels = {"app.kubernetes.io/name": "chorus", "app.kubernetes.io/instance": app}
    services = {n: _dns(f"{app}-{n}") for n in plan.nodes()}
    _check_names(app, services)
    files: dict[str, list[dict[str, Any]]] = {"secrets.yaml": [], "config.yaml": []}

    files["secrets.yaml"] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": f"{app}-triton-key", **meta, "labels": labels},
            "type": "Opaque",
            "stringData": {"key": secrets.token_hex(32)},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": f"{app}-token", **meta, "labels": labels},
            "type": "Opaque",
            "stringData": {"token": secrets.token_urlsafe(32)},
        },
    ]
    from orchestrator.deploying.up import (
        combiner_config,  # (up imports the launcher; only needed here)
    )

    config = combiner_config(
        ensemble,
        {n: f"{s}:8001" for n, s in services.items()},
        plan,
        key_file=Path("/etc/chorus/triton-key/key"),
        cascade=cascade,
    )
    config = config.model_copy(
        update={"rule_path": (str((PurePosixPath("/models") / ensemble_path).parent),)}
    )
    files["config.yaml"] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{app}-config", **meta, "labels": labels},
            "data": {
                "plan.json": plan.to_json(),
                "combiner.json": json.dumps(config.model_dump(mode="json"), indent=2) + "\n",
            },
        }
    ]
    key_volume = {"name": "triton-key", "secret": {"secretName": f"{app}-triton-key"}}
    config_volume = {"name": "config", "configMap": {"name": f"{app}-config"}}
    for node in plan.nodes():
        files[f"node-{_dns(node)}.yaml"] = _node(
            ensemble,
            plan,
            node,
            services[node],
            app,
            labels,
            meta,
            image,
            triton_image,
            models_claim,
            ensemble_path,
            key_volume,
            config_volume,
        )
    files["combiner.yaml"] = _combiner(
        app,
        labels,
        meta,
        image,
        replicas,
        key_volume,
        config_volume,
        models_claim,
        config.stop_s(),
        config.workers,
    )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, docs in files.items():
        path = out / name
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        if name == "secrets.yaml":
            path.chmod(0o600)
        written.append(path)
    return written


def as_pods_see_it(plan: Plan) -> Plan:
    """The plan with each node's GPUs renumbered as that node's pod sees them: the GPUs it uses
    0, 1, ... in the order of their host indices (the device plugin numbers a pod's GPUs from
    0), then the others, which the pod does not get. Instances and memory follow their GPU."""
    used = {d for per in plan.instances.values() for d, count in per.items() if count}
    index = {}
    for node in plan.nodes():
        gpus = [d for d in plan.devices if d.node == node and d.kind == "gpu"]
        gpus.sort(key=lambda d: (d.id not in used, d.index))
        index.update({d.id: i for i, d in enumerate(gpus)})
    devices = tuple(replace(d, index=index.get(d.id, d.index)) for d in plan.devices)
    renamed = {old.id: new.id for old, new in zip(plan.devices, devices, strict=True)}
    return replace(
        plan,
        devices=devices,
        planned_memory_bytes={renamed.get(d, d): b for d, b in plan.planned_memory_bytes.items()},
        instances={
            m: {renamed.get(d, d): c for d, c in per.items()} for m, per in plan.instances.items()
        },
    )


def _node(
    ensemble: Ensemble,
    plan: Plan,
    node: str,
    service: str,
    app: str,
    labels: dict[str, str],
    meta: dict[str, Any],
    image: str,
    triton_image: str,
    models_claim: str,
    ensemble_path: str,
    key_volume: dict[str, Any],
    config_volume: dict[str, Any],
) -> list[dict[str, Any]]:
    """A node's Triton: Deployment (pinned, its GPUs requested) and Service."""
    devices = {d.id: d for d in plan.devices}
    used = {
        d
        for per in plan.instances.values()
        for d, count in per.items()
        if count and devices[d].node == node
    }
    gpus = sorted(devices[d].index for d in used if devices[d].kind == "gpu")
    memory = sum(plan.planned_memory_bytes.get(d, 0) for d in used)
    memory_mib = max(1024, (memory >> 20) + 512)
    backend = "onnxruntime" if gpus else "python"
    pod_labels = {**labels, "app.kubernetes.io/component": _dns(f"triton-{node}")}
    render = {
        "name": "render",
        "image": image,
        "command": ["chorus", "render", "/etc/chorus/config/plan.json"],
        "args": [
            "--ensemble",
            f"/models/{ensemble_path}",
            "--target",
            "repository",
            "--node",
            node,
            "--backend",
            backend,
            "-o",
            "/repository",
        ],
        "volumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "repository", "mountPath": "/repository"},
            {"name": "config", "mountPath": "/etc/chorus/config", "readOnly": True},
        ],
        "securityContext": _security(),
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
    }
    apis = ",".join(RESTRICTED)
    if gpus:
        triton: dict[str, Any] = {
            "image": triton_image,
            "command": ["tritonserver"],
            "args": [
                "--model-repository=/repository",
                "--model-control-mode=explicit",
                "--load-model=*",
                "--allow-metrics=false",  # as `chorus node`: nothing reads them, they have no key
                f"--grpc-restricted-protocol={apis}:{_KEY_HEADER}=$(TRITON_KEY)",
                f"--http-restricted-api={apis}:{_KEY_HEADER}=$(TRITON_KEY)",
            ],
            "env": [
                {
                    "name": "TRITON_KEY",
                    "valueFrom": {
                        "secretKeyRef": {"name": key_volume["secret"]["secretName"], "key": "key"}
                    },
                }
            ],
        }
    else:
        triton = {
            "image": image,
            "command": ["chorus", "node", "/repository"],
            "args": [
                "--key-file",
                "/etc/chorus/triton-key/key",
                "--host",
                "0.0.0.0",
                "--workdir",
                "/tmp/chorus-node",
            ],
        }
    limits: dict[str, Any] = {"memory": f"{memory_mib * 2}Mi", "cpu": "4"}
    requests: dict[str, Any] = {"memory": f"{memory_mib}Mi", "cpu": "1"}
    if gpus:
        limits["nvidia.com/gpu"] = len(gpus)
        requests["nvidia.com/gpu"] = len(gpus)
    triton.update(
        {
            "name": "triton",
            "ports": _container_ports({"http": 8000, "grpc": 8001}),
            "volumeMounts": [
                {"name": "repository", "mountPath": "/repository", "readOnly": True},
                {"name": "triton-key", "mountPath": "/etc/chorus/triton-key", "readOnly": True},
                {"name": "shm", "mountPath": "/dev/shm"},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
            "readinessProbe": _probe("/v2/health/ready", 8000),
            "livenessProbe": _probe("/v2/health/live", 8000, delay=30),
            "securityContext": _security(),
            "resources": {"requests": requests, "limits": limits},
        }
    )
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": service, **meta, "labels": pod_labels},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # its GPUs are not there twice
            "selector": {"matchLabels": pod_labels},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "securityContext": {"runAsNonRoot": True, "fsGroup": _USER},
                    "automountServiceAccountToken": False,
                    "initContainers": [render],
                    "containers": [triton],
                    "volumes": [
                        {
                            "name": "models",
                            "persistentVolumeClaim": {"claimName": models_claim, "readOnly": True},
                        },
                        {"name": "repository", "emptyDir": {}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                        {"name": "tmp", "emptyDir": {}},
                        key_volume,
                        config_volume,
                    ],
                },
            },
        },
    }
    return [deployment, _service(service, meta, pod_labels, {"http": 8000, "grpc": 8001})]


def _combiner(
    app: str,
    labels: dict[str, str],
    meta: dict[str, Any],
    image: str,
    replicas: int,
    key_volume: dict[str, Any],
    config_volume: dict[str, Any],
    models_claim: str,
    stop_s: float,
    workers: int,
) -> list[dict[str, Any]]:
    """The plan's combiner processes (the config's ``workers``) shared over the ``replicas``
    pods, each running its share (``--workers``) and asking for half a core a process, up to
    one each plus one."""
    workers = math.ceil(workers / replicas)
    pod_labels = {**labels, "app.kubernetes.io/component": "combiner"}
    container = {
        "name": "combiner",
        "image": image,
        "command": ["python3", "-m", "combiner"],
        "args": [
            "--config",
            "/etc/chorus/config/combiner.json",
            "--host",
            "0.0.0.0",
            "--grpc-port",
            "8100",
            "--http-port",
            "8101",
            "--metrics-port",
            "8102",
            "--token-file",
            "/etc/chorus/token/token",
            "--workers",
            str(workers),
        ],
        "ports": _container_ports(COMBINER_PORTS),
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/chorus/config", "readOnly": True},
            {"name": "triton-key", "mountPath": "/etc/chorus/triton-key", "readOnly": True},
            {"name": "token", "mountPath": "/etc/chorus/token", "readOnly": True},
            {"name": "models", "mountPath": "/models", "readOnly": True},  # a user's rule module
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "readinessProbe": _probe("/v2/health/ready", 8101, delay=2),
        "livenessProbe": _probe("/v2/health/live", 8101, delay=10),
        "securityContext": _security(),
        "resources": {
            "requests": {"cpu": f"{500 * workers}m", "memory": f"{256 * workers}Mi"},
            "limits": {"cpu": str(max(2, workers + 1)), "memory": f"{workers}Gi"},
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{app}-combiner", **meta, "labels": pod_labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": pod_labels},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "securityContext": {"runAsNonRoot": True},
                    "automountServiceAccountToken": False,
                    # it drains, answers what came meanwhile, waits for its calls on Triton
                    "terminationGracePeriodSeconds": math.ceil(stop_s) + 10,
                    "containers": [container],
                    "volumes": [
                        config_volume,
                        key_volume,
                        {"name": "token", "secret": {"secretName": f"{app}-token"}},
                        {
                            "name": "models",
                            "persistentVolumeClaim": {"claimName": models_claim, "readOnly": True},
                        },
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }
    return [deployment, _service(app, meta, pod_labels, COMBINER_PORTS)]


COMBINER_PORTS = {"grpc": 8100, "http": 8101, "metrics": 8102}


def _container_ports(ports: dict[str, int]) -> list[dict[str, Any]]:
    return [{"name": n, "containerPort": p} for n, p in ports.items()]


def _service(
    name: str, meta: dict[str, Any], labels: dict[str, str], ports: dict[str, int]
) -> dict[str, Any]:
    """A ClusterIP Service in front of the pods with these labels."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, **meta, "labels": labels},
        "spec": {
            "selector": labels,
            "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports.items()],
        },
    }

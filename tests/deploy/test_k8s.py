"""deploy/k8s: manifests valid against Kubernetes' schemas (offline), and consistent."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (dev extra) ships the Kubernetes schemas"
)

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest Kubernetes release these manifests promise to work on, and the newest schemas.
K8S_VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]
# Kinds outside the core API: checked below against their own (smaller) schemas.
NOT_CORE = {"Kustomization", "ServiceMonitor"}


def load_all() -> dict[str, list[dict[str, Any]]]:
    docs = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


DOCS = load_all()
CORE_RESOURCES = [
    pytest.param(doc, id=f"{name}:{doc['kind']}")
    for name, docs in DOCS.items()
    for doc in docs
    if doc["kind"] not in NOT_CORE
]


def one(kind: str) -> dict[str, Any]:
    found = [d for docs in DOCS.values() for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return one("Deployment")


@pytest.fixture(scope="module")
def container(deployment) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("resource", CORE_RESOURCES)
def test_manifest_is_valid_for_kubernetes(resource, version):
    # strict: unknown fields are errors, as kubectl's server-side field validation makes them.
    kubernetes_validate.validate(resource, version, strict=True)


def test_the_schema_check_rejects_a_misspelt_field(deployment):
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_deployment_requests_one_gpu(container):
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_probes_use_the_spec_health_endpoints(container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    probes = {
        kind: container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness", "readiness")
    }
    assert probes["readiness"]["path"] == "/readyz"
    assert probes["liveness"]["path"] == "/healthz"
    assert probes["startup"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] in ports or probe["port"] in ports.values()
    assert container["args"] == ["--host", "0.0.0.0", "--port", str(ports["http"])]


def test_grpc_port_is_served_and_exposed(container):
    service = one("Service")
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["FPN_GRPC_PORT"] == str(ports["grpc"])
    (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["targetPort"] == "grpc" and grpc["appProtocol"] == "kubernetes.io/h2c"


def test_pod_runs_as_the_image_user_and_locks_down(deployment, container, repo_root):
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    image_user = re.findall(r"^USER (\d+)", (repo_root / "Dockerfile").read_text(), re.M)
    assert str(pod["securityContext"]["runAsUser"]) == image_user[-1]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    if security.get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts, "a read-only root needs a writable /tmp"


def test_scrape_annotations_match_the_container_port(deployment, container):
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]


def test_service_selects_the_deployment_pods(deployment, container):
    service = one("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


#: The fields of monitoring.coreos.com/v1 ServiceMonitor that these manifests use, with the
#: constraints of prometheus-operator's CRD (Duration pattern included).
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["integer", "string"]},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"$ref": "#/$defs/duration"},
                            "scrapeTimeout": {"$ref": "#/$defs/duration"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
    "$defs": {
        "duration": {
            "type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
            r"(([0-9]+)s)?(([0-9]+)ms)?)$",
        }
    },
}


def test_service_monitor_is_valid_and_scrapes_the_service():
    monitor = one("ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    service = one("Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_service_monitor_schema_is_a_real_check():
    broken = copy.deepcopy(one("ServiceMonitor"))
    broken["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SERVICE_MONITOR_SCHEMA)


def adapter_rules() -> list[dict[str, Any]]:
    config = one("ConfigMap")
    assert config["metadata"]["name"] == "prometheus-adapter"
    return yaml.safe_load(config["data"]["config.yaml"])["rules"]


def test_hpa_scales_the_deployment_on_queue_depth_from_the_adapter(deployment):
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    # The adapter must publish, per pod, the metric the HPA asks for, from SPEC §8's gauge.
    published = {rule["name"]["as"]: rule for rule in adapter_rules()}
    assert name in published
    rule = published[name]
    assert rule["seriesQuery"].startswith("fpn_queue_depth{")
    assert re.fullmatch(rule["name"]["matches"], "fpn_queue_depth")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_kustomization_lists_every_manifest_and_sets_the_image(container):
    kustomization = one("Kustomization")
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S_DIR / resource).is_file(), resource
    # Everything here belongs to the app except the adapter's own configuration.
    expected = {
        name
        for name, docs in DOCS.items()
        if not any(d["kind"] in {"Kustomization", "ConfigMap"} for d in docs)
    }
    assert set(resources) == expected
    image_names = {image["name"] for image in kustomization["images"]}
    assert container["image"].split(":")[0] in image_names

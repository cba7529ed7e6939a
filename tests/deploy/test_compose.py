"""docker-compose.yml: the Compose Specification schema, and every reference it makes."""

from __future__ import annotations

import copy
import itertools
import json
import re
import shlex
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

SERVICE_PORT = 8000
GRPC_PORT = 8001
PROMETHEUS_PORT = 9090


def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema as vendored by check-jsonschema (never downloaded)."""
    vendor = pytest.importorskip(
        "check_jsonschema.builtin_schemas.vendor",
        reason="check-jsonschema (dev extra) ships the Compose Specification schema",
    )
    schema = json.loads(resources.files(vendor).joinpath("compose-spec.json").read_text())
    assert schema.get("$id") == "compose_spec.json", "not the Compose Specification schema"
    return schema


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose variable interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$."""

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name, "")
        if op == ":?" and not current:
            raise KeyError(f"{name}: {arg}")
        if op == ":-" and not current:
            return arg
        return current

    value = re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", replace, value)
    return value.replace("$$", "$")


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of a service's bind mounts, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def host_path(repo_root: Path, service: dict[str, Any], container_path: str) -> Path:
    """The repository file behind a container path, through the service's bind mounts."""
    wanted = PurePosixPath(container_path)
    for source, target in bind_mounts(service):
        target_path = PurePosixPath(target)
        if wanted == target_path or target_path in wanted.parents:
            return repo_root / source / wanted.relative_to(target_path)
    raise AssertionError(f"{container_path} is not inside any bind mount of the service")


def published_container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def test_compose_file_is_valid_against_the_compose_specification(compose):
    assert schema_errors(compose) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["services"]["fpn-serve"]["deploy"]["resources"]["reservations"]["devices"][
            0
        ].update(capabilities="gpu"),
        lambda c: c["services"]["prometheus"].update(volume=["./x:/x"]),
        lambda c: c["services"]["grafana"].update(ports="3000:3000"),
    ],
    ids=["capabilities-not-a-list", "misspelt-key", "ports-not-a-list"],
)
def test_the_schema_check_rejects_a_broken_compose_file(compose, breakage):
    broken = copy.deepcopy(compose)
    breakage(broken)
    assert schema_errors(broken), "the schema accepted a broken compose file"


def test_one_compose_up_starts_the_gpu_service_and_the_monitoring(compose):
    services = compose["services"]
    assert {"fpn-serve", "prometheus", "grafana"} <= set(services)
    for name in ("fpn-serve", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start on a plain `compose up`"
    devices = services["fpn-serve"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["fpn-serve"]["build"]["args"]["VARIANT"] == "gpu"


def test_cpu_profile_replaces_the_gpu_service_under_the_same_name(compose):
    cpu = compose["services"]["fpn-serve-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" not in cpu, "the CPU service must not reserve a GPU"
    assert cpu["environment"]["FPN_DEVICE"] == "cpu"
    # Prometheus scrapes fpn-serve:8000; the CPU service must answer to that name.
    assert "fpn-serve" in cpu["networks"]["default"]["aliases"]
    # Monitoring must not drag the GPU service in when started alongside the CPU one.
    for name in ("prometheus", "grafana"):
        depends = compose["services"][name].get("depends_on", [])
        assert not {"fpn-serve", "fpn-serve-cpu"} & set(depends), name


def test_both_service_variants_serve_the_same_settings(compose):
    gpu, cpu = compose["services"]["fpn-serve"], compose["services"]["fpn-serve-cpu"]
    assert {k: v for k, v in gpu["environment"].items() if k != "FPN_DEVICE"} == {
        k: v for k, v in cpu["environment"].items() if k != "FPN_DEVICE"
    }
    for service in (gpu, cpu):
        assert service["environment"]["FPN_MODEL_DIR"] == "/app/checkpoints"
        assert SERVICE_PORT in published_container_ports(service)
        assert GRPC_PORT in published_container_ports(service)
        assert str(service["environment"]["FPN_GRPC_PORT"]) == str(GRPC_PORT)


def test_build_contexts_and_dockerfiles_exist(repo_root, compose):
    dockerfile_text = None
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            continue
        context = repo_root / build["context"]
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert context.is_dir(), name
        assert dockerfile.is_file(), name
        dockerfile_text = dockerfile.read_text()
        for arg, value in build.get("args", {}).items():
            assert re.search(rf"^ARG {arg}\b", dockerfile_text, re.M), f"{name}: no ARG {arg}"
            assert re.search(rf"^FROM \S+ AS base-{value}$", dockerfile_text, re.M), (
                f"{name}: the Dockerfile has no stage for {arg}={value}"
            )
    assert dockerfile_text is not None


def test_every_bind_mount_source_exists(repo_root, compose):
    mounts = [(name, m) for name, s in compose["services"].items() for m in bind_mounts(s)]
    assert mounts, "expected the monitoring configuration to be bind-mounted"
    for name, (source, _target) in mounts:
        assert (repo_root / source).exists(), f"{name}: {source} does not exist"
    named = {
        v.split(":")[0]
        for s in compose["services"].values()
        for v in s.get("volumes", [])
        if isinstance(v, str) and not v.startswith((".", "/"))
    }
    assert named <= set(compose.get("volumes") or {}), "named volumes must be declared"


def test_prometheus_scrapes_the_service_by_compose_name(repo_root, compose):
    prometheus = compose["services"]["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"] if "=" in arg)
    config_file = host_path(repo_root, prometheus, flags["--config.file"])
    assert config_file == repo_root / "deploy" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["fpn-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"fpn-serve:{SERVICE_PORT}"]
    host, port = targets[0].split(":")
    assert host in compose["services"]
    assert int(port) in published_container_ports(compose["services"][host])


def test_grafana_datasource_points_at_prometheus(repo_root, compose, dashboard):
    grafana = compose["services"]["grafana"]
    provisioning = host_path(repo_root, grafana, "/etc/grafana/provisioning")
    files = sorted((provisioning / "datasources").glob("*.yml"))
    assert files, "no provisioned datasource"
    sources = [ds for f in files for ds in yaml.safe_load(f.read_text())["datasources"]]
    assert len(sources) == 1
    source = sources[0]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    assert PROMETHEUS_PORT in published_container_ports(compose["services"]["prometheus"])
    # The dashboard finds the datasource by uid, so the uid is fixed in provisioning.
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {source["uid"]}


def test_grafana_dashboard_provider_path_holds_the_dashboard(repo_root, compose):
    grafana = compose["services"]["grafana"]
    provisioning = host_path(repo_root, grafana, "/etc/grafana/provisioning")
    files = sorted((provisioning / "dashboards").glob("*.yml"))
    assert files, "no dashboard provider"
    providers = [p for f in files for p in yaml.safe_load(f.read_text())["providers"]]
    assert [p["type"] for p in providers] == ["file"]
    directory = host_path(repo_root, grafana, providers[0]["options"]["path"])
    assert (directory / "fpn-serve.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(repo_root, grafana, home).is_file()


def test_grafana_admin_password_has_no_default_and_anonymous_access_is_off(compose):
    env = compose["services"]["grafana"]["environment"]
    password = env["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), password
    with pytest.raises(KeyError, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate(password, {})
    assert interpolate(password, {"GRAFANA_ADMIN_PASSWORD": "s3cret"}) == "s3cret"
    anonymous = str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower()
    if anonymous == "true":
        assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"
    else:
        assert anonymous == "false"


def test_documented_compose_commands_name_real_services_and_profiles(repo_root, compose):
    command_line = re.compile(r"^(?:\w+=\S+\s+)*(docker compose\s.*)$")
    commands = [
        m.group(1)
        for line in (repo_root / "docs" / "deployment.md").read_text().splitlines()
        if (m := command_line.match(line.strip()))
    ]
    ups = [c for c in commands if " up" in c]
    assert ups, "docs/deployment.md should show how to start the stack"
    profiles = {p for s in compose["services"].values() for p in s.get("profiles", [])}
    for command in commands:
        words = shlex.split(command.split("#")[0])
        for flag, value in itertools.pairwise(words):
            if flag == "--profile":
                assert value in profiles, command
        verbs = {"up", "logs", "down", "build", "ps", "restart", "stop", "pull"}
        verb = next((i for i, w in enumerate(words) if w in verbs), None)
        assert verb is not None, f"unknown compose command: {command}"
        for word in words[verb + 1 :]:
            if word in {"&&", "|", ";"}:
                break
            if not word.startswith("-"):
                assert word in compose["services"], f"{command}: no service {word}"

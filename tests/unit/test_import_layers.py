"""The import contract: each package of llm_service imports only the packages below it.

The layers are written down in ``LAYERS`` (also drawn at the top of IMPLEMENTATION.md). A module may
import its own package and any package of a lower layer; an import from a higher layer, or from a
package of the same layer that is not its own, fails this test with the file, line and the rule.
Imports inside functions and under ``TYPE_CHECKING`` count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llm_service

PACKAGE = Path(llm_service.__file__).parent

# Lowest first; each layer holds top-level names (a package or a module) that do not import each other.
# IMPLEMENTATION.md opens with this diagram; change both together.
LAYERS: list[set[str]] = [
    {"engines"},  # the Engine protocol, its vLLM implementation (the only vllm import) and the fake
    {"sizing", "errors"},  # memory estimates and plans; error types without a web framework
    {"config"},  # settings, the slot set, each slot's EngineConfig and front end
    {"observability"},  # metrics, tracing, logging set-up: they observe, never decide
    {"registry", "cache", "traffic"},  # slot lifecycle; response cache; admission, drain, keys, deadlines
    {"serving"},  # the request's way below HTTP: generation, embeddings, rerank, coalescing, images
    {"api"},  # HTTP: routes, dependencies, middleware, the error-to-response mapping
    {"app"},  # create_app and the lifespan that owns every resource
    {"server", "tools"},  # uvicorn with the drain's signal handling; command-line tools beside the service
    {"__main__"},  # python -m llm_service: serve, or one of the tools
]

WEB_FRAMEWORKS = ("fastapi", "starlette")
WEB_ALLOWED: set[str] = {"api", "app", "server"}


def _unit(module: Path) -> str:
    """The top-level name a file belongs to: ``cache`` for cache/store.py, ``app`` for app.py."""
    return module.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(module: Path) -> list[tuple[int, str]]:
    """(line, imported dotted name) for every import in the file, relative ones resolved."""
    tree = ast.parse(module.read_text(), str(module))
    parts = ("llm_service", *module.relative_to(PACKAGE).with_suffix("").parts)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(parts[: len(parts) - node.level + (module.name == "__init__.py")])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from llm_service import app` names a unit in the alias
            if name == "llm_service":
                found += [(node.lineno, f"llm_service.{alias.name}") for alias in node.names]
    return found


def _layer_of(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"{unit} is in no layer of LAYERS: add it where it belongs")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer() -> None:
    for module in _modules():
        if module.parent == PACKAGE and module.name in ("__init__.py",):
            continue
        _layer_of(_unit(module))


@pytest.mark.parametrize("module", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_or_sideways_import(module: Path) -> None:
    if module.parent == PACKAGE and module.name == "__init__.py":
        return
    unit = _unit(module)
    own = _layer_of(unit)
    wrong = []
    for line, name in _imports(module):
        top = name.split(".")
        if top[0] != "llm_service" or len(top) < 2 or top[1] == "__version__":
            continue
        target = top[1]
        if target == unit:
            continue
        layer = _layer_of(target)
        if layer >= own:
            wrong.append(f"{module.relative_to(PACKAGE)}:{line} imports {name} (layer {layer} >= {own})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_web_framework_only_at_the_edge(module: Path) -> None:
    if _unit(module) in WEB_ALLOWED:
        return
    used = [f"{line}: {name}" for line, name in _imports(module) if name.split(".")[0] in WEB_FRAMEWORKS]
    assert not used, f"{module.relative_to(PACKAGE)} imports a web framework: {used}"

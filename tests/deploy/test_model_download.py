"""scripts/model-download.sh: dry run, slot choice, and clear failures offline or unauthorised."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_service.config.settings import GUIDE_MODEL_ALIASES, PRODUCTION_MODELS, SLOTS
from tests.deploy.conftest import REPO, closed_port

SCRIPT = REPO / "scripts" / "model-download.sh"
WRAPPER = REPO / "model-download.sh"


def run(args: list[str], env: dict[str, str], script: Path = WRAPPER) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: no token, no model overrides, HF_HOME in a temporary folder."""
    base = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "LLM_", "HUGGING"))}
    base["HF_HOME"] = str(tmp_path / "hf-home")
    return base



class FakeHub:
    """A local stand-in for the Hub answering every request with one status (and X-Error-Code)."""

    def __init__(self, status: int, error_code: str = "") -> None:
        self.status, self.error_code = status, error_code
        self.requests: list[tuple[str, str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Authorization", "")))
                self.send_response(hub.status)
                if hub.error_code:
                    self.send_header("X-Error-Code", hub.error_code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_factory() -> Iterator[type[FakeHub]]:
    hubs: list[FakeHub] = []

    def make(status: int, error_code: str = "") -> FakeHub:
        hubs.append(FakeHub(status, error_code))
        return hubs[-1]

    yield make  # type: ignore[misc]
    for hub in hubs:
        hub.close()


def fake_cli(folder: Path, log: Path) -> Path:
    """An `hf` that records its arguments and creates the model folder instead of downloading."""
    folder.mkdir(parents=True, exist_ok=True)
    cli = folder / "hf"
    cli.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$*" >> "{log}"\n'
        'cache=""; model="$2"\n'
        'while [ "$#" -gt 0 ]; do [ "$1" = --cache-dir ] && cache="$2"; shift; done\n'
        'mkdir -p "$cache/models--${model//\\//--}/snapshots"\n',
        encoding="utf-8",
    )
    cli.chmod(cli.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.fixture
def hf_log(env: dict[str, str], tmp_path: Path) -> Path:
    """Puts the fake `hf` first on the environment's PATH; the file its calls are logged to."""
    log = tmp_path / "hf.log"
    env["PATH"] = f"{fake_cli(tmp_path / 'bin', log)}{os.pathsep}{env['PATH']}"
    return log


def script_constant(text: str, name: str) -> str:
    match = re.search(rf'^readonly {name}="([^"]+)"$', text, flags=re.MULTILINE)
    assert match, name
    return match.group(1)


def test_script_defaults_and_aliases_are_the_services() -> None:
    text = SCRIPT.read_text(encoding="utf-8")
    for slot in SLOTS:
        default = script_constant(text, f"DEFAULT_MODEL_{slot.upper()}")
        assert default == PRODUCTION_MODELS[slot], slot
        assert GUIDE_MODEL_ALIASES[script_constant(text, f"GUIDE_MODEL_{slot.upper()}")] == default, slot


def test_the_guides_ids_download_their_published_builds(env: dict[str, str]) -> None:
    for alias, model in GUIDE_MODEL_ALIASES.items():
        slot = next(name for name, default in PRODUCTION_MODELS.items() if default == model)
        env[f"LLM_MODEL_{slot.upper()}"] = alias
    result = run(["--dry-run"], env)
    assert result.returncode == 0, result.stderr
    for slot, model in PRODUCTION_MODELS.items():
        line = next(line for line in result.stdout.splitlines() if line.startswith(slot + " "))
        assert line.split()[1] == model and "models--" + model.replace("/", "--") in line
        assert "(alias " in line


def test_dry_run_lists_slot_model_and_target(env: dict[str, str]) -> None:
    result = run(["--dry-run"], env)
    assert result.returncode == 0, result.stderr
    hub = Path(env["HF_HOME"]) / "hub"
    for slot, model in PRODUCTION_MODELS.items():
        line = next(line for line in result.stdout.splitlines() if line.startswith(slot + " "))
        assert model in line
        assert str(hub / ("models--" + model.replace("/", "--"))) in line
    assert not Path(env["HF_HOME"]).exists(), "a dry run must not create anything"


def test_dry_run_honours_slots_and_model_variables(env: dict[str, str], tmp_path: Path) -> None:
    env["LLM_MODEL_LONGCTX"] = "org/long-model"
    env["LLM_MODEL_STANDARD"] = str(tmp_path)
    result = run(["--dry-run", "--slots", "longctx,standard,longctx"], env)
    assert result.returncode == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert rows == ["longctx", "standard"]
    assert "org/long-model" in result.stdout and "models--org--long-model" in result.stdout
    assert "(local path, not downloaded)" in result.stdout


def test_retrieval_slots_are_fetched_only_when_their_model_is_set(env: dict[str, str]) -> None:
    rows = lambda result: [line.split()[0] for line in result.stdout.splitlines()[2:]]  # noqa: E731
    assert rows(run(["--dry-run"], env)) == list(SLOTS)
    env["LLM_MODEL_RERANK"] = "org/reranker"
    result = run(["--dry-run"], env)
    assert rows(result) == [*SLOTS, "rerank"] and "models--org--reranker" in result.stdout
    env["LLM_MODEL_EMBEDDING"] = "org/embedder"
    assert rows(run(["--dry-run", "--slots", "embedding"], env)) == ["embedding"]
    del env["LLM_MODEL_EMBEDDING"]
    off = run(["--dry-run", "--slots", "embedding"], env)
    assert off.returncode == 2 and "set LLM_MODEL_EMBEDDING" in off.stderr


def test_the_configured_slot_set_is_fetched(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "slots.yaml"
    config.write_text("slots:\n  coder:\n    model: org/coder\n  embedding:\n    model: org/embedder\n")
    env.update(PYTHON=sys.executable, LLM_CONFIG_FILE=str(config), LLM_SLOTS__QUICK__MODEL="org/quick",
               LLM_MODEL_STANDARD="org/standard")
    result = subprocess.run(["bash", str(WRAPPER), "--dry-run"], capture_output=True, text=True, env=env,
                            timeout=60, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[2:]}
    assert list(rows) == [*SLOTS, "embedding", "coder", "quick"]
    assert (rows["standard"], rows["coder"], rows["quick"]) == ("org/standard", "org/coder", "org/quick")
    config.write_text("slots:\n  coder:\n    modle: org/coder\n")
    bad = subprocess.run(["bash", str(WRAPPER), "--dry-run"], capture_output=True, text=True, env=env,
                         timeout=60, check=False, cwd=REPO)
    assert bad.returncode == 2 and "slot 'coder': field 'modle': unknown field" in bad.stderr


def test_unknown_slot_and_argument_are_usage_errors(env: dict[str, str]) -> None:
    result = run(["--slots", "standard,huge"], env)
    assert result.returncode == 2 and "unknown slot 'huge'" in result.stderr
    assert run(["--frobnicate"], env).returncode == 2
    assert run(["--help"], env).stdout.startswith("Download the models")


def test_offline_fails_fast_with_a_clear_message(env: dict[str, str], hf_log: Path) -> None:
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = run(["--slots", "standard"], env)
    assert time.monotonic() - started < 15
    assert result.returncode == 3, result.stderr
    assert "cannot reach the Hugging Face Hub" in result.stderr
    assert env["HF_ENDPOINT"] in result.stderr
    assert not hf_log.exists()


def test_unauthorised_names_hf_token(env: dict[str, str], hub_factory: type[FakeHub], hf_log: Path) -> None:
    hub = hub_factory(401, "GatedRepo")
    env["HF_ENDPOINT"] = hub.url
    result = run(["--slots", "multimodal"], env)
    assert result.returncode == 4, result.stderr
    assert "HF_TOKEN" in result.stderr and PRODUCTION_MODELS["multimodal"] in result.stderr
    assert not hf_log.exists(), "nothing is downloaded after a failed check"
    assert hub.requests[0][:2] == ("HEAD", f"/{PRODUCTION_MODELS['multimodal']}/resolve/main/config.json")


def test_forbidden_with_a_token_points_at_the_licence(
    env: dict[str, str], hub_factory: type[FakeHub], hf_log: Path
) -> None:
    hub = hub_factory(403, "GatedRepo")
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_test_token")
    result = run(["--slots", "standard"], env)
    assert result.returncode == 4, result.stderr
    assert "HF_TOKEN is set" in result.stderr and "licence" in result.stderr
    assert hub.requests[0][2] == "Bearer hf_test_token"


def test_missing_model_is_reported(env: dict[str, str], hub_factory: type[FakeHub], hf_log: Path) -> None:
    hub = hub_factory(404, "EntryNotFound")
    env.update(HF_ENDPOINT=hub.url, LLM_MODEL_LONGCTX="org/nothing-here")
    result = run(["--slots", "longctx"], env)
    assert result.returncode == 5, result.stderr
    assert "org/nothing-here" in result.stderr and "LLM_MODEL_LONGCTX" in result.stderr


def test_download_goes_to_the_hub_cache(
    env: dict[str, str], hub_factory: type[FakeHub], hf_log: Path
) -> None:
    hub = hub_factory(200)
    env["HF_ENDPOINT"] = hub.url
    result = run(["--slots", "standard,longctx", "--revision", "v1"], env)
    assert result.returncode == 0, result.stderr
    home = Path(env["HF_HOME"])
    calls = hf_log.read_text(encoding="utf-8").splitlines()
    assert calls == [
        f"download {PRODUCTION_MODELS[slot]} --revision v1 --cache-dir {home / 'hub'}"
        " --exclude original/* --exclude *.pth"
        for slot in ("standard", "longctx")
    ]
    # HF_HOME itself also works as the guide's mount of the hub cache (-v /mnt/models:.../hub).
    folder = "models--" + PRODUCTION_MODELS["standard"].replace("/", "--")
    assert (home / folder).is_symlink() and os.readlink(home / folder) == f"hub/{folder}"
    assert (home / folder / "snapshots").is_dir()


def test_without_curl_python_probes_and_a_missing_cli_is_named(env: dict[str, str], tmp_path: Path) -> None:
    """The probe falls back to python3 (slim images have no curl); no CLI at all is exit 6."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in (
        "bash",
        "python3",
        "sed",
        "tr",
        "mkdir",
        "ln",
        "basename",
        "dirname",
        "rm",
        "tail",
        "mktemp",
    ):
        found = shutil.which(name)
        assert found, name
        # The real binary, not a shim (pyenv's needs its own PATH).
        if name == "python3":
            found = subprocess.run(
                [found, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, check=True
            ).stdout.strip()
        (tools / name).symlink_to(os.path.realpath(found))
    env["PATH"] = str(tools)
    assert run(["--slots", "standard"], env).returncode == 6
    env["PATH"] = f"{fake_cli(tmp_path / 'bin', tmp_path / 'hf.log')}{os.pathsep}{tools}"
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    result = run(["--slots", "standard"], env)
    assert result.returncode == 3, result.stderr
    assert "cannot reach the Hugging Face Hub" in result.stderr


@pytest.mark.parametrize("hub_cache", ["home/hub", "elsewhere"])
def test_links_only_when_the_cache_is_hf_homes_hub(
    env: dict[str, str], hub_factory: type[FakeHub], hf_log: Path, tmp_path: Path, hub_cache: str
) -> None:
    """The images set HF_HUB_CACHE=$HF_HOME/hub: links still made; a separate cache gets none."""
    env.update(
        HF_ENDPOINT=hub_factory(200).url,
        HF_HOME=f"{tmp_path / 'home'}/",
        HF_HUB_CACHE=str(tmp_path / hub_cache),
    )
    result = run(["--slots", "standard"], env)
    assert result.returncode == 0, result.stderr
    folder = "models--" + PRODUCTION_MODELS["standard"].replace("/", "--")
    assert (tmp_path / hub_cache / folder).is_dir()
    assert (tmp_path / "home" / folder).is_symlink() == (hub_cache == "home/hub")

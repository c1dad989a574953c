"""API keys: 401 in the envelope without one, Bearer or x-api-key with one; health and metrics open;
keys from a file; every secret also from a _FILE variable; keys never in logs."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

from llm_service.config.settings import AppSettings, LangfuseSettings, LLMSettings, load_settings
from llm_service.traffic.api_keys import ApiKeys

from .app_client import app_client

KEYS = "key-one-1234567890,key-two-0987654321"


def test_api_keys_accept_only_their_keys():
    keys = ApiKeys(frozenset({"alpha-key", "beta-key"}))
    assert keys.required and keys.accepts("alpha-key") and keys.accepts("beta-key")
    assert not keys.accepts("alpha-ke") and not keys.accepts("") and not keys.accepts(None)
    assert "alpha" not in repr(keys)
    assert not ApiKeys(frozenset()).required


async def test_without_keys_configured_nothing_needs_one():
    async with app_client() as (client, _):
        assert (await client.post("/generate", json={"prompt": "hi"})).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("POST", "/generate", {"prompt": "hi"}),
        ("POST", "/v1/completions", {"model": "standard", "prompt": "hi"}),
        ("POST", "/v1/chat/completions", {"model": "standard", "messages": [{"role": "user", "content": "hi"}]}),
        ("GET", "/v1/models", None),
    ],
)
async def test_keys_guard_generation_and_openai_routes(method, path, payload):
    async with app_client(api_keys=SecretStr(KEYS)) as (client, _):
        r = await client.request(method, path, json=payload)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "unauthorized"
        if path.startswith("/v1/"):
            assert r.json()["error"]["code"] == "unauthorized"
        bad = await client.request(method, path, json=payload, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        ok = await client.request(method, path, json=payload, headers={"Authorization": "Bearer key-one-1234567890"})
        assert ok.status_code == 200
        ok = await client.request(method, path, json=payload, headers={"x-api-key": "key-two-0987654321"})
        assert ok.status_code == 200


async def test_health_and_metrics_stay_open():
    async with app_client(api_keys=SecretStr(KEYS)) as (client, _):
        for path in ("/health", "/health/live", "/health/ready", "/metrics"):
            assert (await client.get(path)).status_code == 200, path


async def test_admin_routes_need_a_key_and_the_admin_token():
    async with app_client(app={"admin_token": SecretStr("admin-token")}, api_keys=SecretStr(KEYS)) as (client, _):
        token = {"Authorization": "Bearer admin-token"}
        assert (await client.get("/admin/models", headers=token)).status_code == 401
        r = await client.get("/admin/models", headers={**token, "x-api-key": "key-one-1234567890"})
        assert r.status_code == 200


async def test_keys_from_a_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("file-key-aaaaaaaa\n\n  file-key-bbbbbbbb  \n")
    async with app_client(api_keys_file=path) as (client, _):
        assert (await client.post("/generate", json={"prompt": "hi"})).status_code == 401
        r = await client.post("/generate", json={"prompt": "hi"}, headers={"x-api-key": "file-key-bbbbbbbb"})
        assert r.status_code == 200


async def test_keys_never_reach_the_logs(caplog):
    caplog.set_level(logging.DEBUG)
    async with app_client(api_keys=SecretStr(KEYS)) as (client, _):
        await client.post("/generate", json={"prompt": "hi"}, headers={"x-api-key": "key-one-1234567890"})
        await client.post("/generate", json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong-key-xyz"})
    assert "key-one" not in caplog.text and "wrong-key-xyz" not in caplog.text


def test_missing_or_empty_key_file_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_API_KEYS_FILE", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="LLM_API_KEYS_FILE"):
        load_settings()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    monkeypatch.setenv("LLM_API_KEYS_FILE", str(empty))
    with pytest.raises(ValueError, match="empty"):
        load_settings()


def test_every_secret_can_come_from_a_file(tmp_path):
    def secret(name: str, value: str):
        path = tmp_path / name
        path.write_text(value + "\n")
        return path

    langfuse = LangfuseSettings(
        enabled=True, public_key_file=secret("pk", "pk-lf-1"), secret_key_file=secret("sk", "sk-lf-1")
    )
    assert langfuse.public_key == "pk-lf-1" and langfuse.secret_key.get_secret_value() == "sk-lf-1"
    app = AppSettings(admin_token_file=secret("admin", "tok"))
    assert app.admin_token.get_secret_value() == "tok"
    assert LLMSettings(api_keys_file=secret("keys", "k1\nk2")).api_key_set() == {"k1", "k2"}
    with pytest.raises(ValueError, match="not both"):
        AppSettings(admin_token=SecretStr("x"), admin_token_file=secret("admin2", "y"))
    with pytest.raises(ValueError, match="LANGFUSE_SECRET_KEY"):
        LangfuseSettings(enabled=True, public_key="pk")

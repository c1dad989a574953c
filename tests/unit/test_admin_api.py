"""The /admin API on fake engines: token checks, load and unload by hand."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from .conftest import FakeFactory, admin_client_for, fake_settings

AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture
async def admin_client() -> AsyncIterator[tuple[httpx.AsyncClient, FakeFactory]]:
    async with admin_client_for(fake_settings()) as pair:
        yield pair


async def test_admin_is_disabled_without_a_token(fake_app):
    client, _ = fake_app
    r = await client.post("/admin/models/longctx/load", headers=AUTH)
    assert r.status_code == 403 and "APP_ADMIN_TOKEN" in r.json()["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}])
async def test_admin_needs_the_right_bearer_token(admin_client, headers):
    client, factory = admin_client
    r = await client.post("/admin/models/longctx/load", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert factory.of("longctx") == []


async def test_load_and_unload_by_hand(admin_client):
    client, factory = admin_client
    r = await client.post("/admin/models/longctx/load", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "loaded"
    assert len(factory.of("longctx")) == 1
    listing = (await client.get("/admin/models", headers=AUTH)).json()
    assert listing["used"] == pytest.approx(0.6) and listing["models"]["longctx"]["state"] == "loaded"
    r = await client.post("/admin/models/longctx/unload", headers=AUTH)
    assert r.status_code == 200 and r.json()["unloaded"] is True and r.json()["state"] == "unloaded"
    assert factory.of("longctx")[0].shutdowns == 1
    r = await client.post("/admin/models/longctx/unload", headers=AUTH)
    assert r.json()["unloaded"] is False
    assert (await client.post("/admin/models/nope/load", headers=AUTH)).status_code == 404

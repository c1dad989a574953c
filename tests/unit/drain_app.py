"""`python -m tests.unit.drain_app PORT GRACE TOKEN_DELAY`: the service on fake engines under the draining server."""

from __future__ import annotations

import sys

from llm_service import server
from llm_service.app import EngineBackend, create_app

from .conftest import GIB, FakeFactory, fake_settings


def main() -> None:
    port, grace, token_delay = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    settings = fake_settings()
    app = create_app(settings, EngineBackend(FakeFactory(token_delay=token_delay), "cpu", 8 * GIB))
    server.run(app, app.state.drain, "127.0.0.1", port, grace, settings.app.keep_alive_seconds)


if __name__ == "__main__":
    main()

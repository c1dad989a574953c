"""python -m llm_service: run the service under uvicorn with settings from the environment."""

from __future__ import annotations

import argparse
import os
import sys

from llm_service import server
from llm_service.app import create_app
from llm_service.config.settings import SettingsError, load_settings
from llm_service.observability.logging import configure_logging


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        from llm_service.tools.plan import main as plan

        return plan(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m llm_service", description=__doc__, epilog="`python -m llm_service plan --help`: sizing."
    )
    parser.add_argument("--host", help="bind address (default APP_HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default APP_PORT or 8002)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.stderr.write(f"llm-service: {exc}\n")
        return 2
    app_settings = settings.app.model_copy(
        update={k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    )
    settings = settings.model_copy(update={"app": app_settings})
    configure_logging(settings.app.log_level, console=settings.app.env == "development")
    # vLLM should log through our handlers, not install its own.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    # One worker: the engines live in this process.
    app = create_app(settings)
    server.run(
        app,
        app.state.drain,
        settings.app.host,
        settings.app.port,
        settings.app.shutdown_grace_seconds,
        settings.app.keep_alive_seconds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The dry run of gpu-check: the app on fake engines (a simulated GPU) served on 127.0.0.1."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import uvicorn

from llm_service.app import EngineBackend, create_app
from llm_service.config.settings import load_settings
from llm_service.engines.base import EngineConfig
from llm_service.engines.fake import FakeEngine

# What a simulated engine holds, as a fraction of its share: multimodal more (the report then
# shows a slot over its share), the others less (so the preloaded slots still fit together).
OVERSHOOT = {"multimodal": 1.02}
UNDERSHOOT = 0.97


class DryService:
    """The defaults on a simulated GPU of `memory` bytes: each engine a FakeEngine reporting a
    measured footprint; `kill_engine` marks one dead as a crash would, for the health check to find."""

    def __init__(self, memory: int, port: int) -> None:
        # Bundled model configs, a quick recovery, no Redis to reach.
        os.environ.update(HF_HUB_OFFLINE="1", LLM_LOAD_RETRY_SECONDS="1", LLM_CACHE_ENABLED="false")
        self.base_url = f"http://127.0.0.1:{port}"
        self.engines: list[FakeEngine] = []
        self._lines: list[str] = []
        app = create_app(load_settings(), EngineBackend(self._engine(memory), "cuda", memory, lambda: None))
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()

    def _engine(self, memory: int) -> Callable[[EngineConfig], FakeEngine]:
        def build(config: EngineConfig) -> FakeEngine:
            engine = FakeEngine(
                config,
                start_delay=0.2,
                measured_bytes=int(config.memory_share * memory * OVERSHOOT.get(config.slot, UNDERSHOOT)),
                image_tokens=4 if config.slot == "multimodal" else None,
            )
            self.engines.append(engine)
            self._lines.append(f"simulated {config.slot}: memory share {config.memory_share:.2f} of {memory} bytes")
            return engine

        return build

    def kill_engine(self) -> str:
        live = [e for e in self.engines if e.started and not e.dead and not e.shutdowns]
        if not live:
            raise RuntimeError("no live engine to kill")
        live[0].dead = True  # found by the registry's health check, as a dead engine core is
        return f"marked the {live[0].config.slot} fake engine dead"

    def log_lines(self) -> list[str]:
        return list(self._lines)

    def close(self) -> None:
        self._server.should_exit = True
        deadline = time.monotonic() + 30
        while self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)

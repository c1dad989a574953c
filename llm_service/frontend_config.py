"""Per-slot front-end options (images; later chat templates and tool parsers) from the settings."""

from __future__ import annotations

import dataclasses

from llm_service.engines.base import EngineConfig, ImageLimits
from llm_service.settings import ImageSettings, Settings


def image_limits(images: ImageSettings) -> ImageLimits:
    return ImageLimits(
        max_images=images.max_per_request,
        max_bytes=images.max_bytes,
        max_pixels=images.max_pixels,
        fetch_hosts=tuple(images.fetch_hosts),
        fetch_timeout_seconds=images.fetch_timeout_seconds,
    )


def with_frontend(slots: list[tuple[EngineConfig, bool]], settings: Settings) -> list[tuple[EngineConfig, bool]]:
    """The slots' configs with the front-end options of `settings` filled in."""
    limits = image_limits(settings.images)
    return [(dataclasses.replace(config, images=limits), pinned) for config, pinned in slots]

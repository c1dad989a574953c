"""Images in requests: where they are, whether they are allowed, and what cache keys and traces see of them.

Policy only (no engine): a request's images are found in its chat content parts and its `images`
list, checked against ImageLimits (count, URL scheme and host, bytes, pixels, decodability of data:
URLs), and summarised by size and content hash, so cache keys tell images apart without holding
them and traces never carry their bytes. Fetching and decoding for the model is the engine's job.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

from llm_service.engines.base import ImageLimits
from llm_service.errors import InvalidRequest

# Content part types a chat message may carry; OpenAI's `detail` of an image_url is accepted and ignored.
TEXT_PART = "text"
IMAGE_PART = "image_url"


@dataclass(frozen=True)
class ImageRef:
    """One image of a request, checked; `location` names it in the request (messages.1.content.0)."""

    location: str
    url: str
    sha256: str | None = None  # of the decoded bytes of a data: URL; None for a remote URL
    size: int | None = None
    width: int | None = None
    height: int | None = None

    @property
    def remote(self) -> bool:
        return self.sha256 is None

    def summary(self) -> dict[str, Any]:
        """What cache keys and traces see instead of the image: never its bytes."""
        if self.remote:
            return {"type": "image", "url": self.url}
        return {"type": "image", "sha256": self.sha256, "bytes": self.size, "width": self.width,
                "height": self.height}


@dataclass(frozen=True)
class RequestImages:
    """A request's images, and its messages with every image replaced by its summary."""

    refs: tuple[ImageRef, ...] = ()
    summarised_messages: list[dict[str, Any]] | None = None

    @property
    def cacheable(self) -> bool:
        """A remote image may change behind the same URL, so only data: images are keyed by content."""
        return all(not ref.remote for ref in self.refs)

    def summaries(self) -> list[dict[str, Any]]:
        return [ref.summary() for ref in self.refs]


NO_IMAGES = RequestImages()


def find_images(messages: Sequence[dict[str, Any]] | None) -> list[tuple[str, str]]:
    """(location, url) of every image_url part; InvalidRequest for a content part we do not take."""
    found: list[tuple[str, str]] = []
    for m, message in enumerate(messages or ()):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for p, part in enumerate(content):
            location = f"messages.{m}.content.{p}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == TEXT_PART:
                if not isinstance(part.get("text"), str):
                    raise InvalidRequest("a text content part needs a string 'text'", param=location)
                continue
            if kind != IMAGE_PART:
                raise InvalidRequest(
                    f"content part type {kind!r} is not supported; use 'text' or 'image_url'", param=location
                )
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise InvalidRequest("an image_url part needs {'url': '...'}", param=location)
            found.append((location, url))
    return found


def _data_url_bytes(location: str, url: str, limits: ImageLimits) -> bytes:
    header, sep, data = url[5:].partition(",")
    media_type, _, encoding = header.rpartition(";")
    if not sep or encoding.lower() != "base64":
        raise InvalidRequest(f"image {location} is not a base64 data: URL (data:image/png;base64,...)",
                             param=location)
    if not media_type.lower().startswith("image/"):
        raise InvalidRequest(f"image {location} has media type {media_type!r}, not image/*", param=location)
    # Refuse by the encoded length first, so an oversized image is never decoded.
    if len(data) * 3 // 4 > limits.max_bytes + 3:
        raise InvalidRequest(f"image {location} is larger than {limits.max_bytes} bytes", param=location)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"image {location} is not valid base64", param=location) from None
    if len(raw) > limits.max_bytes:
        raise InvalidRequest(f"image {location} is larger than {limits.max_bytes} bytes", param=location)
    return raw


def check_image(location: str, url: str, limits: ImageLimits) -> ImageRef:
    """Check one image URL (blocking: decodes a data: URL). InvalidRequest says which image and why."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        raw = _data_url_bytes(location, url, limits)
        try:
            with Image.open(io.BytesIO(raw)) as image:
                width, height = image.size
                # Checked from the header, before decoding: a small file can hold a huge image.
                if width * height > limits.max_pixels:
                    raise InvalidRequest(
                        f"image {location} has {width}x{height} pixels, more than {limits.max_pixels}",
                        param=location,
                    )
                image.load()
        except InvalidRequest:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidRequest(f"image {location} cannot be decoded: {exc}", param=location) from None
        return ImageRef(location, url, hashlib.sha256(raw).hexdigest(), len(raw), width, height)
    if scheme in ("http", "https"):
        host = (urlsplit(url).hostname or "").lower()
        if not limits.fetch_hosts:
            raise InvalidRequest(
                f"image {location}: image URLs are not fetched (LLM_IMAGE_FETCH_HOSTS is empty); "
                "send the image as a data: URL",
                param=location,
            )
        if host not in limits.fetch_hosts:
            raise InvalidRequest(
                f"image {location}: host {host!r} is not in LLM_IMAGE_FETCH_HOSTS", param=location
            )
        return ImageRef(location, url)
    raise InvalidRequest(f"image {location}: URL scheme {scheme!r} is not supported (data: or http(s))",
                         param=location)


def _check_all(found: list[tuple[str, str]], limits: ImageLimits) -> tuple[ImageRef, ...]:
    return tuple(check_image(location, url, limits) for location, url in found)


def _summarised(messages: list[dict[str, Any]], refs: Sequence[ImageRef]) -> list[dict[str, Any]]:
    by_location = {ref.location: ref for ref in refs}
    summarised = []
    for m, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            content = [
                by_location[f"messages.{m}.content.{p}"].summary()
                if f"messages.{m}.content.{p}" in by_location
                else part
                for p, part in enumerate(content)
            ]
            message = {**message, "content": content}
        summarised.append(message)
    return summarised


async def inspect_images(
    messages: list[dict[str, Any]] | None, images: Sequence[str], limits: ImageLimits
) -> RequestImages:
    """Find and check a request's images (decoding runs off the event loop)."""
    found = find_images(messages) + [(f"images.{i}", url) for i, url in enumerate(images)]
    if not found:
        return NO_IMAGES
    if len(found) > limits.max_images:
        raise InvalidRequest(
            f"{len(found)} images in one request; at most {limits.max_images} (LLM_IMAGE_MAX_PER_REQUEST)",
            param=found[limits.max_images][0],
        )
    refs = await asyncio.to_thread(_check_all, found, limits)
    return RequestImages(refs, _summarised(messages, refs) if messages is not None else None)

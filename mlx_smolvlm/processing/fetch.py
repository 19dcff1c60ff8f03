"""Fetching an image: a file, an http(s) URL or a data URL, within limits, fully decoded.

One path for every caller: the CLIs and the Python API (any local file, any URL, PIL's
decompression-bomb limit) and the server (its byte and pixel limits, local files only under
an allowed directory, remote URLs optional). Errors name the source (and, for the server,
where in the request it was).
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class FetchLimits:
    """What may be fetched and how much of it."""

    max_bytes: int | None = None
    max_pixels: int | None = None  # None: PIL's decompression-bomb limit
    remote: bool = True  # fetch http(s) URLs
    local: bool = True  # read local files
    allowed_dir: Path | None = None  # local files only under this directory (relative to it)
    timeout: float = 10.0  # seconds for a whole download, not only for each socket operation


FETCH_STEP_S = 5.0  # longest wait for any one socket operation of a download


class FetchError(ValueError):
    """An image that cannot be fetched or decoded; `too_large` when a limit refused it."""

    def __init__(self, message: str, where: str | None = None, too_large: bool = False):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.too_large = too_large


def open_image(
    source: str | Path, limits: FetchLimits = FetchLimits(), where: str | None = None
) -> Image.Image:
    """Fetch and fully decode the image at `source` (EXIF orientation and mode untouched)."""
    name = str(source)
    if name.startswith("data:"):
        stream: Any = io.BytesIO(_data_url_bytes(name, where))
        name = name[:40] + "..."
    elif name.startswith(("http://", "https://")):
        if not limits.remote:
            raise FetchError(
                "this server does not fetch image URLs (--no-remote-images); "
                "send the image as a data: URL",
                where,
            )
        stream = io.BytesIO(_download(name, limits, where))
    else:
        stream = _local_file(source, limits, where)
    if limits.max_bytes is not None and isinstance(stream, io.BytesIO):
        if len(stream.getbuffer()) > limits.max_bytes:
            raise FetchError(
                f"the image is too large (more than {limits.max_bytes} bytes)", where, True
            )
    return _decode(stream, name, limits, where)


def _data_url_bytes(url: str, where: str | None) -> bytes:
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise FetchError("expected a data:image/...;base64, URL", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FetchError(f"Cannot decode image data URI {url[:40]}...: {e}", where) from e


def _download(url: str, limits: FetchLimits, where: str | None) -> bytes:
    """The bytes behind an http(s) URL, reading no more than the limit allows, within about
    `limits.timeout` seconds in all: a host that trickles its answer is cut off too."""
    deadline = time.monotonic() + limits.timeout
    # One byte past the limit is enough to know the image is too large.
    most = None if limits.max_bytes is None else limits.max_bytes + 1
    data = bytearray()
    try:
        # Each socket operation waits at most a step; the deadline is checked between reads.
        with urllib.request.urlopen(url, timeout=min(FETCH_STEP_S, limits.timeout)) as response:
            while most is None or len(data) < most:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no whole image within {limits.timeout:g} s")
                chunk = response.read1(2**16 if most is None else min(2**16, most - len(data)))
                if not chunk:
                    break
                data += chunk
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise FetchError(f"Cannot download image {url:.200}: {reason}", where) from e
    return bytes(data)


def _local_file(source: str | Path, limits: FetchLimits, where: str | None) -> Path:
    """A local image file; with `allowed_dir`, one inside it (relative paths start there)."""
    if not limits.local:
        raise FetchError(
            "local image paths are disabled (start the server with --allowed-image-dir); "
            "send a data: or http(s) URL",
            where,
        )
    if limits.allowed_dir is not None:
        allowed = limits.allowed_dir.resolve()
        missing = FetchError(f"no image file {str(source)!r:.200} in the allowed directory", where)
        try:
            path = (allowed / Path(str(source).removeprefix("file://")).expanduser()).resolve()
            if not path.is_relative_to(allowed) or not path.is_file():
                raise missing
        # A NUL byte, an over-long name or a symlink loop: the client's mistake, said as such.
        except (OSError, ValueError, RuntimeError):
            raise missing from None
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"Image file not found: {path}")
        if not path.is_file():
            raise FetchError(f"Cannot read image {path}: not a regular file", where)
    if limits.max_bytes is not None and path.stat().st_size > limits.max_bytes:
        raise FetchError(
            f"the image is too large (more than {limits.max_bytes} bytes)", where, True
        )
    return path


def _decode(stream: Any, name: str, limits: FetchLimits, where: str | None) -> Image.Image:
    """Open, check the pixel budget (before decoding) and decode an image."""
    limit = limits.max_pixels if limits.max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        image = Image.open(stream)
        pixels = image.width * image.height
        if limit is not None and pixels > limit:
            raise FetchError(
                f"the image is too large: {name} has {image.width}x{image.height} = {pixels} "
                f"pixels, more than {limit}; refusing to decode it",
                where,
                True,
            )
        image.load()  # decode now, so truncated files fail here and not mid-pipeline
    except Image.DecompressionBombError as e:
        raise FetchError(f"the image is too large: {name}: {e}", where, True) from e
    except UnidentifiedImageError as e:
        raise FetchError(f"{name} is not an image PIL can read", where) from e
    except FetchError:
        raise
    # Whatever PIL raises on hostile bytes (OSError, SyntaxError, struct.error...) is a bad
    # image, never a crash.
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise FetchError(f"Cannot read image {name}: {reason}", where) from e
    return image

"""Turning `image_url` parts into RGB images, refusing oversized, undecodable and decompression-bomb inputs."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from masters.config import ServeConfig

from serve.api import ServeError


def _bad_image(message: str, code: str = "invalid_image") -> ServeError:
    return ServeError(400, message, param="messages.content.image_url", code=code)


def _read_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise _bad_image("image data URLs must look like `data:image/<format>;base64,<data>`")
    # 4 base64 characters carry 3 bytes: refuse before decoding anything large.
    if len(payload) * 3 // 4 > max_bytes:
        raise _bad_image(
            f"image is larger than serve.max_image_bytes ({max_bytes} bytes); send a smaller image",
            code="image_too_large",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_image("image data URL does not hold valid base64") from None


def _read_local_file(url: str, config: ServeConfig) -> bytes:
    if not config.allow_local_images:
        raise _bad_image(
            "local image paths are disabled on this server (serve.allow_local_images=false); send a data URL",
            code="local_images_disabled",
        )
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise _bad_image(f"image file {str(path)!r} does not exist on the server")
    if path.stat().st_size > config.max_image_bytes:
        raise _bad_image(
            f"image file is larger than serve.max_image_bytes ({config.max_image_bytes} bytes)", code="image_too_large"
        )
    return path.read_bytes()


def load_image(url: str, config: ServeConfig) -> Image.Image:
    """The RGB image an `image_url` names: a base64 data URL, or a server path when the config allows it."""
    if url.startswith("data:"):
        data = _read_data_url(url, config.max_image_bytes)
    elif url.startswith(("http://", "https://")):
        raise _bad_image("remote image URLs are not fetched; send the image as a base64 data URL")
    else:
        data = _read_local_file(url, config)
    if len(data) > config.max_image_bytes:
        raise _bad_image(
            f"image is larger than serve.max_image_bytes ({config.max_image_bytes} bytes)", code="image_too_large"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            # The pixel count comes from the header: check it before decoding a bomb into memory.
            if image.width * image.height > config.max_image_pixels:
                raise _bad_image(
                    f"image is {image.width}x{image.height} pixels, more than serve.max_image_pixels "
                    f"({config.max_image_pixels})",
                    code="image_too_large",
                )
            return image.convert("RGB")
    except ServeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bad_image("image could not be decoded (not a PNG/JPEG/... image, or a decompression bomb)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise _bad_image(f"image could not be decoded: {exc}") from None

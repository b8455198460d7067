"""Image decoding with Pillow: size checked from the header before any pixel is decoded, then RGB.

Only common raster formats are probed (never EPS or other formats that shell out to helpers). The
colour conversion is Pillow's `convert("RGB")`, what transformers 4.52's `convert_to_rgb` and
LLaMA-Factory do (alpha is dropped, not composited). EXIF orientation is not applied, as in both.
"""

from __future__ import annotations

import warnings

from PIL import Image

from omnicore.data.media import DEFAULT_LIMITS, MediaError, MediaLimits, MediaSource, Reason, decoding, media_source

__all__ = ["IMAGE_FORMATS", "decode_image"]

# Probed in this order; JPEG also opens MPO (phone photos). Formats this Pillow build lacks are skipped.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "AVIF")


def _available_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin Pillow has (idempotent); we still probe only ours
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def decode_image(source: MediaSource, *, limits: MediaLimits = DEFAULT_LIMITS) -> Image.Image:
    """An RGB PIL image (H x W, mode "RGB") from an open binary file or bytes.

    `Image.open` reads only the header; the pixel count is checked against `limits.max_pixels`
    before `load()` decodes anything, so a 20000 x 20000 PNG or a decompression bomb costs nothing.
    Animated formats give their first frame.
    """
    stream, name = media_source(source)
    with decoding(name, "image"), warnings.catch_warnings():
        # Our own limit decides; Pillow's warning would only repeat it (its hard error still maps
        # to TOO_LARGE below).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream, formats=_available_formats())
        except Image.DecompressionBombError as e:
            raise MediaError(name, Reason.TOO_LARGE, str(e)) from e
        except Image.UnidentifiedImageError as e:
            formats = ", ".join(_available_formats())
            raise MediaError(name, Reason.CORRUPT, f"not a recognised image ({formats})") from e
        width, height = image.size
        if width <= 0 or height <= 0:
            raise MediaError(name, Reason.EMPTY, f"image size {width}x{height}")
        if width * height > limits.max_pixels:
            pixels = f"{width}x{height} = {width * height} pixels"
            raise MediaError(name, Reason.TOO_LARGE, f"{pixels}, over max_pixels {limits.max_pixels}")
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")

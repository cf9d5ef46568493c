"""Decoding one image into one view: header size, placement, reduced-scale decode, crop, resize.

:func:`decode_view` reads an image's size from its header, asks a placement (see
:mod:`selfsup.data.geometry`) for the box to cut, and decodes:

- JPEGs with libjpeg-turbo through ``torchvision.io.decode_jpeg``, or, when the box still has the
  output's pixels at 1/4 or 1/8 scale, through PIL's ``draft`` (libjpeg's DCT-domain scaling: the
  decoder produces the reduced image directly). Measured on 500x375 photographs: ``decode_jpeg``
  1.25 ms, PIL 1.83 ms, PIL at 1/2 scale 1.39 ms a CPU (``benchmarks/data_speed.py``), so 1/2 is
  not worth leaving libjpeg-turbo's faster path for;
- everything else (PNG, WebP, grayscale, CMYK, palette, 16-bit, ...) with PIL, converted to 8-bit RGB;

then crops and resizes once in torch (uint8, antialiased).

Every failure is a :class:`~selfsup.errors.DataError` naming the file (or a shard's key) and the fix.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from selfsup.data.geometry import Placement, WholeImage, crop_resize, reduction
from selfsup.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
"""File extensions accepted in a folder dataset (compared case-insensitively)."""

SKIP_HINT = "or pass --skip-bad-images (skip_bad=True) to skip bad files"


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    # A truncated file must fail, not decode as grey padding (a silent wrong result).
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _scale_to_uint8(array: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Map pixel values of any depth to 0..255 without clipping 16-bit images to white.

    ``sixteen_bit`` (PIL's ``I;16*`` modes) always divides by 257 (65535 -> 255). Otherwise (modes ``I``
    and ``F``): floats in [0, 1] are scaled by 255, values in 0..255 are kept, values in 0..65535 are
    taken as 16-bit, and anything else is min-max scaled.
    """
    values = array.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if sixteen_bit or (lo >= 0 and 255 < hi <= 65535):
        values = values / 257.0
    elif array.dtype.kind == "f" and lo >= 0 and hi <= 1.0:
        values = values * 255.0
    elif not (lo >= 0 and hi <= 255):
        values = (values - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, RGBA, P, CMYK, 1, 16-bit I;16*, I, F, ...) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(image), sixteen_bit=image.mode.startswith("I;16"))
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the palette's transparency needs RGBA first (PIL warns otherwise)
    return image.convert("RGB")


def not_image_message(path: str | Path) -> str:
    exts = " ".join(sorted(IMAGE_EXTENSIONS))
    return (
        f"{path} is not an image file (extension {Path(path).suffix or '(none)'!r}; accepted: {exts}): "
        f"move it out of the class folder, {SKIP_HINT}"
    )


@contextlib.contextmanager
def _errors_name(name: str) -> Iterator[None]:
    try:
        yield
    except UnidentifiedImageError:
        raise DataError(
            f"{name} is not a readable image (PIL cannot identify it): replace or remove it, {SKIP_HINT}"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{name} is corrupt or truncated ({err}): replace or remove it, {SKIP_HINT}") from None


def decode_view(
    source: str | Path | bytes,
    place: Placement,
    rng: np.random.Generator | None = None,
    name: str | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """Decode the view ``place`` chooses from one image file (or its bytes).

    Args:
        source: a path, or the encoded bytes (a shard's sample).
        place: a :class:`~selfsup.data.geometry.TrainCrop`, ``EvalCrop`` or ``WholeImage``.
        rng: the sample's generator (:func:`~selfsup.data.geometry.draw_rng`), for random crops.
        name: what errors call the image (default: the path).
        reduce: decode JPEGs at a reduced DCT scale when the box allows it.

    Returns:
        ``(3, S, S)`` uint8 RGB, ``S = place.size``.

    Raises:
        DataError: not an image, corrupt or truncated; the message names the image.
    """
    if isinstance(source, (str, Path)):
        name = name or str(source)
        if Path(source).suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(not_image_message(source))
        with _errors_name(name):
            data = Path(source).read_bytes()
    else:
        name, data = name or "<bytes>", bytes(source)
    with _errors_name(name), _strict_truncation(), Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        box = place.box(height, width, rng)
        jpeg = image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK")
        r = reduction(box, place.size) if reduce and jpeg else 1
        if jpeg and r < 4:
            pixels = decode_jpeg_bytes(data, name)  # (3, H, W)
        else:
            if r > 1:
                image.draft(None, (width // r, height // r))  # DCT scaling: libjpeg decodes at 1/r
            image.load()
            array = np.array(to_rgb(image), dtype=np.uint8)  # writable copy, so torch.from_numpy does not warn
            pixels = torch.from_numpy(array).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W), channels-last memory
    h, w = pixels.shape[1:]
    if (h, w) != (height, width):
        box = box.scaled(h / height, w / width, h, w)
    return crop_resize(pixels, box, place.size)


def decode_jpeg_bytes(data: bytes, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """Decode a JPEG with libjpeg-turbo (or nvJPEG when ``device`` is a GPU) to ``(3, H, W)`` uint8 RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                           device=device)
    except RuntimeError as err:
        reason = str(err).rsplit(", ", 1)[-1].strip() or "the JPEG decoder failed"
        raise DataError(f"{name} is corrupt or truncated ({reason}): replace or remove it, {SKIP_HINT}") from None


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one file whole to a ``(size, size, 3)`` uint8 RGB array (the small-image cache's view).

    Raises:
        DataError: the file is not an image, or is corrupt or truncated; the message names the path.
    """
    return decode_view(path, WholeImage(size)).permute(1, 2, 0).numpy()  # (3, S, S) -> (S, S, 3)


def image_size_of(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image, read from its header (no full decode)."""
    with _errors_name(str(path)), Image.open(path) as image:
        return image.size[1], image.size[0]

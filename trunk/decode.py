"""Reading and decoding image files, one file at a time, never taking the job down.

Every failure is an :class:`ImageError` whose ``reason`` is a short, stable phrase
(``"empty file"``, ``"not an image"``, ``"truncated image"``, ...) that callers put in
a row's ``error`` column. Pillow's guards stay on: no ``LOAD_TRUNCATED_IMAGES``, and the
decompression-bomb limit is enforced (its warning counts as an error too).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(Exception):
    """One file could not become an RGB image."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, or an :class:`ImageError` saying why not."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ImageError("file not found", str(p)) from None
    except IsADirectoryError:
        raise ImageError("is a directory", str(p)) from None
    except PermissionError:
        raise ImageError("permission denied", str(p)) from None
    except OSError as e:
        raise ImageError("unreadable file", f"{p}: {e.strerror or e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting convert() clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_image(data: bytes, name: str = "") -> Image.Image:
    """Decode bytes to an RGB image with EXIF orientation applied.

    Args:
        data: the encoded file.
        name: used only in error details.

    Raises:
        ImageError: with a short reason.
    """
    if not data:
        raise ImageError("empty file", name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.seek(0)  # animated formats: the first frame
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decompression bomb", f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image", name) from None
    except OSError as e:
        msg = str(e)
        reason = "truncated image" if "truncated" in msg.lower() else "corrupt image"
        raise ImageError(reason, f"{name}: {msg}") from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        # Pillow's plugins signal malformed headers with these.
        raise ImageError("corrupt image", f"{name}: {e}") from None


def load_image(path: str | Path) -> tuple[Image.Image, str]:
    """Read, hash and decode one file: ``(rgb_image, sha256_hex)``."""
    data = read_bytes(path)
    return decode_image(data, str(path)), sha256_bytes(data)

"""Reading and decoding image files, one file at a time, never taking the job down.

Every failure is an :class:`ImageError` whose ``reason`` is a short, stable phrase
(``"empty file"``, ``"not an image"``, ``"truncated image"``, ...) that callers put in
a row's ``error`` column. Pillow's guards stay on: no ``LOAD_TRUNCATED_IMAGES``, and the
decompression-bomb limit is enforced (its warning counts as an error too).

PNG chunk checksums are verified here, because Pillow checks them only for the chunks it
reads while opening a file: a damaged ``IDAT`` whose zlib stream still inflates would
otherwise decode silently to wrong pixels.

Paths containing ``"://"`` are fsspec URIs (``file://``, ``s3://``, ``memory://``, ...);
everything else is a local path.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

# Bump when a change here can turn a file that failed to decode into one that decodes (or
# back): decode failures remembered under another stamp are tried again (trunk.cache.DecodeErrors).
DECODER_VERSION = "1"


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


def decoder_stamp() -> str:
    """Which decoder judged a file: this module's :data:`DECODER_VERSION` and Pillow's version.

    A decode failure is a fact about the bytes *and* the decoder: a newer Pillow may read a
    file an older one refused, so a remembered failure holds only under the same stamp.
    """
    return f"decode-{DECODER_VERSION}/pillow-{PIL.__version__}"


def _first_line(text: object, limit: int = 200) -> str:
    # Some backends (hdfs via pyarrow) put pages of diagnostics in one message.
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read_uri(uri: str) -> bytes:
    """Bytes of an fsspec URI, or an :class:`ImageError`."""
    import fsspec  # only URIs need it

    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        # Object stores have no real folders: a prefix reads as "not found", so ask.
        if _uri_is_dir(uri):
            raise ImageError("is a directory", uri) from None
        raise ImageError("file not found", uri) from None
    except IsADirectoryError:
        raise ImageError("is a directory", uri) from None
    except PermissionError:
        raise ImageError("permission denied", uri) from None
    except Exception as e:  # noqa: BLE001 - any backend, any exception type: one bad file never ends a job
        # Includes ImportError ("Install s3fs to access S3") and ValueError ("Protocol not known").
        raise ImageError("unreadable file", f"{uri}: {type(e).__name__}: {_first_line(e)}") from None


def _uri_is_dir(uri: str) -> bool:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
        return bool(fs.isdir(path))
    except Exception:  # noqa: BLE001 - only refines the reason; "file not found" stands otherwise
        return False


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, or an :class:`ImageError` saying why not.

    Args:
        path: a local path, or an fsspec URI (any string containing ``"://"``, e.g.
            ``file:///data/a.jpg``, ``s3://bucket/a.jpg``, ``memory://a.png``), read with
            ``fsspec.open``; a protocol whose package is missing gives ``"unreadable file"``.

    Raises:
        ImageError: ``"file not found"``, ``"is a directory"``, ``"permission denied"`` or
            ``"unreadable file"``; never anything else for a bad file.
    """
    if isinstance(path, str) and "://" in path:
        return _read_uri(path)
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
    except ValueError as e:  # e.g. "embedded null byte"
        raise ImageError("unreadable file", f"{p!s}: {e}") from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png_crcs(data: bytes, name: str) -> None:
    """Raise ``"corrupt image"`` if any complete PNG chunk fails its CRC.

    Pillow verifies CRCs only for chunks read while opening (``IHDR`` and the ancillary
    chunks before the first ``IDAT``), and a bad ``IHDR`` CRC comes out of it as "cannot
    identify image file". Chunks cut short by the end of the data are left to Pillow, which
    reports them as truncated.
    """
    view = memoryview(data)
    pos, end = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= end:
        (length,) = struct.unpack_from(">I", data, pos)
        stop = pos + 8 + length
        if stop + 4 > end:
            return
        (crc,) = struct.unpack_from(">I", data, stop)
        if zlib.crc32(view[pos + 4 : stop]) != crc:
            ctype = bytes(view[pos + 4 : pos + 8]).decode("latin-1")
            raise ImageError("corrupt image", f"{name}: bad CRC in PNG {ctype!r} chunk at byte {pos}")
        if view[pos + 4 : pos + 8] == b"IEND":
            return
        pos = stop + 4


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


def decode_image(data: bytes, name: str = "", draft_side: int | None = None) -> Image.Image:
    """Decode bytes to an RGB image with EXIF orientation applied.

    Animated formats give their first frame; 16-bit greyscale is scaled to 8 bits, not
    clipped; palette transparency is dropped to the palette colour.

    Args:
        data: the encoded file.
        name: used only in error details.
        draft_side: if given, JPEGs are downscaled by the decoder itself (Pillow's draft
            mode: DCT scaling by 1/2, 1/4 or 1/8) to the coarsest scale whose shorter side is
            still at least ``draft_side`` pixels; an image already smaller is left as is.
            Other formats are unaffected.

    Raises:
        ImageError: with a short reason.
        ValueError: if ``draft_side`` is below 1 (a caller's mistake, not a bad file).
    """
    if draft_side is not None and draft_side < 1:
        raise ValueError(f"draft_side must be a positive number of pixels, got {draft_side}")
    if not data:
        raise ImageError("empty file", name)
    if data[:8] == _PNG_SIGNATURE:
        _check_png_crcs(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.seek(0)  # animated formats: the first frame
                if draft_side is not None:
                    # JPEG only (a no-op elsewhere). Pillow picks scale s in {1, 2, 4, 8} with
                    # s <= min(w // side, h // side), so both sides stay >= draft_side.
                    img.draft(None, (draft_side, draft_side))
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
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, zlib.error) as e:
        # Pillow's plugins signal malformed headers with these.
        raise ImageError("corrupt image", f"{name}: {e}") from None


def load_image(path: str | Path, draft_side: int | None = None) -> tuple[Image.Image, str]:
    """Read, hash and decode one file: ``(rgb_image, sha256_hex)``; see :func:`decode_image`."""
    data = read_bytes(path)
    return decode_image(data, str(path), draft_side=draft_side), sha256_bytes(data)

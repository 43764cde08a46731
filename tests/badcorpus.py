"""A generated corpus of the files a real image folder throws at a job, good and bad.

``make_bad_corpus(folder)`` writes one file (or path) per kind in :data:`KINDS` and returns
one :class:`BadCase` each. ``expect`` is either ``"ok"`` (must decode to RGB and be
classified; ``reference`` then holds the RGB pixels a correct decoder gives, to within
``tolerance``) or the :class:`trunk.decode.ImageError` reason the file must produce.

Everything is deterministic: each kind draws from its own seeded generator, so adding a
kind never changes another's bytes. Nothing here allocates a big image or touches Pillow's
global settings (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``).

The ``"vanished"`` kind stands for a file deleted between listing and reading: by default
the builder writes it and deletes it at once, so its path is in the returned list but not
on disk. A test that lists the folder itself can pass ``keep_vanishing=True`` and call
:func:`vanish` after listing.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

KINDS = (
    "empty",
    "html_as_jpg",
    "truncated_jpeg",
    "png_bad_crc",
    "decompression_bomb",
    "cmyk_jpeg",
    "png_16bit",
    "palette_transparency",
    "exif_rotated",
    "animated_gif",
    "grayscale_jpeg",
    "vanished",
    "folder",
)


@dataclass(eq=False)
class BadCase:
    """One corpus entry.

    Attributes:
        kind: one of :data:`KINDS`.
        path: where it is (or, for ``"vanished"``, was).
        expect: ``"ok"`` or the expected ``ImageError.reason``.
        reference: for ``"ok"`` kinds, the ``(H, W, 3)`` uint8 pixels a correct decode gives.
        tolerance: largest mean absolute difference from ``reference`` (0-255 levels)
            that still counts as right; lossy formats need a little.
    """

    kind: str
    path: Path
    expect: str
    reference: np.ndarray | None = None
    tolerance: float = 0.0

    @property
    def ok(self) -> bool:
        return self.expect == "ok"

    def difference(self, rgb: np.ndarray | Image.Image) -> float:
        """Mean absolute difference of a decoded image from :attr:`reference`.

        Raises:
            AssertionError: when there is no reference or the shapes differ.
        """
        arr = np.asarray(rgb)
        assert self.reference is not None, f"{self.kind}: no reference pixels for an {self.expect!r} case"
        assert arr.shape == self.reference.shape, f"{self.kind}: shape {arr.shape} != {self.reference.shape}"
        return float(np.abs(arr.astype(np.int16) - self.reference.astype(np.int16)).mean())

    def matches(self, rgb: np.ndarray | Image.Image) -> bool:
        """Whether a decoded image is :attr:`reference` to within :attr:`tolerance`."""
        return self.difference(rgb) <= self.tolerance


def vanish(case: BadCase) -> None:
    """Delete a case's file now (for ``keep_vanishing=True`` corpora, after listing)."""
    case.path.unlink(missing_ok=True)


def picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth, asymmetric RGB content with mild noise: survives JPEG, shows any rotation."""
    yy, xx = np.mgrid[0:height, 0:width]
    r = 30 + 190 * xx / max(width - 1, 1)
    g = 30 + 190 * yy / max(height - 1, 1)
    b = np.where((xx < width // 2) & (yy < height // 2), 200.0, 60.0)
    arr = np.stack([r, g, b], axis=-1) + rng.integers(-3, 4, (height, width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """``(type, offset, payload_length)`` of each chunk of a complete PNG."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append((data[pos + 4 : pos + 8], pos, length))
        pos += 12 + length
    return out


def flip_byte(data: bytes, offset: int) -> bytes:
    buf = bytearray(data)
    buf[offset] ^= 0xFF
    return bytes(buf)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid, tiny PNG whose header claims ``width x height`` RGB pixels.

    Pillow refuses it on opening (the size alone is over its limit), so nothing large is
    ever allocated; the IDAT is a real but short zlib stream.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_with_bad_idat_crc(rgb: np.ndarray) -> bytes:
    """A PNG of ``rgb`` whose pixel data is intact but whose IDAT CRC is wrong.

    Pillow decodes this without complaint (it checks no IDAT CRC); our decoder must not.
    """
    data = _encode(Image.fromarray(rgb), "PNG")
    _, pos, length = next(c for c in png_chunks(data) if c[0] == b"IDAT")
    return flip_byte(data, pos + 8 + length)  # first byte of the CRC


# -- one builder per kind: (folder, size, rng) -> BadCase ---------------------------------


def _empty(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    path = folder / "empty.jpg"
    path.write_bytes(b"")
    return BadCase("empty", path, "empty file")


def _html_as_jpg(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    path = folder / "html_as.jpg"
    path.write_bytes(b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
                     b"<body><h1>Not Found</h1></body></html>\n")
    return BadCase("html_as_jpg", path, "not an image")


def _truncated_jpeg(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    data = _encode(Image.fromarray(picture(rng, size, size)), "JPEG", quality=90)
    path = folder / "truncated.jpg"
    path.write_bytes(data[: len(data) * 2 // 3])  # headers intact, scan data cut short
    return BadCase("truncated_jpeg", path, "truncated image")


def _png_bad_crc(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    path = folder / "bad_crc.png"
    path.write_bytes(png_with_bad_idat_crc(picture(rng, size, size)))
    return BadCase("png_bad_crc", path, "corrupt image")


def _decompression_bomb(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    path = folder / "bomb.png"
    path.write_bytes(bomb_png())
    return BadCase("decompression_bomb", path, "decompression bomb")


def _cmyk_jpeg(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    rgb = picture(rng, size, size)
    path = folder / "cmyk.jpg"
    path.write_bytes(_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
    return BadCase("cmyk_jpeg", path, "ok", rgb, tolerance=6.0)


def _png_16bit(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    # Every 8-bit level v is stored as v * 257 plus low-byte noise that still rounds back
    # to v, so a decoder that scales gets v exactly and one that clips gets mostly 255.
    grey8 = picture(rng, size, size)[..., 0]
    grey16 = grey8.astype(np.int32) * 257 + rng.integers(-100, 101, grey8.shape)
    grey16 = np.clip(grey16, 0, 65535).astype(np.uint16)
    path = folder / "grey16.png"
    path.write_bytes(_encode(Image.fromarray(grey16), "PNG"))
    return BadCase("png_16bit", path, "ok", np.repeat(grey8[..., None], 3, axis=-1), tolerance=0.0)


def _palette_transparency(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    colours = np.array([[0, 0, 0], [230, 20, 20], [20, 200, 40], [30, 40, 220], [240, 240, 240]], np.uint8)
    index = rng.integers(0, len(colours), (size, size)).astype(np.uint8)
    img = Image.frombytes("P", (size, size), index.tobytes())
    img.putpalette(colours.flatten().tolist())
    path = folder / "palette_transparent.png"
    path.write_bytes(_encode(img, "PNG", transparency=0))  # index 0 fully transparent
    # Dropping alpha leaves a transparent pixel its palette colour.
    return BadCase("palette_transparency", path, "ok", colours[index], tolerance=0.0)


def _exif_rotated(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    stored = picture(rng, size // 2, size)  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise
    path = folder / "exif_rotated.jpg"
    path.write_bytes(_encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=exif.tobytes()))
    return BadCase("exif_rotated", path, "ok", np.rot90(stored, k=-1).copy(), tolerance=6.0)


def _animated_gif(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    # Few exact colours, so the GIF palette keeps them and the first frame is exact.
    colours = np.array([[250, 10, 10], [10, 10, 250], [10, 250, 10], [250, 250, 10]], np.uint8)
    frames = [colours[rng.integers(0, len(colours), (size, size))] for _ in range(3)]
    images = [Image.fromarray(f) for f in frames]
    path = folder / "animated.gif"
    path.write_bytes(_encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0))
    return BadCase("animated_gif", path, "ok", frames[0], tolerance=0.0)


def _grayscale_jpeg(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    grey = picture(rng, size, size)[..., 1]
    path = folder / "grey.jpg"
    path.write_bytes(_encode(Image.fromarray(grey), "JPEG", quality=95))
    return BadCase("grayscale_jpeg", path, "ok", np.repeat(grey[..., None], 3, axis=-1), tolerance=6.0)


def _vanished(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    path = folder / "vanished.jpg"
    path.write_bytes(_encode(Image.fromarray(picture(rng, size, size)), "JPEG"))
    return BadCase("vanished", path, "file not found")


def _folder(folder: Path, size: int, rng: np.random.Generator) -> BadCase:
    path = folder / "folder.jpg"
    path.mkdir(exist_ok=True)
    return BadCase("folder", path, "is a directory")


_BUILDERS: dict[str, Callable[[Path, int, np.random.Generator], BadCase]] = {
    "empty": _empty,
    "html_as_jpg": _html_as_jpg,
    "truncated_jpeg": _truncated_jpeg,
    "png_bad_crc": _png_bad_crc,
    "decompression_bomb": _decompression_bomb,
    "cmyk_jpeg": _cmyk_jpeg,
    "png_16bit": _png_16bit,
    "palette_transparency": _palette_transparency,
    "exif_rotated": _exif_rotated,
    "animated_gif": _animated_gif,
    "grayscale_jpeg": _grayscale_jpeg,
    "vanished": _vanished,
    "folder": _folder,
}
assert tuple(_BUILDERS) == KINDS


def make_bad_corpus(folder: Path, size: int = 48, keep_vanishing: bool = False) -> list[BadCase]:
    """Write one file (or folder) per kind in :data:`KINDS` under ``folder``.

    Args:
        folder: created if missing; must not already hold the corpus.
        size: side of the generated images in pixels (at least 8).
        keep_vanishing: leave the ``"vanished"`` file on disk for the caller to
            :func:`vanish` after listing; by default it is deleted before returning.

    Returns:
        One :class:`BadCase` per kind, in :data:`KINDS` order, with absolute paths.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for kind, build in _BUILDERS.items():
        rng = np.random.default_rng(zlib.crc32(kind.encode()))
        cases.append(build(folder, size, rng))
    if not keep_vanishing:
        vanish(next(c for c in cases if c.kind == "vanished"))
    return cases


def make_good_images(folder: Path, n: int, size: int = 48, seed: int = 0) -> list[Path]:
    """``n`` ordinary images (solid colours with noise), alternating JPEG and PNG.

    Returns:
        Their absolute paths, ``good_000.jpg``, ``good_001.png``, ...
    """
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        colour = rng.integers(0, 256, 3)
        arr = np.clip(colour + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"good_{i:03d}.{'jpg' if i % 2 == 0 else 'png'}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths

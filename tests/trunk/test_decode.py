import importlib.util
import io
import os
import struct
import uuid
import zlib

import fsspec
import numpy as np
import pytest
from PIL import Image

from tests.badcorpus import bomb_png, flip_byte, picture, png_chunk, png_chunks, png_with_bad_idat_crc
from trunk.decode import ImageError, decode_image, load_image, read_bytes, sha256_bytes


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_png_roundtrip(image_factory):
    path = image_factory("a.png", color=(10, 200, 30))
    img, sha = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 40)
    assert sha == sha256_bytes(path.read_bytes())


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "LA", "P"])
def test_modes_become_rgb(mode):
    img = Image.new("RGB", (8, 6), (120, 40, 200)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert decode_image(_encode(img, fmt)).mode == "RGB"


def test_palette_with_transparency_and_16bit():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert decode_image(_encode(p, "PNG", transparency=0)).getpixel((0, 0)) == (255, 0, 0)
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    img16 = Image.fromarray(arr)
    out = decode_image(_encode(img16, "PNG"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped garbage


def test_exif_orientation_applied():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 30)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(buf.getvalue()).getpixel((2, 2))
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"<html><body>not found</body></html>", "not an image"),
    ],
)
def test_bad_bytes_have_reasons(data, reason):
    with pytest.raises(ImageError) as e:
        decode_image(data, "x.jpg")
    assert e.value.reason == reason


def test_truncated_jpeg_is_an_error_not_a_partial_image():
    data = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageError) as e:
        decode_image(data[: len(data) // 2], "t.jpg")
    assert e.value.reason in ("truncated image", "corrupt image")


@pytest.mark.parametrize("side", [10000, 30000])  # over the limit (a warning) and over twice it (an error)
def test_decompression_bomb_is_refused(side):
    assert Image.MAX_IMAGE_PIXELS < side * side  # Pillow's default limit, untouched
    with pytest.raises(ImageError) as e:
        decode_image(bomb_png(side, side), "bomb.png")
    assert e.value.reason == "decompression bomb"


def test_read_bytes_errors(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        read_bytes(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        read_bytes(tmp_path)
    with pytest.raises(ImageError, match="unreadable file"):
        read_bytes(str(tmp_path / "nul\x00.jpg"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_read_bytes_permission_denied(tmp_path):
    path = tmp_path / "secret.jpg"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(ImageError, match="permission denied"):
        read_bytes(path)


# -- PNG checksums ------------------------------------------------------------------------


def _png(rng_seed: int = 0, size: int = 16) -> tuple[bytes, np.ndarray]:
    arr = picture(np.random.default_rng(rng_seed), size, size)
    return _encode(Image.fromarray(arr), "PNG"), arr


def _chunk(data: bytes, ctype: bytes) -> tuple[int, int]:
    return next((pos, length) for t, pos, length in png_chunks(data) if t == ctype)


def _damage(data: bytes, where: str) -> bytes:
    if where == "ihdr_crc":
        pos, length = _chunk(data, b"IHDR")
        return flip_byte(data, pos + 8 + length)
    pos, length = _chunk(data, b"IDAT")
    if where == "idat_crc":  # pixel data intact: Pillow alone decodes this
        return flip_byte(data, pos + 8 + length)
    damaged = flip_byte(data, pos + 8 + length // 2)
    if where == "idat_data":
        return damaged
    if where == "idat_data_crc_fixed":  # only zlib can tell
        crc = zlib.crc32(damaged[pos + 4 : pos + 8 + length])
        return damaged[: pos + 8 + length] + struct.pack(">I", crc) + damaged[pos + 12 + length :]
    if where == "text_crc":  # an ancillary chunk after the pixels
        iend = _chunk(data, b"IEND")[0]
        text = bytearray(png_chunk(b"tEXt", b"Comment\x00hello"))
        text[-1] ^= 0xFF
        return data[:iend] + bytes(text) + data[iend:]
    raise AssertionError(where)


@pytest.mark.parametrize("where", ["ihdr_crc", "idat_crc", "idat_data", "idat_data_crc_fixed", "text_crc"])
def test_damaged_png_is_corrupt_not_decoded(where):
    data, _ = _png()
    with pytest.raises(ImageError) as e:
        decode_image(_damage(data, where), "d.png")
    assert e.value.reason == "corrupt image"


def test_bad_idat_crc_helper_really_has_intact_pixels():
    # The corpus's bad-CRC PNG is the case Pillow accepts on its own; keep it that way.
    arr = picture(np.random.default_rng(1), 16, 16)
    with Image.open(io.BytesIO(png_with_bad_idat_crc(arr))) as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), arr)


def test_intact_png_with_text_chunk_and_trailing_bytes_decodes():
    data, arr = _png()
    iend = _chunk(data, b"IEND")[0]
    data = data[:iend] + png_chunk(b"tEXt", b"Comment\x00hello") + data[iend:] + b"\x00junk after IEND"
    assert np.array_equal(np.asarray(decode_image(data)), arr)


def test_truncated_png_is_still_truncated():
    data, _ = _png(size=32)
    with pytest.raises(ImageError) as e:
        decode_image(data[: len(data) // 2], "t.png")
    assert e.value.reason == "truncated image"


# -- draft mode ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    arr = picture(np.random.default_rng(2), 768, 1024)
    return _encode(Image.fromarray(arr), "JPEG", quality=90)


def test_draft_reduces_a_jpeg_and_stays_close_to_a_full_decode(big_jpeg):
    out = decode_image(big_jpeg, "big.jpg", draft_side=100)
    assert out.mode == "RGB"
    assert 100 <= min(out.size) < 768 // 2  # reduced while decoding, never below the side
    assert out.size[0] / out.size[1] == pytest.approx(1024 / 768, rel=0.02)
    full = decode_image(big_jpeg).resize(out.size, Image.Resampling.BOX)
    assert np.abs(np.asarray(out, np.int16) - np.asarray(full, np.int16)).mean() < 3.0


@pytest.mark.parametrize("side, expected", [(1, (128, 96)), (96, (128, 96)), (97, (256, 192)),
                                            (384, (512, 384)), (385, (1024, 768)), (5000, (1024, 768))])
def test_draft_picks_the_coarsest_scale_that_keeps_the_side(big_jpeg, side, expected):
    out = decode_image(big_jpeg, draft_side=side)
    assert out.size == expected
    assert min(out.size) >= min(side, 768)


def test_draft_keeps_exif_rotation_and_mode_handling():
    stored = picture(np.random.default_rng(3), 200, 400)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode_image(_encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes()), draft_side=50)
    assert rotated.size == (50, 100)  # drafted 1/4 to 100x50, then turned upright
    cmyk = decode_image(_encode(Image.fromarray(stored).convert("CMYK"), "JPEG"), draft_side=50)
    grey = decode_image(_encode(Image.fromarray(stored).convert("L"), "JPEG"), draft_side=50)
    assert cmyk.mode == grey.mode == "RGB" and cmyk.size == grey.size == (100, 50)


def test_draft_leaves_other_formats_alone():
    img = Image.fromarray(picture(np.random.default_rng(4), 64, 96))
    for fmt in ("PNG", "GIF", "WEBP"):
        assert decode_image(_encode(img, fmt), draft_side=8).size == (96, 64)


def test_draft_side_must_be_positive():
    with pytest.raises(ValueError, match="draft_side"):
        decode_image(b"x", draft_side=0)


# -- fsspec URIs --------------------------------------------------------------------------


def test_file_uri_reads_like_a_path(image_factory, tmp_path):
    path = image_factory("a.jpg")
    assert read_bytes(path.as_uri()) == path.read_bytes()
    img, sha = load_image(path.as_uri())
    assert img.size == (40, 40) and sha == sha256_bytes(path.read_bytes())
    with pytest.raises(ImageError) as e:
        read_bytes((tmp_path / "missing.jpg").as_uri())
    assert e.value.reason == "file not found"
    with pytest.raises(ImageError) as e:
        read_bytes(tmp_path.as_uri())
    assert e.value.reason == "is a directory"


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/test-{uuid.uuid4().hex}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_memory_uri(memfs):
    fs, root = memfs
    data = _encode(Image.new("RGB", (5, 7), (9, 9, 9)), "PNG")
    fs.pipe(f"{root}/sub/a.png", data)
    assert read_bytes(f"memory://{root}/sub/a.png") == data
    assert load_image(f"memory://{root}/sub/a.png")[0].size == (5, 7)
    for uri, reason in [(f"memory://{root}/missing.png", "file not found"),
                        (f"memory://{root}/sub", "is a directory")]:  # a prefix, as in object stores
        with pytest.raises(ImageError) as e:
            read_bytes(uri)
        assert e.value.reason == reason


def test_unknown_or_uninstalled_protocol_is_unreadable():
    with pytest.raises(ImageError) as e:
        read_bytes("nosuchprotocol://bucket/a.jpg")
    assert e.value.reason == "unreadable file" and "nosuchprotocol" in e.value.detail
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(ImageError) as e:
            read_bytes("s3://bucket/a.jpg")
        assert e.value.reason == "unreadable file" and "s3fs" in e.value.detail

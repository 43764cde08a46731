import io

import numpy as np
import pytest
from PIL import Image

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


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError) as e:
        decode_image(_encode(Image.new("RGB", (20, 20)), "PNG"), "bomb.png")
    assert e.value.reason == "decompression bomb"


def test_read_bytes_errors(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        read_bytes(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        read_bytes(tmp_path)

"""The demo's default data set: synthetic images with four independent attributes.

Each image shows 1 to 4 copies of one shape in one colour on a grey, textured
background. The four attributes (``shape``, ``colour``, ``count``, ``texture``) are drawn
independently and uniformly, so a model trained on some of them learns nothing about the
others from label correlations; objects vary in size, position, rotation and shade, and
every pixel carries noise, so no attribute can be read off one pixel.

Layout written by :func:`generate_shapes`::

    out_dir/images/<id>.png                 labelled images
    out_dir/manifests/<attribute>.csv       path,label,split,slice (paths relative to manifests/)
    out_dir/holdout/<id>.png                unlabelled images to classify
    out_dir/holdout_labels.csv              path,shape,colour,count,texture (paths relative to out_dir)
    out_dir/_DONE.json                      the parameters; written last

Generation is deterministic: the same parameters give byte-identical PNGs. The ``slice``
column is the object size (``small``/``large``): small objects are the harder subgroup.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from trunk.files import write_json_atomic

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "cross"],
    "colour": ["red", "green", "blue", "yellow"],
    "count": ["1", "2", "3", "4"],
    "texture": ["plain", "stripes", "dots", "checker"],
}
SIZES = ("small", "large")
DONE_FILE = "_DONE.json"
# Bump when the rendering changes, so an old folder is never mistaken for a new one.
GENERATOR_VERSION = 1
VAL_FRACTION = 0.2

_RGB = {"red": (215, 45, 40), "green": (45, 175, 60), "blue": (45, 75, 215), "yellow": (225, 205, 40)}
# Object side as a fraction of the image side, per size slice.
_SIDE = {"small": (0.14, 0.20), "large": (0.22, 0.30)}
_PNG = re.compile(r"^\d+\.png$")


@dataclass
class SyntheticDataset:
    """Where a generated data set lives.

    Attributes:
        root: the output folder.
        manifests: attribute name -> its manifest CSV (``path,label,split,slice``).
        holdout_dir: folder of unlabelled held-out images.
        holdout_labels: CSV with the held-out images' true attributes.
        n_images: labelled images.
        n_holdout: held-out images.
    """

    root: Path
    manifests: dict[str, Path]
    holdout_dir: Path
    holdout_labels: Path
    n_images: int
    n_holdout: int


def _params(n_images: int, n_holdout: int, size: int, seed: int) -> dict[str, Any]:
    return {"generator": "shapes", "version": GENERATOR_VERSION, "n_images": n_images,
            "n_holdout": n_holdout, "size": size, "seed": seed, "attributes": ATTRIBUTES}


def _dataset(root: Path, n_images: int, n_holdout: int) -> SyntheticDataset:
    return SyntheticDataset(
        root=root,
        manifests={a: root / "manifests" / f"{a}.csv" for a in ATTRIBUTES},
        holdout_dir=root / "holdout",
        holdout_labels=root / "holdout_labels.csv",
        n_images=n_images,
        n_holdout=n_holdout,
    )


# -- rendering ---------------------------------------------------------------------------
def _background(rng: np.random.Generator, texture: str, size: int) -> np.ndarray:
    """A grey (H, W) float background; texture is luminance only, so colour stays the objects'."""
    base = rng.uniform(95.0, 165.0)
    if texture == "plain":
        return np.full((size, size), base)
    contrast = rng.uniform(35.0, 60.0) * rng.choice([-1.0, 1.0])
    period = rng.uniform(0.11, 0.18) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    phase_y, phase_x = rng.uniform(0.0, period, 2)
    if texture == "stripes":
        angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * math.pi + rng.uniform(-0.1, 0.1)
        u = xx * math.cos(angle) + yy * math.sin(angle) + phase_x
        mask = (u % period) < period / 2
    elif texture == "checker":
        mask = (((xx + phase_x) // (period / 2)) + ((yy + phase_y) // (period / 2))) % 2 == 0
    elif texture == "dots":
        dy = (yy + phase_y) % period - period / 2
        dx = (xx + phase_x) % period - period / 2
        mask = dx * dx + dy * dy < (period * 0.22) ** 2
    else:  # pragma: no cover - ATTRIBUTES lists every texture
        raise ValueError(f"unknown texture {texture!r}")
    return base + contrast * mask


def _polygon(shape: str, cx: float, cy: float, side: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    elif shape == "triangle":
        pts = [(0.0, -0.55), (0.55, 0.45), (-0.55, 0.45)]
    else:  # cross: a plus sign with arms a third of the side wide
        a, b = 1 / 6, 0.5
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
               (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + side * (x * c - y * s), cy + side * (x * s + y * c)) for x, y in pts]


def _place(rng: np.random.Generator, sides: list[float], size: int) -> list[tuple[float, float]]:
    """Centres for objects inside the image (bar a corner tip) that do not touch: count stays countable."""
    # 0.6 * side clears every shape bar a rotated square's or triangle's corner tip.
    radii = [0.6 * s for s in sides]
    for _ in range(200):
        centres: list[tuple[float, float]] = []
        for side, r in zip(sides, radii):
            for _ in range(50):
                cx, cy = rng.uniform(side / 2, size - side / 2, 2)
                if all(math.hypot(cx - x, cy - y) > r + rr for (x, y), rr in zip(centres, radii)):
                    centres.append((float(cx), float(cy)))
                    break
            else:
                break
        if len(centres) == len(sides):
            return centres
    raise RuntimeError(f"cannot place {len(sides)} objects in a {size}px image")  # pragma: no cover


def render(rng: np.random.Generator, labels: dict[str, str], size_slice: str, size: int) -> Image.Image:
    """Draw one image with the given attribute values.

    Args:
        rng: the image's own random stream.
        labels: a value for every attribute in :data:`ATTRIBUTES`.
        size_slice: ``small`` or ``large`` objects.
        size: image side in pixels.

    Returns:
        An RGB image.
    """
    grey = _background(rng, labels["texture"], size)
    img = Image.fromarray(np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    draw = ImageDraw.Draw(img)
    lo, hi = _SIDE[size_slice]
    sides = [float(rng.uniform(lo, hi) * size) for _ in range(int(labels["count"]))]
    centres = _place(rng, sides, size)
    base = np.array(_RGB[labels["colour"]], dtype=np.float64)
    for (cx, cy), side in zip(centres, sides):
        fill = tuple(int(v) for v in np.clip(base + rng.uniform(-25, 25, 3), 0, 255))
        angle = float(rng.uniform(0, 2 * math.pi))
        if labels["shape"] == "circle":
            r = side / 2
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(labels["shape"], cx, cy, side, angle), fill=fill)
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0.0, 6.0, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _draw_labels(rng: np.random.Generator) -> tuple[dict[str, str], str]:
    labels = {attr: values[int(rng.integers(len(values)))] for attr, values in ATTRIBUTES.items()}
    return labels, SIZES[int(rng.integers(len(SIZES)))]


# -- the data set -----------------------------------------------------------------------
def _check_existing(out_dir: Path, params: dict[str, Any]) -> bool:
    """True when ``out_dir`` already holds exactly this data set; error if it holds another."""
    done = out_dir / DONE_FILE
    if not done.is_file():
        return False
    try:
        found = json.loads(done.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{done}: not valid JSON ({e}); delete the folder and generate again") from None
    if found == params:
        return True
    diff = [f"{k}={found.get(k)!r} (asked {v!r})" for k, v in params.items() if found.get(k) != v]
    raise ValueError(
        f"{out_dir} already holds a synthetic data set made with other parameters: {', '.join(diff)}; "
        f"use another folder or delete this one"
    )


def _clear_stale(folder: Path, keep: set[str]) -> None:
    # A crashed run with other parameters may have left images this data set does not have.
    if folder.is_dir():
        for p in folder.iterdir():
            if _PNG.match(p.name) and p.name not in keep:
                p.unlink()


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)


def generate_shapes(
    out_dir: str | Path,
    *,
    n_images: int = 3000,
    n_holdout: int = 300,
    size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> SyntheticDataset:
    """Generate (or find already generated) the synthetic shapes data set.

    A rerun with the same parameters into the same folder does nothing and returns the
    same description. ``_DONE.json`` is written last, so an interrupted run is simply
    redone.

    Args:
        out_dir: output folder (created if missing).
        n_images: labelled images, split about 80/20 into train/val.
        n_holdout: unlabelled held-out images.
        size: image side in pixels.
        seed: everything random derives from it.
        progress: show a progress bar.

    Returns:
        Where the images, manifests and held-out set are.

    Raises:
        ValueError: bad parameters, or ``out_dir`` holds a data set made with others.
    """
    if n_images < 2:
        raise ValueError(f"n_images must be at least 2, got {n_images}")
    if n_holdout < 0:
        raise ValueError(f"n_holdout must be >= 0, got {n_holdout}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    out_dir = Path(out_dir)
    params = _params(n_images, n_holdout, size, seed)
    dataset = _dataset(out_dir, n_images, n_holdout)
    if _check_existing(out_dir, params):
        return dataset

    images_dir, holdout_dir = out_dir / "images", dataset.holdout_dir
    for d in (images_dir, holdout_dir, out_dir / "manifests"):
        d.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(max(n_images, n_holdout) - 1)))
    names = [f"{i:0{width}d}.png" for i in range(n_images)]
    holdout_names = [f"{i:0{width}d}.png" for i in range(n_holdout)]
    _clear_stale(images_dir, set(names))
    _clear_stale(holdout_dir, set(holdout_names))

    # A fixed, seeded split with exactly round(20%) in val.
    n_val = max(1, round(n_images * VAL_FRACTION))
    val = set(np.random.default_rng([seed, 2]).permutation(n_images)[:n_val].tolist())

    rows: dict[str, list[list[str]]] = {a: [] for a in ATTRIBUTES}
    jobs = [(0, i, images_dir / n) for i, n in enumerate(names)]
    jobs += [(1, i, holdout_dir / n) for i, n in enumerate(holdout_names)]
    holdout_rows: list[list[str]] = []
    for stream, i, path in tqdm(jobs, desc="synthetic images", unit="img", disable=not progress):
        # One independent stream per image: any image can be regenerated on its own.
        rng = np.random.default_rng([seed, stream, i])
        labels, size_slice = _draw_labels(rng)
        render(rng, labels, size_slice, size).save(path, format="PNG")
        if stream == 0:
            split = "val" if i in val else "train"
            for attr in ATTRIBUTES:
                rows[attr].append([f"../images/{path.name}", labels[attr], split, size_slice])
        else:
            holdout_rows.append([f"holdout/{path.name}", *(labels[a] for a in ATTRIBUTES)])

    for attr, attr_rows in rows.items():
        _write_csv(dataset.manifests[attr], ["path", "label", "split", "slice"], attr_rows)
    _write_csv(dataset.holdout_labels, ["path", *ATTRIBUTES], holdout_rows)
    write_json_atomic(out_dir / DONE_FILE, params, indent=2, sort_keys=True)  # the marker: whole or absent
    return dataset


def shifted_copy(src_dir: str | Path, dst_dir: str | Path, *, progress: bool = False) -> Path:
    """A copy of a folder of images with one attribute's distribution shifted: colours.

    Each image's colour channels are rotated (R, G, B) -> (B, R, G): red shapes turn
    blue, blue ones green, and the backgrounds change hue alike; shape, count, texture and
    layout stay exactly as they were. What a production drift looks like when a camera's
    white balance changes. An existing copy is reused.

    Returns:
        ``dst_dir``.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    done = dst / "_DONE.json"
    if done.exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for path in tqdm(files, desc="shifting colours", unit="img", disable=not progress, leave=False):
        with Image.open(path) as img:
            r, g, b = img.convert("RGB").split()
            Image.merge("RGB", (b, r, g)).save(dst / path.name)
    write_json_atomic(done, {"source": str(src), "shift": "colour channels (R, G, B) -> (B, R, G)",
                             "images": len(files)})
    return dst

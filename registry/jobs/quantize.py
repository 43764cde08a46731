"""The ``quantize`` refresh candidate: production's trunk quantized, registered as a ``trunk`` version.

The candidate is :func:`trunk.quantize.quantize_trunk` of the production trunk (int8 on
CPU: ``static``, ``dynamic``, ``weight_only``; 16-bit for GPU serving: ``float16``,
``bfloat16``). ``static`` calibrates its activation ranges on images: by default the
production heads' training images, chosen as the distillation candidate chooses them (no
head's validation or golden image, by content), at most ``calibration_images`` of them in
a seeded order. Calibration only observes value ranges, nothing is learned, so the
candidate's record of seen images is its source's.

Like the other candidates it is resumable: the same recipe (source trunk_id, scheme,
calibration images, seed: tag ``quantize_recipe``) reuses the version built before. Like
them it reaches production only through the cascade: every head is retrained on it and
held to its contract, which is what tells whether int8 features are good enough.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random

import torch
from mlflow import MlflowClient

from registry.jobs.refresh import Candidate, mark_candidate, production_specs
from registry.jobs.train_trunk import trunk_training_set
from registry.store.trunks import (
    find_trunk_version_by_tag,
    load_trunk,
    register_trunk,
    trunk_metrics,
    trunk_trained_on,
)
from registry.store.workspace import Workspace
from trunk.dataset import read_item
from trunk.images import resolve_inputs
from trunk.model import POOLED, Trunk, TrunkError
from trunk.preprocess import eval_transform
from trunk.quantize import INT8_SCHEMES, SCHEMES, quantize_trunk
from trunk.speed import compare_trunks, weight_bytes

log = logging.getLogger(__name__)

QUANTIZE_RECIPE_TAG = "quantize_recipe"
QUANTIZED_FROM_TAG = "quantized_from"
# The speed-up against the source: rounds of one batch of random pixels (speed does not depend on
# them); few, since a production-size trunk on a CPU takes seconds per batch.
SPEED_IMAGES = 16
SPEED_REPEATS = 5


def calibration_paths(paths: list[str], seed: int) -> list[str]:
    """``paths`` in a seeded order; calibration takes the first ``count`` decodable ones.

    The whole order is kept, not just ``count`` paths, so undecodable files can be skipped
    and still leave ``count`` images.
    """
    order = sorted(paths)
    random.Random(seed).shuffle(order)
    return order


def calibration_pixels(paths: list[str], trunk: Trunk, count: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` decodable images of ``paths``, preprocessed as the trunk evaluates, and their paths.

    Raises:
        TrunkError: not one image could be decoded.
    """
    transform = eval_transform(trunk.data_config)
    pixels, used, skipped = [], [], 0
    for i, path in enumerate(paths):
        if len(pixels) >= count:
            break
        item = read_item(i, path, transform)
        if item.pixels is None:
            skipped += 1
            continue
        pixels.append(item.pixels)
        used.append(path)
    if not pixels:
        raise TrunkError(f"static quantization: none of {len(paths)} calibration images could be decoded")
    if skipped:
        log.warning("quantize: skipped %d undecodable calibration images", skipped)
    return torch.stack(pixels), used


def quantize_candidate(client: MlflowClient, workspace: Workspace, *, scheme: str, calibration_images: int,
                       input: str | None, seed: int, device: str, progress: bool,
                       source_version: int | None = None) -> Candidate:
    """Quantize the production trunk (or ``source_version``); register it as a ``trunk`` version, alias ``candidate``.

    Args:
        client, workspace: the registry and the workspace.
        scheme: one of :data:`trunk.quantize.SCHEMES`.
        calibration_images: ``static``: at most this many calibration images (at least 1).
        input: calibration images (folder, manifest or URI); None: the production heads'
            training images, without any head's validation or golden images.
        seed: the order calibration images are drawn in.
        device: where the speed-up is timed for ``float16`` / ``bfloat16``; int8 schemes are
            CPU kernels and are timed on the CPU, their source beside them.
        progress: unused (calibration is one pass); kept for the builders' common signature.
        source_version: the ``trunk`` version to quantize (a distilled student, say); None:
            production's. Calibration images are the production heads' either way.

    Returns:
        :class:`registry.jobs.refresh.Candidate` with ``how="quantize"``; figures
        ``speedup_vs_source``, ``size_ratio_vs_source`` (serving weight bytes,
        quantized / source), ``source_ms_per_image``, ``quantized_ms_per_image`` and
        ``cosine_pooled_vs_source``.

    Raises:
        TrunkError: an unknown scheme, a scheme the production family cannot take (one line
            saying what to use instead), or static with no decodable calibration image.
    """
    if scheme not in SCHEMES:
        raise TrunkError(f"unknown quantization scheme '{scheme}'; valid: {', '.join(SCHEMES)}")
    if scheme == "static" and calibration_images < 1:
        raise TrunkError(f"static quantization needs calibration_images >= 1, got {calibration_images}")
    release, specs = production_specs(client, workspace)
    source_v = release.trunk_version if source_version is None else source_version
    source = load_trunk(client, source_v)
    paths: list[str] = []
    if scheme == "static":
        if input:
            found = [str(p) for p in resolve_inputs(input)]
        else:  # as the distillation candidate picks them: never an image any head evaluates on
            found = sorted({p for task in trunk_training_set(specs).tasks for p in task.paths})
        paths = calibration_paths(found, seed)
    count = calibration_images if scheme == "static" else 0
    paths_sha = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    recipe = hashlib.sha256(json.dumps([source.trunk_id, scheme, count, seed, paths_sha], sort_keys=True)
                            .encode()).hexdigest()[:16]
    done = find_trunk_version_by_tag(client, QUANTIZE_RECIPE_TAG, recipe)
    if done is not None:
        mark_candidate(client, done)
        return Candidate(done, load_trunk(client, done), "quantize", "reused (same recipe)",
                         trunk_metrics(client, done))

    calibration, used = (calibration_pixels(paths, source, count) if scheme == "static" else (None, []))
    quantized = quantize_trunk(source, scheme, calibration=calibration)
    timing_device = "cpu" if scheme in INT8_SCHEMES else device
    pixels = torch.randn(SPEED_IMAGES, *source.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    speed = compare_trunks(source, quantized, pixels, device=timing_device, repeats=SPEED_REPEATS, warmup=1)
    probe = calibration if calibration is not None else pixels
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(source(probe, [POOLED])[POOLED],
                                                       quantized(probe, [POOLED])[POOLED]).mean()
    figures = {"speedup_vs_source": speed["speedup"], "size_ratio_vs_source": weight_bytes(quantized) /
               weight_bytes(source), "source_ms_per_image": speed["teacher_ms_per_image"],
               "quantized_ms_per_image": speed["student_ms_per_image"], "cosine_pooled_vs_source": float(cosine),
               "serving_weight_bytes": float(weight_bytes(quantized))}
    params = {"scheme": scheme, "backend": quantized.reduction.get("backend"), "source_trunk_version":
              source_v, "source_trunk_id": source.trunk_id, "calibration_images": len(used),
              "calibration_seed": seed, "calibration_input": input or "production heads' training images",
              "timing_device": timing_device}
    version = register_trunk(client, quantized, description=f"{source.model_name} trunk v{source_v} "
                                                             f"quantized ({scheme})",
                             params=params, metrics=figures,
                             trained_on=trunk_trained_on(client, source_v),
                             tags={QUANTIZE_RECIPE_TAG: recipe, QUANTIZED_FROM_TAG: str(source_v)},
                             cost_device=timing_device)
    mark_candidate(client, version)
    return Candidate(version, quantized, "quantize", "built", figures,
                     notes=[f"{scheme} from trunk v{source_v}: "
                            f"{figures['speedup_vs_source']:.2f}x the source's speed on {timing_device}, "
                            f"{figures['size_ratio_vs_source']:.2f}x its serving weight bytes, pooled cosine "
                            f"{figures['cosine_pooled_vs_source']:.3f}"])

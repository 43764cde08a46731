"""registry.jobs.train.measure_in_release: the in-bank cost is recorded with its timing spread."""

from __future__ import annotations

import numpy as np
from PIL import Image

from registry.jobs.train import measure_in_release


def test_in_release_cost_records_its_spread(client, trunk_a, make_result, tmp_path):
    paths = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    result = make_result(trunk_a, "colour")
    alone = result.metrics["added_ms_per_image"]
    measure_in_release(client, trunk_a, 1, result, paths, device="cpu", n_images=4)
    m = result.metrics
    assert m["added_ms_per_image_alone"] == alone and m["bank_heads"] == 1
    assert m["added_ms_per_image"] >= 0 and m["added_ms_per_image_spread"] >= 0

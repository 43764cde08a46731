"""The one image Dataset: decoded items, failures as items, targets, per-worker reseeding."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import write_image
from trunk.dataset import ImageDataset, ImageItem, readable, reseed_worker


def to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def test_a_good_file_is_hashed_decoded_transformed_and_keeps_its_target(tmp_path):
    path = write_image(tmp_path / "a.png", (200, 10, 10), size=8)
    item = ImageDataset([str(path)], to_tensor, targets=[2])[0]
    assert item == ImageItem(0, str(path), hashlib.sha256(path.read_bytes()).hexdigest(), None, item.pixels, 2)
    assert torch.equal(item.pixels, to_tensor(Image.open(path).convert("RGB")))


def test_bad_files_become_error_items_never_exceptions(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    good = write_image(tmp_path / "good.png", (1, 2, 3), size=4)
    ds = ImageDataset([str(tmp_path / "missing.png"), str(empty), str(good)], to_tensor)
    missing, bad, ok = ds[0], ds[1], ds[2]
    assert missing.sha is None and missing.error.startswith("file not found") and missing.pixels is None
    assert bad.sha == hashlib.sha256(b"").hexdigest() and bad.error.startswith("empty file")
    assert readable([missing, bad, ok]) == [ok]


def test_a_failing_transform_is_an_error_item(tmp_path):
    path = write_image(tmp_path / "a.png", (1, 2, 3), size=4)

    def broken(image):
        raise RuntimeError("boom\nsecond line")

    item = ImageDataset([str(path)], broken)[0]
    assert item.error == f"preprocess failed: {path}: RuntimeError: boom second line" and item.pixels is None
    assert ImageDataset([str(path)], lambda image: "text")[0].error.endswith("transform returned str")


def test_targets_must_match_paths():
    with pytest.raises(ValueError, match="2 paths but 1 targets"):
        ImageDataset(["a", "b"], to_tensor, targets=[0])


class SeedRecorder:
    """A transform with its own random stream: returns the seed it was last given."""

    def __init__(self) -> None:
        self.seed = -1

    def set_random_seed(self, seed):
        self.seed = seed

    def __call__(self, image):
        return torch.tensor([self.seed])


def test_reseed_reaches_a_transform_with_its_own_stream_and_skips_others():
    ds = ImageDataset([], SeedRecorder())
    ds.reseed(11)
    assert ds.transform.seed == 11
    ImageDataset([], to_tensor).reseed(11)  # no stream of its own: nothing to do


@pytest.mark.parametrize("bits", [31, 32])
def test_each_worker_reseeds_its_augmentation_from_its_torch_seed(tmp_path, bits):
    import functools

    paths = [str(write_image(tmp_path / f"{i}.png", (i, i, i), size=4)) for i in range(4)]
    loader = DataLoader(ImageDataset(paths, SeedRecorder()), batch_size=1, num_workers=2, collate_fn=list,
                        worker_init_fn=functools.partial(reseed_worker, seed_bits=bits),
                        generator=torch.Generator().manual_seed(5))
    seeds = {int(batch[0].pixels) for batch in loader}
    # torch: worker seed = base seed drawn from the loader's generator + worker id.
    base = torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(5)).item()
    assert seeds == {(base + w) % 2**bits for w in range(2)}

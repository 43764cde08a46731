"""Data-parallel trunk training (trunk.distributed): two gloo processes train what one process trains.

Real processes (torch.multiprocessing spawn, gloo on 127.0.0.1), a real tiny timm trunk with
batch norm, generated images, augmentation on. The global batch of 7 splits 3/4, so the
count weighting of gradients, the per-task global label counts and the synced batch-norm
statistics are all exercised with unequal shares; a task labels only some images.
"""

from __future__ import annotations

import csv
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from demo.shapes import ATTRIBUTES, generate_shapes
from tests.conftest import SMALL
from trunk import distributed
from trunk.files import write_json_atomic
from trunk.model import Trunk
from trunk.train import GlobalBatches, Task, image_seed, train_trunk

AUGMENT = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5},
           {"_target_": "albumentations.RandomBrightnessContrast", "brightness_limit": 0.2, "contrast_limit": 0.2,
            "p": 0.5}]
TRAIN = {"epochs": 2, "batch_size": 7, "lr": 2e-3, "augment_ops": AUGMENT, "seed": 3, "progress": False}
STUDENT_KWARGS = {"channels": [16, 24, 24, 48], "stem_width": 8}
# Float summation order only: the trained weights are some 1e-7 apart; a lost or doubled
# share, or per-rank batch-norm statistics, moves them by 1e-3 and more.
ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tasks_of(root: Path) -> list[Task]:
    ds_root = root / "shapes"
    out = []
    for attr, keep, val in (("shape", None, False), ("colour", 11, True)):
        manifest = ds_root / "manifests" / f"{attr}.csv"
        rows = list(csv.DictReader(manifest.open()))
        paths = [str(manifest.parent / r["path"]) for r in rows]
        labels = [ATTRIBUTES[attr].index(r["label"]) for r in rows]
        n = len(rows) if keep is None else keep
        out.append(Task(attr, ATTRIBUTES[attr], paths[:n], labels[:n],
                        val_paths=paths[-5:] if val else [], val_labels=labels[-5:] if val else []))
    return out


def distill_paths(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "shapes").rglob("*.png"))[:10]


def run_both(root: Path, out: Path) -> None:
    """Multi-task training, then distillation, as one process or as one rank: results under ``out``."""
    from trunk.distill import distill_trunk

    torch.set_num_threads(1)
    trained = train_trunk(Trunk("test_resnet", data_config=SMALL), tasks_of(root), **TRAIN)
    teacher = trained.trunk
    student = Trunk("test_resnet", data_config=teacher.data_config, model_kwargs=STUDENT_KWARGS, seed=1)
    distilled = distill_trunk(teacher, student, distill_paths(root), taps=["layer2"], epochs=2, batch_size=5,
                              augment_ops=AUGMENT, seed=4, progress=False)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in teacher.model.state_dict().items()}, str(out / "trunk.safetensors"))
        save_file({k: v.contiguous() for k, v in distilled.trunk.model.state_dict().items()},
                  str(out / "distilled.safetensors"))
        write_json_atomic(out / "figures.json", {"train": trained.history, "distill": distilled.history,
                                                 "trunk_id": teacher.trunk_id, "paths": trained.paths})


def rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_both(Path(root), Path(out))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    generate_shapes(root / "shapes", n_images=16, n_holdout=0, size=32, seed=0)
    run_both(root, root / "one")
    mp.spawn(rank_main, args=(2, free_port(), str(root), str(root / "two")), nprocs=2, join=True)
    import json

    return {name: {"trunk": load_file(str(root / name / "trunk.safetensors")),
                   "distilled": load_file(str(root / name / "distilled.safetensors")),
                   "figures": json.loads((root / name / "figures.json").read_text())} for name in ("one", "two")}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def test_two_ranks_train_the_trunk_one_process_trains(runs):
    one, two = runs["one"], runs["two"]
    start = Trunk("test_resnet", data_config=SMALL).model.state_dict()
    moved = max(float((one["trunk"][k].double() - start[k].double()).abs().max()) for k in start
                if start[k].is_floating_point())
    assert moved > 100 * ATOL  # training moved the weights far beyond the tolerance
    assert max_diff(one["trunk"], two["trunk"]) < ATOL
    # Batch norm's running statistics and step counters came out alike too (they are in the state dict).
    assert any("running_var" in k for k in one["trunk"])
    assert one["figures"]["paths"] == two["figures"]["paths"]


def test_two_ranks_report_the_single_process_figures(runs):
    for a, b in zip(runs["one"]["figures"]["train"], runs["two"]["figures"]["train"]):
        assert a.keys() == b.keys()
        for key in a:
            if key != "seconds":
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert "val_accuracy_colour" in runs["two"]["figures"]["train"][-1]


def test_distillation_picks_up_data_parallel_through_the_shared_loop(runs):
    one, two = runs["one"], runs["two"]
    assert max_diff(one["distilled"], two["distilled"]) < ATOL
    for a, b in zip(runs["one"]["figures"]["distill"], runs["two"]["figures"]["distill"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_the_trunk_id_is_a_content_hash_so_float_order_may_change_it(runs):
    """What is true, not what we wish: equal weights to 1e-5 need not be equal bits."""
    one, two = runs["one"], runs["two"]
    same_bits = all(torch.equal(one["trunk"][k], two["trunk"][k]) for k in one["trunk"])
    assert (one["figures"]["trunk_id"] == two["figures"]["trunk_id"]) == same_bits


def test_global_batches_split_the_single_process_order_between_ranks():
    alone = GlobalBatches(10, batch_size=4, seed=0, drop_last=True, ranks=None)
    ranks = [GlobalBatches(10, batch_size=4, seed=0, drop_last=True,
                           ranks=distributed.Ranks(r, 3, torch.device("cpu"))) for r in range(3)]
    for _ in range(2):  # two epochs: keys carry the epoch
        whole = list(alone)
        shares = [list(s) for s in ranks]
        assert len(whole) == len(alone) == 2
        for i, batch in enumerate(whole):
            assert [k for s in shares for k in s[i]] == batch  # contiguous shares, in rank order
            assert sorted(len(s[i]) for s in shares) == [1, 1, 2]
    assert {e for batch in whole for e, _ in batch} == {2}


def test_augmentation_seeds_depend_on_seed_epoch_and_image_only():
    seeds = {image_seed(s, e, i) for s in (0, 1) for e in (1, 2) for i in range(50)}
    assert len(seeds) == 200
    assert image_seed(0, 1, 7) == image_seed(0, 1, 7)


def test_num_workers_no_longer_change_the_trunk(tmp_path):
    """Seeding augmentation per image makes worker processes irrelevant to the result, as ranks are."""
    generate_shapes(tmp_path / "shapes", n_images=8, n_holdout=0, size=32, seed=0)
    tasks = tasks_of(tmp_path)[:1]
    settings = {**TRAIN, "epochs": 1, "batch_size": 4}
    a = train_trunk(Trunk("test_resnet", data_config=SMALL), tasks, num_workers=0, **settings)
    b = train_trunk(Trunk("test_resnet", data_config=SMALL), tasks, num_workers=2, **settings)
    assert a.trunk.trunk_id == b.trunk.trunk_id


def test_a_batch_smaller_than_the_world_is_one_line():
    """Rank 0's view of a two-rank run refuses a global batch of one image: a rank would get none."""
    from trunk.train import training_loader

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(distributed, "current", lambda: distributed.Ranks(0, 2, torch.device("cpu")))
        with pytest.raises(ValueError, match="field 'batch_size': 2 processes"):
            training_loader([None] * 5, None, batch_size=1, num_workers=0, seed=0, device=torch.device("cpu"))


def head_configs(folder: Path, root: Path) -> None:
    """Heads dp_shape and dp_colour in a folder of their own (the repo's conf/heads has shape and colour)."""
    (folder / "heads").mkdir(parents=True, exist_ok=True)
    for attr in ("shape", "colour"):
        (folder / "heads" / f"dp_{attr}.yaml").write_text(
            f"name: dp_{attr}\nowner: tests\ndata:\n  manifest: {root / 'shapes' / 'manifests' / f'{attr}.csv'}\n"
            f"module:\n  _target_: heads.modules.LinearHead\ngate:\n  min_val_accuracy: 0.0\n")


@pytest.mark.slow  # torchrun plus two ranks importing torch, timm, MLflow and Hydra: 60-90 s on 2 busy cores
def test_the_tool_under_torchrun_registers_one_version_that_one_process_reuses(tmp_path):
    """torchrun (its module, as the ``torchrun`` script runs it) -m tools.train_trunk, two gloo ranks."""
    import subprocess

    from mlflow import MlflowClient

    from heads.spec import load_head_spec
    from registry.jobs.train_trunk import train_trunk_job
    from registry.store.trunks import trunk_recipe
    from registry.store.workspace import Workspace

    repo = Path(__file__).resolve().parents[2]
    generate_shapes(tmp_path / "shapes", n_images=24, n_holdout=0, size=32, seed=0)
    head_configs(tmp_path / "conf", tmp_path)
    ws = tmp_path / "ws"
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    settings = ["train.epochs=1", "train.batch_size=8", "train.seed=0"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "tools.train_trunk", f"workspace={ws}", "tasks=[dp_shape,dp_colour]",
         "device=cpu", "progress=false", "trunk=test_resnet", "trunk.data_config.input_size=[3,32,32]",
         "augment=none", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "distributed_timeout_s=120", *settings],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("trunk v1 ") == 1  # rank 0 prints; rank 1 does not
    uri = f"sqlite:///{ws}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(client.search_model_versions("name='trunk'")) == 1

    # One process, the same recipe: the registry's recipe hash does not name the process count.
    specs = [load_head_spec(tmp_path / "conf" / "heads" / f"dp_{a}.yaml") for a in ("shape", "colour")]
    recipe = trunk_recipe(client, 1)
    base = Trunk(recipe["model_name"], data_config=recipe["data_config"], model_kwargs=recipe["model_kwargs"])
    assert base.trunk_id == recipe["base_trunk_id"]
    job = train_trunk_job(client, base, specs, workspace=Workspace.at(ws), epochs=1, batch_size=8, lr=0.002,
                          weight_decay=0.0001, augment_ops=[], seed=0, device="cpu", num_workers=0, progress=False)
    assert job.version == 1 and job.status.startswith("reused (same recipe)")
    assert len(client.search_model_versions("name='trunk'")) == 1

"""A small real platform state for the cascade tests: generated shapes, two trunks, three heads.

``production`` trunk + heads ``shape``, ``colour`` (linear on pooled) and ``count_branch``
(a branch at layer2) trained on it and released; the other trunk registered as the
candidate. Used in-process by the tests and by ``cascade_driver.py`` in a subprocess.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SMALL = {"input_size": [3, 32, 32], "crop_pct": 1.0}
HEADS = ("shape", "colour", "count_branch")
# Contract settings when a test gives none. On these 32 px images the trained trunk
# barely helps `shape` (val 0.31 -> 0.35, slices of 48 images within a few points of
# each other), so its contract is left lenient: a test that needs a passing cascade must
# not hinge on that noise. `colour` (0.77 -> 1.0) and `count_branch` (0.34 -> 0.64) keep
# the platform's default contract, with margins far beyond library or thread-count noise.
DEFAULT_GATES = {"shape": {"tolerance": 1.0, "slice_tolerance": 1.0}}


def generate(root: Path) -> Path:
    """The shapes data set (480 images, 32 px) under ``root``; its manifests folder."""
    from demo.shapes import generate_shapes

    generate_shapes(root, n_images=480, n_holdout=0, size=32, seed=0)
    return root / "manifests"


def head_config(name: str, manifests: Path, gate: dict | None = None) -> dict:
    branch = name == "count_branch"
    return {
        "name": name, "owner": "team-vision",
        "data": {"manifest": str(manifests / f"{name.split('_')[0]}.csv")},
        "attach": {"tap": "layer2" if branch else "pooled"},
        "module": {"_target_": "heads.branch.BranchHead" if branch else "heads.modules.LinearHead"},
        "train": {"epochs": 2 if branch else 40, "batch_size": 64, "lr": 0.003 if branch else 0.02, "patience": 40,
                  "seed": 0},
        "gate": {"min_val_accuracy": 0.0, "min_slice_size": 5, **(gate or {})},
    }


def trained_trunk(manifests: Path, base):
    """``base`` trained multi-task on every head's data for a few epochs: better features than random."""
    from heads.training.data import load_labelled_data
    from heads.spec import validate
    from trunk.train import Task, train_trunk

    tasks = []
    for name in ("shape", "colour", "count"):
        spec = validate(head_config(name, manifests), f"{name}.yaml", expected_name=name)
        data = load_labelled_data(spec)
        tasks.append(Task(name, data.classes, [s.path for s in data.train], [s.label for s in data.train]))
    return train_trunk(base, tasks, epochs=8, batch_size=32, lr=3e-3, progress=False).trunk


def build(ws: Path, template_db: Path, shared_cache: Path, manifests: Path, production, candidate,
          gates: dict[str, dict] | None = None):
    """A workspace whose production release is ``production`` + the three heads; ``candidate`` aliased
    (when given). ``gates`` per head (default :data:`DEFAULT_GATES`) extend each head's gate block.

    Returns:
        ``(client, Workspace, release)``.
    """
    from heads.spec import validate
    from registry.jobs.train import train_head_job
    from registry.jobs.refresh import mark_candidate
    from registry.store.releases import bootstrap_release, get_release
    from registry.store.tracking import connect
    from registry.store.trunks import register_trunk
    from registry.store.workspace import Workspace

    ws.mkdir(parents=True, exist_ok=True)
    shutil.copy(template_db, ws / "mlflow.db")
    shared_cache.mkdir(parents=True, exist_ok=True)
    (ws / "cache").symlink_to(shared_cache)  # features are keyed by trunk_id: sharing them is safe
    client = connect(ws)
    workspace = Workspace.at(ws)
    gates = DEFAULT_GATES if gates is None else gates
    pv = register_trunk(client, production)
    bootstrap_release(client, pv)
    for name in HEADS:
        spec = validate(head_config(name, manifests, gates.get(name)), f"conf/heads/{name}.yaml",
                        expected_name=name)
        job = train_head_job(client, spec, workspace=workspace, batch_size=64, num_workers=0, device="cpu",
                             progress=False)
        assert job.release is not None, f"{name} was not promoted: {job.refused or job.gate.format()}"
    if candidate is not None:
        mark_candidate(client, register_trunk(client, candidate))
    return client, workspace, get_release(client)


def small_platform(root: Path):
    """Under ``root``: a fresh MLflow database, the shapes data and a workspace whose production is
    random-init test_resnet at 32 px with the three heads; no candidate. Returns ``build``'s tuple."""
    from mlflow import MlflowClient

    from trunk.model import Trunk

    template = root / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    manifests = generate(root / "data")
    return build(root / "ws", template, root / "cache", manifests, Trunk("test_resnet", data_config=SMALL), None)

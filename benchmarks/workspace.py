"""A large workspace for tests and benchmarks: hundreds of generated heads over the demo's data set.

    python -m benchmarks.workspace root=/tmp/big n_heads=300 [mlp_every=10 branch_every=100 n_images=600 ...]

:func:`build_workspace` composes the platform's own functions, nothing more: the demo's
synthetic shapes (:func:`demo.shapes.generate_shapes`), a trunk (``test_resnet`` at random
init registered as it is with :func:`registry.store.trunks.register_trunk`, or, with
``trunk_epochs > 0``, the demo's multi-task trunk training, :func:`train_trunk_job`),
``n_heads`` head config files written to ``<root>/conf/heads/`` (each valid under
:mod:`heads.spec` and read back with :func:`heads.spec.load_head_spec`), every head trained
by :func:`registry.jobs.train.train_head_job` (the job ``tools.train_head`` runs: features
are extracted once per tap into the workspace's cache, then read from it), and one release
with the trunk and every head (:func:`registry.store.releases.create_release`; one release,
not ``n_heads`` promotions).

Heads are named ``t<team>_<attribute>_<nn>`` (``t03_colour_07``: team 3's eighth head), owned
by ``team-<team>``, and read one of the demo's four attributes with a varied recipe (lr,
epochs, seed, dropout). Every ``mlp_every``-th head is an MLP head, every
``branch_every``-th a branch head at ``layer2`` (no augmentation, so its tap is cached too),
every ``fail_every``-th (0: none) has a gate it cannot pass, so it is registered but left
out of the release.

A second call on the same root returns the finished workspace (``large_workspace.json``)
when the arguments are the same and refuses other arguments in one line; an interrupted
build resumes, reusing every head version already registered with the same config on the
same trunk. The generated configs also work with the tools:
``python -m tools.train_head workspace=<root> head=t03_colour_07 hydra.searchpath=[file://<root>/conf]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from demo.shapes import ATTRIBUTES, generate_shapes
from heads.spec import HeadSpec, load_head_spec, resolve_head, search_dirs
from registry.jobs.train import train_head_job
from registry.jobs.train_trunk import train_trunk_job
from registry.store.heads import head_model_versions
from registry.store.releases import create_release, get_release, production_version
from registry.store.tracking import client_uri, connect
from registry.store.trunks import register_trunk
from registry.store.workspace import Workspace
from trunk.files import write_json_atomic
from trunk.model import POOLED, Trunk

MARKER = "large_workspace.json"
BRANCH_TAP = "layer2"
# The demo trunk's own multi-task recipe (conf/demo.yaml), for trunk_epochs > 0.
TRUNK_TASKS = ("shape", "texture")
# Recipes vary per head, so the heads are not copies of one another (cycled by index).
_LRS = (0.003, 0.01, 0.03)
_DROPOUTS = (0.0, 0.1, 0.2)
_HIDDEN = (32, 64, 128)
HEADS_PER_TEAM = 10


@dataclass
class LargeWorkspace:
    root: Path
    tracking_uri: str
    trunk_version: int
    heads: list[str]
    release_version: int | None
    # seconds per step (generate, trunk, heads, release) and per head, for the benchmark's figure
    seconds: dict[str, float] = field(default_factory=dict)


def head_name(index: int) -> str:
    """``t<team>_<attribute>_<nn>``: team ``index // 10``, its ``index % 10``-th head."""
    attribute = list(ATTRIBUTES)[index % len(ATTRIBUTES)]
    return f"t{index // HEADS_PER_TEAM:02d}_{attribute}_{index % HEADS_PER_TEAM:02d}"


def head_config(index: int, *, mlp_every: int = 10, branch_every: int = 100, fail_every: int = 0,
                head_epochs: int = 5, seed: int = 0) -> dict[str, Any]:
    """The generated config of head ``index`` (a plain dict, :class:`heads.spec.HeadConfig`'s shape)."""
    attribute = list(ATTRIBUTES)[index % len(ATTRIBUTES)]

    def every(n: int) -> bool:
        return n > 0 and index % n == n - 1

    train = {"epochs": max(1, head_epochs + index % 3 - 1), "batch_size": 256, "lr": _LRS[index % 3],
             "patience": 10, "seed": seed + index}
    if every(branch_every):
        tap, module = BRANCH_TAP, {"_target_": "heads.branch.BranchHead"}
        train = {**train, "epochs": max(1, min(head_epochs, 3)), "batch_size": 64, "lr": 0.001}
    elif every(mlp_every):
        tap = POOLED
        module = {"_target_": "heads.modules.MLPHead", "hidden": _HIDDEN[index % 3],
                  "dropout": _DROPOUTS[index % 3]}
    else:
        tap, module = POOLED, {"_target_": "heads.modules.LinearHead", "dropout": _DROPOUTS[(index // 3) % 3]}
    team = index // HEADS_PER_TEAM
    return {
        "name": head_name(index), "owner": f"team-{team:02d}",
        "description": f"generated head {index}: the demo's '{attribute}' attribute",
        "data": {"manifest": f"${{workspace}}/data/shapes/manifests/{attribute}.csv"},
        "attach": {"tap": tap}, "module": module, "train": train,
        # A gate nothing passes for every fail_every-th head: registered, left out of the release.
        "gate": {"min_val_accuracy": 0.999 if every(fail_every) else 0.0, "min_slice_size": 20},
    }


def write_head_configs(conf_dir: Path, n_heads: int, context: dict[str, Any], **recipe: Any) -> list[HeadSpec]:
    """Write ``<conf_dir>/heads/<name>.yaml`` for each head and read every one back through the schema."""
    folder = conf_dir / "heads"
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for i in range(n_heads):
        config = head_config(i, **recipe)
        path = folder / f"{config['name']}.yaml"
        text = "# generated by benchmarks.workspace\n" + yaml.safe_dump(config, sort_keys=False)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        specs.append(load_head_spec(path, context))
    return specs


def _params(**kwargs: Any) -> dict[str, Any]:
    return {"generator": "benchmarks.workspace", **kwargs}


def _reusable_versions(client: Any, specs: list[HeadSpec], trunk_id: str) -> dict[str, int]:
    """Head versions an interrupted build already registered: same config, same trunk."""
    wanted = {s.name: s.config_sha for s in specs}
    out = {}
    for name, versions in head_model_versions(client).items():
        for mv in reversed(versions):
            if name in wanted and mv.tags.get("config_sha") == wanted[name] and mv.tags.get("trunk_id") == trunk_id:
                out[name] = int(mv.version)
                break
    return out


def _register_trunk(client: Any, ws: Workspace, *, image_size: int, trunk_epochs: int, seed: int,
                    progress: bool) -> tuple[Trunk, int]:
    base = Trunk("test_resnet", seed=seed, data_config={"input_size": [3, image_size, image_size], "crop_pct": 1.0})
    if trunk_epochs <= 0:
        return base, register_trunk(client, base, description="benchmarks.workspace: test_resnet, random init")
    # The demo's own trunk: multi-task on shape and texture, its head configs from conf/heads/.
    specs = [resolve_head(n, search_dirs(), {"workspace": str(ws.root)}) for n in TRUNK_TASKS]
    job = train_trunk_job(client, base, specs, workspace=ws, epochs=trunk_epochs, batch_size=64, lr=0.002,
                          weight_decay=1e-4, augment_ops=None, seed=seed, device="cpu", num_workers=0,
                          progress=progress, adopt=False)
    return job.trunk, job.version


def build_workspace(root: str | Path, n_heads: int, *, mlp_every: int = 10, branch_every: int = 100,
                    n_images: int = 600, image_size: int = 64, trunk_epochs: int = 0, head_epochs: int = 5,
                    promote: bool = True, seed: int = 0, progress: bool = True, fail_every: int = 0,
                    device: str = "cpu") -> LargeWorkspace:
    """Build (or find, or finish) a workspace with ``n_heads`` generated heads trained on one trunk.

    Args:
        root: the workspace folder (MLflow store, cache, data, ``conf/heads/``).
        n_heads: how many head configs to generate and train.
        mlp_every: every ``mlp_every``-th head is an MLP head (0: none).
        branch_every: every ``branch_every``-th head is a branch head at ``layer2`` (0: none; wins over MLP).
        n_images: labelled images of the synthetic data set (plus a tenth held out).
        image_size: their side in pixels, and the trunk's input size.
        trunk_epochs: 0 registers a random-init ``test_resnet``; more trains it as the demo does.
        head_epochs: each head's epochs vary around this (branch heads: at most 3).
        promote: put the trunk and every head that passed its gate into one release made production.
        seed: data, trunk and head seeds.
        progress: show a progress bar of the heads (count, time per head; on stderr).
        fail_every: every ``fail_every``-th head gets a gate it cannot pass (0: none).
        device: where trunks and heads run.

    Returns:
        The workspace; ``heads`` lists every generated head (those in the release:
        ``release_version``'s manifest), ``seconds`` the time of each step and ``per_head``.

    Raises:
        ValueError: ``root`` holds a finished workspace built with other arguments.
    """
    ws = Workspace.at(root)
    params = _params(n_heads=n_heads, mlp_every=mlp_every, branch_every=branch_every, n_images=n_images,
                     image_size=image_size, trunk_epochs=trunk_epochs, head_epochs=head_epochs, promote=promote,
                     seed=seed, fail_every=fail_every)
    marker = ws.root / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("params") != params:
            diff = sorted(k for k in params if done.get("params", {}).get(k) != params[k])
            raise ValueError(f"{marker}: field 'params': this workspace was built with other arguments "
                             f"({', '.join(diff)}); use another root or the same arguments")
        return LargeWorkspace(ws.root, done["tracking_uri"], done["trunk_version"], done["heads"],
                              done["release_version"], done.get("seconds", {}))
    client = connect(ws.root)
    seconds: dict[str, float] = {}

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    t = time.perf_counter()
    generate_shapes(ws.data / "shapes", n_images=n_images, n_holdout=max(1, n_images // 10), size=image_size,
                    seed=seed, progress=False)
    seconds["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    trunk, tv = _register_trunk(client, ws, image_size=image_size, trunk_epochs=trunk_epochs, seed=seed,
                                progress=progress)
    seconds["trunk"] = time.perf_counter() - t
    say(f"trunk v{tv} ({trunk.model_name}, trunk_id {trunk.trunk_id}) in {seconds['trunk']:.1f} s")

    specs = write_head_configs(ws.root / "conf", n_heads, {"workspace": str(ws.root)}, mlp_every=mlp_every,
                               branch_every=branch_every, fail_every=fail_every, head_epochs=head_epochs, seed=seed)
    versions = _reusable_versions(client, specs, trunk.trunk_id)
    passed: dict[str, int] = {}
    t = time.perf_counter()
    trained = 0
    # A random-init trunk has no record of training images: each head would warn so, once per head.
    quiet = logging.getLogger("registry.jobs.train")
    level = quiet.level
    if trunk_epochs <= 0:
        quiet.setLevel(logging.ERROR)
    bar = tqdm(specs, desc="heads", unit="head", disable=not progress, file=sys.stderr)
    try:
        for spec in bar:
            if spec.name in versions:
                mv = client.get_model_version(f"head.{spec.name}", str(versions[spec.name]))
                if mv.tags.get("gate") == "passed":
                    passed[spec.name] = versions[spec.name]
                continue
            job = train_head_job(client, spec, workspace=ws, trunk_version=tv, batch_size=256, num_workers=0,
                                 device=device, progress=False, promote=False)
            trained += 1
            if job.gate.passed:
                passed[spec.name] = job.version
            bar.set_postfix_str(f"{spec.name} val_accuracy {job.result.metrics['val_accuracy']:.3f}")
    finally:
        quiet.setLevel(level)
    seconds["heads"] = time.perf_counter() - t
    seconds["per_head"] = seconds["heads"] / trained if trained else 0.0
    seconds["heads_trained"] = float(trained)

    release_version = None
    if promote:
        t = time.perf_counter()
        current = get_release(client)
        if current is not None and current.trunk_version == tv and current.heads == passed:
            release_version = current.version  # made by the interrupted build
        else:
            release_version = create_release(client, tv, passed, expected_production=production_version(client),
                                             note=f"benchmarks.workspace: {len(passed)} generated heads").version
        seconds["release"] = time.perf_counter() - t
        say(f"release v{release_version}: trunk v{tv}, {len(passed)} of {n_heads} heads")
    out = LargeWorkspace(ws.root, client_uri(client), tv, [s.name for s in specs], release_version, seconds)
    write_json_atomic(marker, {"params": params, **{k: str(v) if isinstance(v, Path) else v
                                                    for k, v in asdict(out).items()}})
    return out


def _value(text: str) -> Any:
    try:
        return json.loads(text)  # ints, floats, true/false
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.workspace root=DIR n_heads=N [key=value ...]`` (any :func:`build_workspace` keyword)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="root=DIR n_heads=N and any build_workspace keyword=value")
    args = parser.parse_args(argv)
    kwargs = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"'{item}' is not key=value")
        kwargs[key] = value if key == "root" else _value(value)
    if "root" not in kwargs or "n_heads" not in kwargs:
        parser.error("root=DIR and n_heads=N are required")
    t = time.perf_counter()
    built = build_workspace(**kwargs)
    print(f"workspace {built.root}: trunk v{built.trunk_version}, {len(built.heads)} heads, release "
          f"v{built.release_version} ({time.perf_counter() - t:.0f} s; "
          f"{built.seconds.get('per_head', 0):.2f} s per head trained)")
    print(f"  MLflow: {built.tracking_uri}")
    print(f"  report: python -m tools.report workspace={built.root}")


if __name__ == "__main__":
    main()

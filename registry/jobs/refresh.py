"""Candidate trunks for a refresh, and the refresh job: build a candidate, then run the cascade.

Three ways to build a candidate, each registered as a ``trunk`` version with alias
``candidate`` (production is never touched here; only the cascade promotes):

- ``multitask``: the production trunk retrained multi-task on the union of every
  production head's labelled data (an image adds loss only to the tasks it is labelled
  for; :func:`registry.jobs.train_trunk.train_trunk_job`);
- ``timm``: a new timm architecture or weights file, as the ``trunk`` config group says;
- ``distill``: the production trunk (or another registered trunk, ``teacher``) distilled
  into a smaller student on unlabelled images (:func:`trunk.distill.distill_trunk`: features
  on ``pooled`` and, by default, on the taps the production branch heads fork at, where the
  student has them; with ``head_loss_weight > 0`` also the softened outputs of the frozen
  production heads, or of linear probes fitted on a teacher that is not production's trunk).

Building is resumable like everything else: a candidate made before from the same recipe
(tag ``train_recipe`` or ``distill_recipe``) is reused, not rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from mlflow import MlflowClient

from heads.checks.contract import Tolerances
from heads.modules import LinearHead
from heads.spec import HeadSpec
from heads.training.train import TrainSettings, predict_logits, train_on_features
from registry.jobs.extract import extract_job
from registry.jobs.train_trunk import (
    SETTING_FIELDS,
    live_curves,
    recipe_diff,
    train_trunk_job,
    trunk_recipe_of,
    trunk_training_set,
)
from registry.jobs.cascade import (
    CANDIDATE,
    CascadeError,
    CascadeResult,
    Parallel,
    run_cascade,
    stored_spec,
)
from registry.store.heads import head_tags
from registry.store.releases import PRODUCTION, Release, get_release, load_release_heads
from registry.store.runs import RunLog
from registry.store.trunks import (
    find_trunk_version_by_tag,
    load_trunk,
    register_trunk,
    set_trunk_alias,
    trunk_metrics,
    trunk_recipe,
    trunk_run,
    trunk_trained_on,
)
from registry.reports.summary import narrator
from registry.store.tracking import RegistryError
from registry.store.workspace import Workspace
from trunk import distributed
from trunk.distill import FrozenHead, distill_trunk
from trunk.loop import seeded_rng
from trunk.images import resolve_inputs
from trunk.model import POOLED, Trunk
from trunk.seen import SeenImages, content_sha
from trunk.speed import compare_trunks

log = logging.getLogger(__name__)

DISTILL_RECIPE_TAG = "distill_recipe"
# Dataset input of a distillation run: the unlabelled images, digest the hash of their paths.
DISTILL_SET = "distill_images"
# MLflow's limit on a tag value is 8000 characters; a recipe difference longer than that is cut.
MAX_TAG_CHARS = 5000
# How a teacher that is not production's trunk gets heads to distil through: a linear probe
# per production head on its pooled features of the head's training split. Quick on purpose
# (features are cached; a linear layer trains in seconds). The epoch is chosen on the
# training split itself: the heads' validation images stay out of distillation entirely.
PROBE_SETTINGS = TrainSettings(epochs=30, batch_size=64, lr=0.01, weight_decay=1e-4, patience=0, seed=0)


@dataclass
class Candidate:
    """A candidate trunk, registered and aliased ``candidate``.

    Attributes:
        version: the ``trunk`` version.
        trunk: the trunk.
        how: ``multitask``, ``timm``, ``distill`` or ``alias``.
        status: ``built`` or ``reused (same recipe)``.
        figures: what building measured (distillation: loss, cosine, speed-up).
        notes: lines to show with it (a multitask candidate: its recipe difference from production).
        recipe: the recipe it was trained with (empty when not trained here).
    """

    version: int
    trunk: Trunk
    how: str
    status: str
    figures: dict[str, float]
    notes: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)


def mark_candidate(client: MlflowClient, version: int) -> None:
    """Point the ``trunk`` alias ``candidate`` at a version."""
    set_trunk_alias(client, CANDIDATE, version)


def production_specs(client: MlflowClient, workspace: Workspace) -> tuple[Any, list[HeadSpec]]:
    """The production release and the stored config of each of its heads."""
    release = get_release(client, PRODUCTION)
    if release is None or not release.heads:
        raise CascadeError("there is no production release with heads, so there is nothing to refresh")
    context = {"workspace": str(workspace.root)}
    return release, [stored_spec(client, n, v, context) for n, v in sorted(release.heads.items())]


def multitask_candidate(client: MlflowClient, workspace: Workspace, *, base: Trunk | None, epochs: int,
                        batch_size: int, lr: float, weight_decay: float, augment_ops: list | None, seed: int,
                        device: str, num_workers: int, progress: bool,
                        overridden: Collection[str] = ()) -> Candidate | None:
    """Retrain ``base`` (default: the production trunk) on the union of the production heads' training splits.

    Data-parallel under torchrun as :func:`registry.jobs.train_trunk.train_trunk_job`: None on
    every rank but 0.

    The candidate keeps the production trunk's recipe (``recipe.json``): every training
    setting (:data:`~registry.jobs.train_trunk.SETTING_FIELDS`: augmentation, epochs,
    batch size, lr, weight decay, seed) comes from it, except the fields named in
    ``overridden``, which take the values given here. A production trunk without a stored
    recipe (registered from timm or a weights file) gives the values given here, and a
    note says so. The candidate's notes list its recipe difference from production, also
    recorded as the version tag ``recipe_diff``.

    Args:
        epochs, batch_size, lr, weight_decay, augment_ops, seed: the configured settings.
        overridden: the settings the user set for this run (``augment`` for the ops).
    """
    release, specs = production_specs(client, workspace)
    production = load_trunk(client, release.trunk_version)
    base = base if base is not None else production
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
             "augment": augment_ops}
    unknown = sorted(set(overridden) - set(SETTING_FIELDS))
    if unknown:
        raise ValueError(f"overridden: {', '.join(unknown)} is not one of {', '.join(SETTING_FIELDS)}")
    stored = trunk_recipe(client, release.trunk_version)
    notes = []
    if stored is None:
        notes.append(f"production trunk v{release.trunk_version} has no stored recipe (registered from timm or a "
                     f"weights file): training with the configured multitask settings and augment group")
        settings = given
        tags = {"recipe_from": "config",
                "recipe_diff": f"production trunk v{release.trunk_version} has no stored recipe"}
    else:
        settings = {k: given[k] if k in overridden else stored[k] for k in SETTING_FIELDS}
        recipe = trunk_recipe_of(base, [s.name for s in specs], epochs=settings["epochs"],
                                 batch_size=settings["batch_size"], lr=settings["lr"],
                                 weight_decay=settings["weight_decay"], augment_ops=settings["augment"],
                                 seed=settings["seed"])
        diff = recipe_diff(stored, recipe)
        notes += [f"recipe vs production trunk v{release.trunk_version}: {line}" for line in diff] or \
            [f"same recipe as production trunk v{release.trunk_version}"]
        tags = {"recipe_from": str(release.trunk_version),
                "recipe_diff": "; ".join(diff) if diff else "same recipe"}
    job = train_trunk_job(client, base, specs, workspace=workspace, epochs=settings["epochs"],
                          batch_size=settings["batch_size"], lr=settings["lr"], weight_decay=settings["weight_decay"],
                          augment_ops=settings["augment"], seed=settings["seed"], device=device,
                          num_workers=num_workers, progress=progress, adopt=False,
                          tags={k: v[:MAX_TAG_CHARS] for k, v in tags.items()})
    if job is None:  # another rank of a data-parallel run: rank 0 registered the candidate
        return None
    mark_candidate(client, job.version)
    status = "reused (same recipe)" if job.status.startswith("reused") else "built"
    return Candidate(job.version, job.trunk, "multitask", status, dict(job.metrics), notes=notes,
                     recipe=job.recipe)


def timm_candidate(client: MlflowClient, trunk: Trunk) -> Candidate:
    """Register a trunk built from the ``trunk`` config group as it is."""
    version = register_trunk(client, trunk, description=f"{trunk.model_name} as configured (refresh candidate)")
    mark_candidate(client, version)
    return Candidate(version, trunk, "timm", "built", {})


def branch_taps(client: MlflowClient, release) -> list[str]:
    """The taps the release's branch heads fork at (every tap but ``pooled``)."""
    return sorted({head_tags(client, n, v).get("tap") for n, v in release.heads.items()} - {POOLED, None})


def distill_candidate(client: MlflowClient, workspace: Workspace, *, model_name: str,
                      model_kwargs: Mapping[str, Any], student_seed: int, input: str | None,
                      taps: Sequence[str] | str, epochs: int, batch_size: int, lr: float, weight_decay: float,
                      augment_ops: list | None, seed: int, device: str, num_workers: int,
                      progress: bool, teacher: int | None = None, head_loss_weight: float = 0.0,
                      temperature: float = 1.0) -> Candidate | None:
    """Distill the production trunk (or trunk v``teacher``) into a student; register it as the candidate.

    Data-parallel (torchrun, :mod:`trunk.distributed`): every rank calls this with the same
    arguments and a client on the same store (reads only, on ranks other than 0). Rank 0
    decides reuse; every rank distills its share of each global batch through the one loop
    (the student equals a single process's up to float order); rank 0 alone opens the run,
    measures and registers; the other ranks wait for its version and return None.

    Args:
        model_name, model_kwargs, student_seed: the student (timm name, kwargs, init seed);
            it gets the teacher's data config, so both see the very same batches.
        input: unlabelled images (folder, manifest or URI); None: every production head's
            training images, labels unused.
        taps: taps to distill besides ``pooled``, or ``auto``: the production branch heads'
            taps that the student also has (and the teacher, when it is not production's).
        teacher: None: production's trunk; else a registered ``trunk`` version (a deeper
            model, say). Production's heads do not fit another trunk's features, so then
            the heads distilled through are linear probes fitted on the teacher's pooled
            features of each head's training split (:func:`teacher_probes`).
        head_loss_weight: weight of the heads' ``T^2 * KL`` (0: features only, as before).
        temperature: the softening ``T``.
    """
    release, specs = production_specs(client, workspace)
    teacher_version = release.trunk_version if teacher is None else _trunk_version(teacher)
    try:
        teacher_trunk = load_trunk(client, teacher_version)
    except RegistryError as e:
        if teacher is None:
            raise
        raise RegistryError(f"field 'distill.teacher': {e} (null: production's trunk v{release.trunk_version})") \
            from None
    teacher_is_production = teacher_version == release.trunk_version
    student = Trunk(model_name, seed=student_seed, data_config=teacher_trunk.data_config,
                    model_kwargs=dict(model_kwargs))
    if input:
        paths = [str(p) for p in resolve_inputs(input)]
    else:  # the heads' training images, without any head's validation or golden images (by content)
        paths = sorted({p for task in trunk_training_set(specs).tasks for p in task.paths})
    if taps == "auto":
        wanted = branch_taps(client, release)
        taps = [t for t in wanted if t in student.taps and t in teacher_trunk.taps]
        skipped = sorted(set(wanted) - set(taps))
        if skipped:
            log.warning("student %s has no tap %s: distilling pooled%s only there", model_name, ", ".join(skipped),
                        "".join(f", {t}" for t in taps))
    taps = list(taps)
    head_source = "none"
    if head_loss_weight > 0:
        head_source = "production heads" if teacher_is_production else "linear probes on the teacher's pooled features"
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                "augment": augment_ops, "taps": taps, "teacher": teacher_version,
                "head_loss_weight": float(head_loss_weight), "temperature": float(temperature),
                "teacher_heads": head_source,
                # The heads' outputs are targets: other production heads, another student.
                "heads": dict(sorted(release.heads.items())) if head_loss_weight > 0 else {}}
    if head_loss_weight > 0 and not teacher_is_production:
        settings["probe"] = {k: getattr(PROBE_SETTINGS, k) for k in ("epochs", "batch_size", "lr", "weight_decay",
                                                                     "seed")}
    paths_sha = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    recipe = hashlib.sha256(json.dumps([teacher_trunk.trunk_id, student.trunk_id, paths_sha, settings],
                                       sort_keys=True, default=str).encode()).hexdigest()[:16]
    main = distributed.is_main()
    done = distributed.broadcast_int(find_trunk_version_by_tag(client, DISTILL_RECIPE_TAG, recipe) if main else None)
    if done is not None:
        if not main:
            return None
        mark_candidate(client, done)
        return Candidate(done, load_trunk(client, done), "distill", "reused (same recipe)", trunk_metrics(client, done))
    notes = []
    frozen: list[FrozenHead] = []
    probe_figures: dict[str, float] = {}
    if head_loss_weight > 0 and teacher_is_production:
        frozen, skipped_heads = production_heads(client, release, taps)
        notes += [f"head {n} reads tap {t}, which is not distilled: not in the head loss" for n, t in skipped_heads]
    elif head_loss_weight > 0:
        # Rank 0 fits the probes first (extracting the teacher's features into the cache once);
        # the others then fit theirs from the cache and take rank 0's weights.
        if not main:
            distributed.broadcast_int(None)
        frozen, probe_figures = teacher_probes(teacher_trunk, specs, workspace=workspace, batch_size=batch_size,
                                               num_workers=num_workers, device=device)
        if main:
            distributed.broadcast_int(0)
        notes.append(f"teacher trunk v{teacher_version} is not production's trunk v{release.trunk_version}: "
                     f"the student learns linear probes fitted on the teacher's pooled features of each head's "
                     f"training split, not the production heads")
    for head in frozen:  # the very targets rank 0 uses, on every rank
        distributed.broadcast_state(head.module, distributed.current())
    if not main:  # distill alongside rank 0, then wait for its version: only rank 0 registers
        distill_trunk(teacher_trunk, student, paths, taps=taps, heads=frozen, head_loss_weight=head_loss_weight,
                      temperature=temperature, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      augment_ops=augment_ops, seed=seed, device=device, num_workers=num_workers, progress=False)
        distributed.broadcast_int(None)
        return None
    # The run spans the distillation: one that fails on the way ends FAILED and registers nothing.
    with trunk_run(client, "trunk-distill", tags={DISTILL_RECIPE_TAG: recipe,
                                                  "distilled_from": str(teacher_version)}) as run:
        run.log_dataset(DISTILL_SET, paths_sha[:16], input or "production heads' training images",
                        context="training", profile={"num_rows": len(paths)})
        version, result, figures = _distill_and_register(
            client, release, teacher_trunk, student, paths, run, recipe=recipe, model_name=model_name,
            model_kwargs=model_kwargs, student_seed=student_seed, taps=taps, settings=settings, epochs=epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, augment_ops=augment_ops, seed=seed,
            device=device, num_workers=num_workers, progress=progress, teacher_version=teacher_version,
            heads=frozen, head_loss_weight=head_loss_weight, temperature=temperature, extra=probe_figures)
    mark_candidate(client, version)
    distributed.broadcast_int(version)  # the other ranks of a data-parallel run wait here
    return Candidate(version, result.trunk, "distill", "built", figures, notes=notes)


def _trunk_version(value: Any) -> int:
    """A ``distill.teacher`` value as a trunk version number, or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
        raise ValueError(f"field 'distill.teacher': {value!r} is neither null (production's trunk) nor a trunk "
                         f"version number")
    if int(value) < 1:
        raise ValueError(f"field 'distill.teacher': {value} is not a trunk version number (they start at 1)")
    return int(value)


def production_heads(client: MlflowClient, release: Release,
                     taps: Sequence[str]) -> tuple[list[FrozenHead], list[tuple[str, str]]]:
    """The release's heads as frozen heads for distillation, and ``(name, tap)`` of those left out.

    A head is left out when it reads a tap that is not distilled (the student has no such
    tap): there is no student map to run it on.
    """
    kept, left_out = [], []
    for name, head in load_release_heads(client, release).items():
        if head.tap == POOLED or head.tap in taps:
            kept.append(FrozenHead(name, head.module, head.tap))
        else:
            left_out.append((name, head.tap))
    return kept, left_out


def teacher_probes(teacher: Trunk, specs: Sequence[HeadSpec], *, workspace: Workspace, batch_size: int,
                   num_workers: int, device: str) -> tuple[list[FrozenHead], dict[str, float]]:
    """One linear probe per production head on ``teacher``'s pooled features, as frozen heads.

    Each probe is a :class:`~heads.modules.LinearHead` trained with the platform's head
    training on cached features (:func:`heads.training.train.train_on_features`,
    :data:`PROBE_SETTINGS`) on the head's training split as distillation sees it (no
    head's validation or golden images). Returns the probes and ``probe_train_accuracy_<head>``.
    """
    probes, figures = [], {}
    for task in trunk_training_set(specs).tasks:
        extracted = extract_job(teacher, task.paths, workspace=workspace, taps=(POOLED,), batch_size=batch_size,
                                num_workers=num_workers, device=device, progress=False)
        rows = [(sha, label) for sha, label in zip(extracted.shas, task.labels) if sha is not None]
        if not rows:
            raise ValueError(f"head '{task.name}': none of its training images could be read for its probe")
        x = extracted.caches[POOLED].load([sha for sha, _ in rows]).float()
        y = torch.tensor([label for _, label in rows], dtype=torch.long)
        with seeded_rng(PROBE_SETTINGS.seed):
            probe = LinearHead(x.shape[1], len(task.classes))
        train_on_features(probe, x, y, x, y, PROBE_SETTINGS, device=device)
        probe = probe.cpu().eval()
        figures[f"probe_train_accuracy_{task.name}"] = float((predict_logits(probe, x).argmax(1) == y).float().mean())
        probes.append(FrozenHead(task.name, probe, POOLED))
    return probes, figures


def distill_curve_names(row: Mapping[str, Any]) -> dict[str, str]:
    """``{history field: metric name}`` for a distillation epoch row, logged live per epoch.

    The names are the run's final figures (the last epoch's): ``loss`` -> ``distill_loss``,
    ``loss_<tap>`` -> ``distill_loss_<tap>`` (``loss_heads``, ``loss_head_<head>`` likewise),
    ``agreement_<head>`` -> ``head_agreement_<head>``, ``seconds`` -> ``epoch_seconds``;
    ``cosine_pooled`` and ``lr`` keep theirs.
    """
    names = {"loss": "distill_loss", "seconds": "epoch_seconds"}
    names.update({k: "distill_" + k for k in row if k.startswith("loss_")})
    names.update({k: "head_" + k for k in row if k.startswith("agreement_")})
    return names


def _distill_and_register(client: MlflowClient, release: Release, teacher: Trunk, student: Trunk, paths: list[str],
                          run: RunLog,
                          *, recipe: str, model_name: str, model_kwargs: Mapping[str, Any], student_seed: int,
                          taps: list[str], settings: dict[str, Any], epochs: int, batch_size: int, lr: float,
                          weight_decay: float, augment_ops: list | None, seed: int, device: str, num_workers: int,
                          progress: bool, teacher_version: int, heads: Sequence[FrozenHead] = (),
                          head_loss_weight: float = 0.0, temperature: float = 1.0,
                          extra: Mapping[str, float] | None = None):
    result = distill_trunk(teacher, student, paths, taps=taps, heads=heads, head_loss_weight=head_loss_weight,
                           temperature=temperature, epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, augment_ops=augment_ops, seed=seed, device=device,
                           num_workers=num_workers, progress=progress,
                           on_epoch=live_curves(run, distill_curve_names))
    pixels = torch.randn(64, *teacher.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    speed = compare_trunks(teacher, result.trunk, pixels, device=device)
    figures = {**result.metrics, **dict(extra or {}), "speedup_vs_teacher": speed["speedup"], "flops_ratio_vs_teacher": speed["flops_ratio"],
               "teacher_ms_per_image": speed["teacher_ms_per_image"],
               "student_ms_per_image": speed["student_ms_per_image"]}
    params = {"teacher_trunk_version": teacher_version, "teacher_trunk_id": teacher.trunk_id,
              "student": model_name, "images": len(paths),
              **{k: v for k, v in settings.items() if k not in ("augment", "heads", "probe")}}
    recipe_json = {"model_name": model_name, "model_kwargs": dict(model_kwargs),
                   "data_config": dict(teacher.data_config), "student_seed": student_seed,
                   "distilled_from": teacher_version, "teacher_trunk_id": teacher.trunk_id,
                   "production_trunk_version": release.trunk_version, "images": len(paths),
                   **settings, "augment": list(augment_ops or [])}
    version = register_trunk(client, result.trunk, description=f"{model_name} distilled from trunk "
                                                                 f"v{teacher_version}",
                             params=params, metrics=figures, recipe=recipe_json,
                             trained_on=distilled_on(client, teacher_version, result.paths),
                             tags={DISTILL_RECIPE_TAG: recipe, "distilled_from": str(teacher_version)},
                             run=run, cost_device=device)
    return version, result, figures


def distilled_on(client: MlflowClient, teacher_version: int, paths: Sequence[str]) -> SeenImages | None:
    """What a distilled student has seen: its own images plus everything its teacher trained on.

    The student learns to reproduce the teacher's features, so what the teacher learned
    from its training images reaches it too. None when the teacher has no record: then
    what the student saw is unknown as well.

    Args:
        client: the registry.
        teacher_version: the teacher's ``trunk`` version.
        paths: the images the student was distilled on (the decodable ones).
    """
    teacher_seen = trunk_trained_on(client, teacher_version)
    if teacher_seen is None:
        log.warning("trunk v%s has no record of its training images, so the distilled student has none either",
                    teacher_version)
        return None
    return teacher_seen.union(SeenImages(content_sha(p) for p in paths))


def refresh_job(client: MlflowClient, workspace: Workspace, *, build: Callable[[], Candidate] | None,
                candidate: str | int = CANDIDATE, tolerances: Tolerances, batch_size: int, num_workers: int,
                device: str, progress: bool, promote: bool = True, cascade: bool = True,
                parallel: Parallel = Parallel(),
                echo: Callable[[str], None] | None = None) -> tuple[Candidate | None, CascadeResult | None]:
    """Build a candidate (unless ``build`` is None: use ``candidate``), then run the cascade on it.

    ``parallel``: how the cascade spreads the heads (:class:`registry.jobs.cascade.Parallel`).
    """
    built = None
    if build is not None:
        built = build()
        say = narrator(log, echo)
        say(f"candidate trunk v{built.version} ({built.trunk.model_name}, trunk_id {built.trunk.trunk_id}): "
            f"{built.how}, {built.status}")
        for note in built.notes:
            say(f"  {note}")
        candidate = built.version
    if not cascade:
        return built, None
    return built, run_cascade(client, workspace, candidate=candidate, tolerances=tolerances, batch_size=batch_size,
                              num_workers=num_workers, device=device, progress=progress, promote=promote,
                              parallel=parallel, echo=echo)

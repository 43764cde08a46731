"""Data-parallel trunk training across processes: the plumbing, kept out of the loop and the trainers.

A platform owner whose trunk training outgrows one process launches the same command under
``torchrun --nproc_per_node=N -m tools.train_trunk ...``: N processes (ranks), gloo between
them on the CPU, NCCL on GPUs (one GPU per rank). The design goal is equality with one
process: the same recipe gives the same weights, up to the order of floating-point sums.

- Batches: every rank draws the single-process order of *global* batches of B images and
  takes its contiguous share of each (:func:`share`; shares differ by at most one image).
  Augmentation is seeded per image and epoch (:mod:`trunk.train`), never per rank or
  worker, so an image is augmented alike whichever rank decodes it.
- Gradients: each rank backpropagates its loss weighted by its count; one all-reduce of
  every gradient, divided by the run's count (:func:`combine_gradients`), gives every rank
  the gradient of the global batch's loss, and the optimiser takes the single-process step. An explicit all-reduce
  rather than ``DistributedDataParallel``: the loop sees only the optimiser's parameters and
  the caller's ``loss_fn`` (trunk training calls a trunk and separate task classifiers,
  distillation a student and projectors), so DDP would need every caller to route its
  forward through one wrapper; and a parameter that no rank used keeps ``grad=None`` (AdamW
  then skips it, as one process would), which DDP's zero-filled buckets cannot express. The
  price: the reduction waits for the whole backward instead of overlapping with it.
- Batch norm: statistics over a rank's share are not the global batch's. torch's
  ``SyncBatchNorm`` refuses CPU tensors (torch 2.14: "expected input tensor to be on GPU"),
  so :func:`synced_batch_norm` makes each batch-norm layer of the trained modules
  all-reduce its sums (differentiably: the backward reduces too) and normalise with the
  global mean and variance, on CPU and GPU alike; running statistics update as one
  process's would.
- Figures: epoch sums are reduced (:func:`reduce_sums`), so every rank holds the same
  history row, and early stopping decides alike everywhere.

Only rank 0 talks to MLflow (:mod:`registry.jobs.train_trunk`); the others train alongside,
wait for its version (:func:`broadcast_int`) and exit. The process group has a timeout, and
a dead peer breaks the others' connections: a failing rank fails the job, it does not hang it.

A process that torchrun did not start (no ``WORLD_SIZE`` > 1) is one process: every function
here is then a no-op, and nothing else changes.

Why torchrun and not Ray Train: the unit of work is one training run of one recipe, which
torchrun already launches wherever GPUs are (one command, the same tool, plain environment
variables); Ray Train would wrap the one loop in its own trainer, worker group and
checkpoint layer, a second way to run training and save a trunk beside the registry's.
Ray stays where work is many small independent tasks (bulk classification, the cascade's
head retraining).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run.

    Attributes:
        rank: 0 .. world_size - 1; rank 0 registers and logs.
        world_size: processes in the run (> 1).
        device: where collective tensors live: the CPU for gloo, this rank's GPU for NCCL.
    """

    rank: int
    world_size: int
    device: torch.device


def current() -> Ranks | None:
    """This process's :class:`Ranks` when it is one of several in a process group; None otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def is_main() -> bool:
    """Rank 0, or a single process: the one that registers, logs and prints."""
    ranks = current()
    return ranks is None or ranks.rank == 0


def _launched_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


@contextlib.contextmanager
def launched(device: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[str]:
    """Join the process group torchrun started, for the duration; yields this rank's device.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; the group is initialised from them (``env://``). The backend follows the
    device: NCCL when it is a GPU (rank ``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``), gloo on
    the CPU. Without torchrun (or with one process) nothing happens and ``device`` comes back.

    Args:
        device: the resolved device, ``cpu`` or ``cuda[:n]``.
        timeout_s: how long a collective waits for its peers before failing the rank.
    """
    world = _launched_world()
    if world < 2 or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; run one process")
    if not timeout_s > 0:
        raise ValueError(f"field 'distributed_timeout_s': must be positive, got {timeout_s}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda":
        if dev.index is not None and dev.index != local_rank:
            warnings.warn(f"device {device} ignored under torchrun: rank with LOCAL_RANK={local_rank} "
                          f"uses cuda:{local_rank}", stacklevel=3)
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
        kwargs["device_id"] = dev
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"field 'device': data-parallel runs support cpu (gloo) and cuda (nccl), not {device}")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    logger.info("rank %d of %d (%s, %s)", dist.get_rank(), dist.get_world_size(), backend, dev)
    try:
        yield str(dev)
    finally:
        dist.destroy_process_group()


# -- sharding ---------------------------------------------------------------------


def share(items: Sequence[Any], ranks: Ranks | None) -> Sequence[Any]:
    """This rank's contiguous share of one global batch: ``items[r*n//W : (r+1)*n//W]`` (all of it alone)."""
    if ranks is None:
        return items
    n = len(items)
    return items[ranks.rank * n // ranks.world_size:(ranks.rank + 1) * n // ranks.world_size]


def ranks_of(batches: Any) -> Ranks | None:
    """The ranks that share ``batches`` between them, or None for a loop of its own.

    A loader shards its global batches across a run when its batch sampler carries
    ``ranks`` (:class:`trunk.train.GlobalBatches`). The data decides, so a loop over
    unsharded batches (a head's cached features) never reduces anything, even in a
    process that is one rank of a run.
    """
    sampler = getattr(batches, "batch_sampler", None)
    return getattr(sampler, "ranks", None) or getattr(batches, "ranks", None)


# -- collectives ------------------------------------------------------------------


def all_sum(values: Tensor, ranks: Ranks | None) -> Tensor:
    """``values`` summed over the ranks (returned on ``values``' device); itself alone."""
    if ranks is None:
        return values
    out = values.detach().to(ranks.device, copy=True)
    dist.all_reduce(out)
    return out.to(values.device)


def reduce_sums(sums: Mapping[str, float], ranks: Ranks | None = None) -> dict[str, float]:
    """Each figure summed over the ranks (in float64), so every rank holds the run's totals.

    Every rank must pass the same keys. ``ranks`` defaults to :func:`current`.
    """
    ranks = current() if ranks is None else ranks
    if ranks is None:
        return dict(sums)
    keys = sorted(sums)
    total = all_sum(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64), ranks).tolist()
    return {k: int(round(v)) if isinstance(sums[k], int) else v for k, v in zip(keys, total)}


def everyone(flag: bool, ranks: Ranks | None) -> bool:
    """Whether ``flag`` holds on every rank."""
    if ranks is None:
        return flag
    return int(all_sum(torch.tensor([int(flag)]), ranks)) == ranks.world_size


def broadcast_int(value: int | None, ranks: Ranks | None = None) -> int | None:
    """Rank 0's ``value`` (an int >= 0, or None) on every rank; no pickles cross the wire."""
    ranks = current() if ranks is None else ranks
    if ranks is None:
        return value
    if value is not None and value < 0:
        raise ValueError(f"broadcast_int takes an int >= 0 or None, got {value}")
    out = torch.tensor([-1 if value is None else int(value)], dtype=torch.int64, device=ranks.device)
    dist.broadcast(out, src=0)
    got = int(out.item())
    return None if got < 0 else got


def broadcast_state(module: nn.Module, ranks: Ranks | None) -> None:
    """Rank 0's parameters and buffers on every rank, in place (what DDP does at its start).

    Every rank builds its modules from the same seed, so this changes nothing in a sound
    run; it keeps a rank whose copy differs (a stale file, another library version) from
    silently training something else.
    """
    if ranks is None:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            buf = tensor.detach().to(ranks.device, copy=True)
            dist.broadcast(buf, src=0)
            tensor.copy_(buf.to(tensor.device))


def combine_gradients(params: Sequence[nn.Parameter], count: float, ranks: Ranks | None) -> float:
    """Every rank's gradients made ``sum_r grad_r / sum_r count_r``; returns ``sum_r count_r``.

    Each rank has run the backward of ``count_r * loss_r`` (its loss weighted by its
    count, before the backward: the batch-norm all-reduces carry the weights across ranks
    in their backward, so a weight applied afterwards would miss those terms). With each
    ``loss_r`` the mean over its share and ``count_r`` its size, the result is the gradient of
    the global batch's mean: the single-process gradient. A parameter whose gradient is None
    on every rank stays None (AdamW skips it, as it would in one process); one used on some
    rank only gets the others' zeros. One all-reduce of a flat float32 buffer (the
    gradients, a used-flag per parameter, the count).
    """
    if ranks is None:
        return count
    grads = [p.grad for p in params]
    flat = [torch.zeros(p.numel(), dtype=torch.float32, device=p.device) if g is None
            else g.detach().float().reshape(-1) for p, g in zip(params, grads)]
    used = torch.tensor([0.0 if g is None else 1.0 for g in grads] + [float(count)], dtype=torch.float32)
    buffer = torch.cat([*(f.to(ranks.device) for f in flat), used.to(ranks.device)])
    dist.all_reduce(buffer)
    total = float(buffer[-1])
    if not total > 0:
        raise RuntimeError(f"combine_gradients: the ranks' counts sum to {total}; every step needs a positive count")
    flags = buffer[-1 - len(params):-1].tolist()
    offset = 0
    for p, flag in zip(params, flags):
        n = p.numel()
        if flag > 0:
            p.grad = (buffer[offset:offset + n] / total).view_as(p).to(device=p.device, dtype=p.dtype)
        else:
            p.grad = None
        offset += n
    return total


# -- batch norm across ranks ------------------------------------------------------


def _batch_norm_act_type() -> type | None:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency; keep the module importable
        return None
    return BatchNormAct2d


def _check_batch_norm(name: str, module: _BatchNorm) -> None:
    act = _batch_norm_act_type()
    if act is not None and isinstance(module, act):
        return
    if type(module).forward is not _BatchNorm.forward:
        raise TypeError(f"module '{name}' ({type(module).__name__}) has a batch-norm forward of its own; "
                        f"a data-parallel run can sync only torch's BatchNorm1d/2d/3d and timm's BatchNormAct2d")


def _synced_forward(module: _BatchNorm, original: Any, ranks: Ranks, x: Tensor) -> Tensor:
    """``module``'s forward with batch statistics over every rank's share (training mode)."""
    if not module.training:
        return original(x)
    factor = 0.0 if module.momentum is None else module.momentum
    if module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    channels = x.shape[1]
    dims = [0, *range(2, x.ndim)]
    shape = [1, channels] + [1] * (x.ndim - 2)
    xf = x.float()
    local = x.numel() // channels
    # Sums and the count in float64: a count beyond 2**24 is exact, and the ranks' sums add
    # without another rounding. torch.distributed.nn's all_reduce is differentiable (its
    # backward all-reduces the gradient), so the backward is the global batch's too.
    from torch.distributed.nn.functional import all_reduce

    stats = torch.cat([xf.sum(dims).double(), xf.new_tensor([local], dtype=torch.float64)])
    stats = all_reduce(stats.to(ranks.device)).to(x.device)
    n = float(stats[-1].detach())
    mean = (stats[:-1] / n).float()
    centred = xf - mean.view(shape)
    var = (all_reduce((centred * centred).sum(dims).double().to(ranks.device)).to(x.device) / n).float()
    y = centred * torch.rsqrt(var + module.eps).view(shape)
    if module.affine:
        y = y * module.weight.view(shape) + module.bias.view(shape)
    if module.track_running_stats and module.running_mean is not None:
        with torch.no_grad():
            module.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            module.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1)), alpha=factor)
    y = y.to(x.dtype)
    act = _batch_norm_act_type()
    if act is not None and isinstance(module, act):
        y = module.act(module.drop(y))
    return y


@contextlib.contextmanager
def synced_batch_norm(model: nn.Module, ranks: Ranks | None) -> Iterator[None]:
    """Inside: every batch-norm layer of ``model`` in training mode normalises over the global batch.

    The layers keep their type, parameters and buffers (the optimiser and the trunk's
    weights are the caller's very objects); only their ``forward`` is replaced for the
    duration, and restored after. Eval mode (validation) uses running statistics as usual.
    """
    if ranks is None:
        yield
        return
    patched = []
    for name, module in model.named_modules():
        if isinstance(module, nn.SyncBatchNorm) or not isinstance(module, _BatchNorm):
            continue
        _check_batch_norm(name, module)
        if "forward" in vars(module):
            raise TypeError(f"module '{name}' already has its forward replaced; cannot sync its batch norm")
        original = module.forward
        module.forward = functools.partial(_synced_forward, module, original, ranks)
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward

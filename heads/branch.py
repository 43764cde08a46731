"""Branch heads: fork at an earlier tap with a copy of the trunk's layers after it.

A branch head reads an earlier tap (``layer3``, ``stages.2``, ``blocks.3``, ...), runs its
own copy of the trunk's layers from there up to pooling (the *suffix*), and classifies
the pooled pre-logits vector. Initialised from the trunk (:meth:`BranchHead.init_from_trunk`),
the suffix maps the tap's features to exactly the trunk's own ``pooled`` output, i.e.
``model.forward_head(model.forward_features(x), pre_logits=True)``; fine-tuning then
moves it away from the shared trunk for this one head.

How a family's network continues after a tap is a small *suffix builder* in a registry
keyed by timm model class (see :func:`register_suffix`), not an ``if`` chain. Built-in:
ResNet, ConvNeXt, EfficientNet and VisionTransformer.

Input format. Every branch reads its tap exactly as the trunk returns it, so branch heads
run off the trunk's single pass (in a head bank too): CNN branches read ``(B, C, H, W)``
maps; ViT branches read ``(B, prefix + H*W, C)`` tokens including the prefix (class)
tokens, which the trunk returns for models that have them (the class token that the head
pools is mixed with all other tokens by every block, so an NCHW map without it would not
do). A ViT without prefix tokens also accepts the NCHW map.

The module rebuilds without the trunk's weights, from ``model_name``, ``model_kwargs``
and ``tap`` (random init, ``pretrained=False``), so :func:`heads.store.load_head` can
rebuild it from its spec and then load its safetensors weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import global_pool_nlc
from torch import nn

from trunk.timm_args import check_model_kwargs, check_model_name

# BranchHead arguments the platform fills in from the trunk and ``attach.tap``, like
# in_features and num_classes; a head config must not set them.
BRANCH_PLATFORM_ARGS = ("model_name", "tap", "model_kwargs")

SuffixBuilder = Callable[[nn.Module, str], "SuffixParts"]

# model class -> suffix builder. Call contract of a builder: ``builder(model, tap)`` with a
# timm model of that class (built with num_classes=0) and one of its feature_info module
# names; returns SuffixParts whose modules are the model's own (not copies), raising
# KeyError if the tap is not one it can continue from.
_SUFFIX_BUILDERS: dict[type, SuffixBuilder] = {}


@dataclass
class SuffixParts:
    """The network after a tap, split so that its first part can be frozen.

    Attributes:
        entry: runs before the first block (input reshaping, a stem pool); no weights.
        blocks: the family's natural units after the tap (ResNet ``layerN``, ConvNeXt
            ``stages.N``, EfficientNet ``blocks.N``, ViT ``blocks.N``), in order.
        post: after the blocks, before pooling (EfficientNet ``conv_head``/``bn2``,
            ConvNeXt ``norm_pre``, ViT ``norm``).
        pool: the model's ``forward_head(..., pre_logits=True)`` part.
    """

    entry: nn.Module
    blocks: list[nn.Module]
    post: nn.Module
    pool: nn.Module


def register_suffix(model_class: type) -> Callable[[SuffixBuilder], SuffixBuilder]:
    """Register the suffix builder for a timm model class (and its subclasses).

    Raises:
        ValueError: if the class already has a builder (registries never overwrite).
    """

    def decorate(builder: SuffixBuilder) -> SuffixBuilder:
        if model_class in _SUFFIX_BUILDERS:
            raise ValueError(f"a branch suffix builder for {model_class.__name__} is already registered")
        _SUFFIX_BUILDERS[model_class] = builder
        return builder

    return decorate


def suffix_builder(model: nn.Module) -> SuffixBuilder:
    """The registered builder for ``model``'s class, nearest in its class hierarchy."""
    for cls in type(model).__mro__:
        if cls in _SUFFIX_BUILDERS:
            return _SUFFIX_BUILDERS[cls]
    families = ", ".join(sorted(c.__name__ for c in _SUFFIX_BUILDERS))
    raise ValueError(f"branch heads do not support {type(model).__name__} models; supported: {families}")


# -- small modules the suffixes are made of ------------------------------------------------
class PreLogits(nn.Module):
    """Calls a timm classifier head with ``pre_logits=True`` (ConvNeXt's NormMlpClassifierHead)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x, pre_logits=True)


class ToTokens(nn.Module):
    """Accepts ViT tokens ``(B, L, C)``; an NCHW map only when the model has no prefix tokens."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return x
        if x.ndim == 4 and self.num_prefix_tokens == 0:
            return x.flatten(2).transpose(1, 2)
        raise ValueError(
            f"a ViT branch needs tokens (B, L, C) including its {self.num_prefix_tokens} prefix token(s), "
            f"got shape {tuple(x.shape)}; read the tap from trunk(x, [tap]) or heads.branch.branch_input"
        )


class TokenPool(nn.Module):
    """A VisionTransformer's pooling and ``fc_norm``, as its ``forward_head(pre_logits=True)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.attn_pool = model.attn_pool
        self.fc_norm = model.fc_norm
        self.head_drop = model.head_drop
        self.global_pool = model.global_pool
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.pool_include_prefix = bool(getattr(model, "pool_include_prefix", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn_pool is not None:
            x = self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix_tokens:])
        else:
            x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens,
                                reduce_include_prefix=self.pool_include_prefix)
        return self.head_drop(self.fc_norm(x))


def _after(prefix: str, tap: str, count: int) -> int:
    """Index of the first block after tap ``<prefix>.<i>``; KeyError for any other name."""
    head, _, index = tap.rpartition(".")
    if head != prefix or not index.isdigit() or int(index) >= count:
        raise KeyError(tap)
    return int(index) + 1


# -- the built-in families -----------------------------------------------------------------
@register_suffix(timm.models.resnet.ResNet)
def _resnet_suffix(model: nn.Module, tap: str) -> SuffixParts:
    # forward_features runs conv1, bn1, act1, maxpool, layer1..layer4 in this order.
    layers = ["layer1", "layer2", "layer3", "layer4"]
    if tap == "act1":
        entry, first = model.maxpool, 0
    elif tap in layers:
        entry, first = nn.Identity(), layers.index(tap) + 1
    else:
        raise KeyError(tap)
    # forward_head's dropout (drop_rate) is left to the branch's own dropout.
    return SuffixParts(entry, [getattr(model, n) for n in layers[first:]], nn.Identity(), model.global_pool)


@register_suffix(timm.models.convnext.ConvNeXt)
def _convnext_suffix(model: nn.Module, tap: str) -> SuffixParts:
    first = _after("stages", tap, len(model.stages))
    return SuffixParts(nn.Identity(), list(model.stages)[first:], model.norm_pre, PreLogits(model.head))


@register_suffix(timm.models.efficientnet.EfficientNet)
def _efficientnet_suffix(model: nn.Module, tap: str) -> SuffixParts:
    first = _after("blocks", tap, len(model.blocks))
    return SuffixParts(nn.Identity(), list(model.blocks)[first:], nn.Sequential(model.conv_head, model.bn2),
                       model.global_pool)


@register_suffix(timm.models.vision_transformer.VisionTransformer)
def _vit_suffix(model: nn.Module, tap: str) -> SuffixParts:
    first = _after("blocks", tap, len(model.blocks))
    return SuffixParts(ToTokens(int(model.num_prefix_tokens)), list(model.blocks)[first:], model.norm,
                       TokenPool(model))


class Suffix(nn.Module):
    """The layers after a tap up to the pooled pre-logits vector, as one module."""

    def __init__(self, parts: SuffixParts) -> None:
        super().__init__()
        self.entry = parts.entry
        self.blocks = nn.Sequential(*parts.blocks)
        self.post = parts.post
        self.pool = parts.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.post(self.blocks(self.entry(x))))


def _suffix_parts(model: nn.Module, model_name: str, tap: str) -> SuffixParts:
    builder = suffix_builder(model)
    try:
        parts = builder(model, tap)
    except KeyError:
        parts = None
    if parts is None or not parts.blocks:
        raise ValueError(f"cannot branch '{model_name}' at tap '{tap}'; valid branch taps: "
                         f"{', '.join(_branch_taps(model))}")
    return parts


def _branch_taps(model: nn.Module) -> list[str]:
    builder = suffix_builder(model)
    taps = []
    for info in model.feature_info:
        try:
            if builder(model, info["module"]).blocks:
                taps.append(info["module"])
        except KeyError:
            continue
    return taps


def branch_taps(trunk: Any) -> list[str]:
    """The taps a branch head can fork from on this trunk, in network order.

    Every ``feature_info`` tap with at least one block after it. The last tap is not one:
    after it there is no block left to fine-tune, only the final norm and pooling, so a
    branch there would be a ``pooled`` head in disguise.

    Args:
        trunk: a :class:`trunk.model.Trunk`.

    Raises:
        ValueError: the trunk's model family has no registered suffix builder.
    """
    return _branch_taps(trunk.model)


def check_branch_tap(trunk: Any, tap: str) -> None:
    """Raise a one-line ``ValueError`` listing the valid branch taps unless ``tap`` is one."""
    valid = branch_taps(trunk)
    if tap not in valid:
        raise ValueError(f"cannot branch '{trunk.model_name}' at tap '{tap}'; valid branch taps: {', '.join(valid)}")


def _tap_index(model: nn.Module, tap: str) -> int:
    return [info["module"] for info in model.feature_info].index(tap)


@torch.no_grad()
def branch_input(trunk: Any, x: torch.Tensor, tap: str) -> torch.Tensor:
    """The tap's features as a :class:`BranchHead` on that tap reads them: the trunk's own tap.

    CNNs: ``(B, C, H, W)``. ViTs with prefix tokens: the tokens after the tap's block,
    prefix first, ``(B, prefix + H*W, C)``. Kept for callers that need one tap; code that
    already runs the trunk reads ``trunk(x, taps)[tap]`` directly. Runs without gradients:
    the shared prefix is never trained by a branch.

    Args:
        trunk: a :class:`trunk.model.Trunk`.
        x: preprocessed images ``(B, 3, H, W)``.
        tap: a branch tap (see :func:`branch_taps`).
    """
    check_branch_tap(trunk, tap)
    return trunk(x, [tap])[tap]


def branch_input_shape(trunk: Any, tap: str) -> tuple[int, ...]:
    """Per-image shape of :func:`branch_input`: the tap's declared ``trunk.tap(tap).shape``.

    Known before anything runs, e.g. for :func:`heads.training.cost.measure_cost`.
    """
    check_branch_tap(trunk, tap)
    return tuple(trunk.tap(tap).shape)


class BranchHead(nn.Module):
    """A copy of the trunk's layers after an earlier tap, plus a linear classifier.

    Args:
        in_features: channels of the tap (filled in by the platform from the tap spec).
        num_classes: number of labels.
        model_name: the trunk's timm model name.
        tap: the tap to fork at; one of :func:`branch_taps`.
        model_kwargs: the trunk's extra ``timm.create_model`` arguments (architecture only).
        freeze_blocks: how many of the suffix's first blocks stay frozen (no gradients,
            eval mode, so their batch-norm statistics stay the trunk's).
        dropout: dropout on the pooled features, during training only.
    """

    # Read by heads.spec: a branch forks at an earlier tap, never at `pooled`, and these
    # arguments come from the trunk, not from a head config.
    is_branch = True
    platform_args = BRANCH_PLATFORM_ARGS

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        model_name: str,
        tap: str,
        model_kwargs: dict[str, Any] | None = None,
        freeze_blocks: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # Both reach timm.create_model and may come from a stored head.json: only registered
        # model names and architecture arguments pass (no checkpoint_path, pretrained_cfg, ...).
        self.model_name = check_model_name(model_name)
        self.tap = tap
        self.model_kwargs = check_model_kwargs(model_kwargs or {})
        # The architecture only: weights come from init_from_trunk or a safetensors file.
        # A forked RNG keeps building a head from disturbing the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(model_name, pretrained=False, num_classes=0, **self.model_kwargs)
        parts = _suffix_parts(model, model_name, tap)
        channels = int(model.feature_info[_tap_index(model, tap)]["num_chs"])
        if in_features != channels:
            raise ValueError(f"tap '{tap}' of '{model_name}' has {channels} channels, got in_features={in_features}")
        if not 0 <= freeze_blocks <= len(parts.blocks):
            raise ValueError(f"freeze_blocks={freeze_blocks}: the branch at '{tap}' has {len(parts.blocks)} blocks")
        self.in_features = in_features
        self.num_features = int(model.num_features)
        self.freeze_blocks = freeze_blocks
        self.suffix = Suffix(parts)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)
        for module in self._frozen():
            module.requires_grad_(False)

    def _frozen(self) -> list[nn.Module]:
        if not self.freeze_blocks:
            return []
        return [self.suffix.entry, *list(self.suffix.blocks)[: self.freeze_blocks]]

    def init_from_trunk(self, trunk: Any) -> BranchHead:
        """Copy the suffix's weights (and batch-norm statistics) from a live trunk.

        Args:
            trunk: a :class:`trunk.model.Trunk` of the same model and kwargs.

        Returns:
            ``self``, for chaining.
        """
        if trunk.model_name != self.model_name or dict(trunk.model_kwargs) != self.model_kwargs:
            raise ValueError(f"branch head is for '{self.model_name}' {self.model_kwargs}, "
                             f"trunk is '{trunk.model_name}' {dict(trunk.model_kwargs)}")
        source = Suffix(_suffix_parts(trunk.model, trunk.model_name, self.tap))
        self.suffix.load_state_dict(source.state_dict(), strict=True)
        return self

    def train(self, mode: bool = True) -> BranchHead:
        """Switch modes; frozen blocks always stay in eval mode."""
        super().train(mode)
        for module in self._frozen():
            module.eval()
        return self

    def prefix_stages(self) -> list[nn.Module]:
        """The frozen stages a head bank may run once for several branches: entry, frozen blocks.

        Stage 0 is the suffix's ``entry``, stage ``i`` its block ``i - 1``; empty when no
        block is frozen. Branches on one tap initialised from one trunk carry identical
        copies of these (frozen blocks keep the trunk's weights and batch-norm statistics).
        """
        return self._frozen()

    def forward_from(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Logits from the output of the first ``stage`` stages (0: the tap's features), as :meth:`forward`.

        Args:
            x: what stages ``0 .. stage - 1`` of :meth:`prefix_stages` gave (the tap's
                features when ``stage`` is 0).
            stage: how many stages already ran, ``0 <= stage <= 1 + len(blocks)``.
        """
        stages = [self.suffix.entry, *self.suffix.blocks]
        if not 0 <= stage <= len(stages):
            raise ValueError(f"stage={stage}: the branch at '{self.tap}' has {len(stages)} stages")
        for module in stages[stage:]:
            x = module(x)
        return self.fc(self.dropout(self.suffix.pool(self.suffix.post(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled pre-logits vector ``(B, num_features)`` from the tap's features."""
        return self.suffix(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` from the tap's features (see :func:`branch_input`)."""
        return self.fc(self.dropout(self.features(x)))


def branch_kwargs(trunk: Any, tap: str, /, **module_kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that rebuild a branch on ``trunk`` at ``tap`` (for the head spec).

    Args:
        trunk: a :class:`trunk.model.Trunk`.
        tap: the branch tap.
        module_kwargs: the head config's own arguments (``freeze_blocks``, ``dropout``).

    Raises:
        ValueError: the tap cannot be branched from, or ``module_kwargs`` sets one of
            ``BRANCH_PLATFORM_ARGS``.
    """
    check_branch_tap(trunk, tap)
    clash = [k for k in BRANCH_PLATFORM_ARGS if k in module_kwargs]
    if clash:
        raise ValueError(f"module.{clash[0]} is set by the platform from the trunk and attach.tap")
    return {"model_name": trunk.model_name, "tap": tap, "model_kwargs": dict(trunk.model_kwargs), **module_kwargs}

"""The trunk: one timm backbone, its named taps, its preprocessing and its identity.

A trunk is a timm model name plus weights plus the model's data config. Its taps are
named after timm's ``feature_info`` modules (``layer3``, ``stages.2``, ``blocks.5``)
plus ``pooled``, the pre-logits vector. Taps are computed with timm's own
``forward_intermediates`` and returned, never stored on the module, so one trunk can
serve many callers at once.

Tap layout. CNN taps are maps ``(B, C, H, W)``. Models with prefix tokens (timm's
VisionTransformer and relatives: ``num_prefix_tokens > 0``) return their block taps as
tokens ``(B, prefix + H*W, C)``, prefix (class) tokens first, exactly as the next block
sees them: the class token is what such a model pools, and the NCHW map drops it, so a
branch continuing from a tap could not be computed from the map. All taps still come
from the one forward pass.

``trunk_id`` is a short content hash of the model name, the model kwargs, every weight
tensor and the data config: two trunks with the same id produce the same features, and
anything that changes features changes the id. It is computed when the trunk is built;
code that changes weights (training, distillation) builds a new ``Trunk`` from them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save
from timm.data import resolve_data_config
from torch import nn

from trunk.files import atomic_write, write_json_atomic
from trunk.timm_args import TimmArgumentError, check_model_kwargs

POOLED = "pooled"
SPEC_FILE = "trunk.json"
WEIGHTS_FILE = "trunk.safetensors"

# The keys of timm's data config that change what the network sees.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class TrunkError(ValueError):
    """A trunk cannot be built or asked for what it does not have."""


@dataclass(frozen=True)
class TapSpec:
    """What one tap yields per image, known before anything runs.

    Attributes:
        name: tap name (a ``feature_info`` module name, or ``pooled``).
        index: position in ``feature_info``; -1 for ``pooled``.
        channels: channels (or features, for ``pooled``).
        reduction: spatial stride relative to the input; None for ``pooled``.
        shape: per-image tensor shape at the trunk's input size: ``(C, H, W)`` for a
            map, ``(prefix + H*W, C)`` for a token tap, ``(C,)`` for ``pooled``.
    """

    name: str
    index: int
    channels: int
    reduction: int | None
    shape: tuple[int, ...]


def canonical_data_config(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """The feature-relevant part of a timm data config as plain JSON types."""
    out: dict[str, Any] = {}
    for key in DATA_CONFIG_KEYS:
        if key in data_config:
            value = data_config[key]
            out[key] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def preprocess_key(data_config: Mapping[str, Any]) -> str:
    """Short hash naming a preprocessing (the feature cache keys on it)."""
    blob = json.dumps(canonical_data_config(data_config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def token_prefix(model: nn.Module) -> int:
    """How many prefix tokens a model's block taps carry; 0 means its taps are NCHW maps.

    Nonzero only when the model has prefix tokens and its ``forward_intermediates`` can
    return them with the tokens (``output_fmt='NLC'``, ``return_prefix_tokens``).
    """
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if prefix <= 0:
        return 0
    params = inspect.signature(model.forward_intermediates).parameters
    return prefix if {"output_fmt", "return_prefix_tokens"} <= set(params) else 0


def _grid(model: nn.Module, height: int, width: int, reduction: int) -> tuple[int, int]:
    """The token grid of a ViT-like model at an input size (its patch embed knows padding)."""
    feat_size = getattr(getattr(model, "patch_embed", None), "dynamic_feat_size", None)
    if callable(feat_size):
        h, w = feat_size((height, width))
        return int(h), int(w)
    return -(-height // reduction), -(-width // reduction)


def _create_timm_model(model_name: str, pretrained: bool, model_kwargs: Mapping[str, Any]) -> nn.Module:
    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('_')[0]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise TrunkError(f"unknown timm model '{model_name}'{hint}")
    try:  # trunk.json comes from an artifact store: only architecture arguments reach timm
        kwargs = check_model_kwargs(model_kwargs)
    except TimmArgumentError as e:
        raise TrunkError(f"trunk '{model_name}': {e}") from None
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as e:  # hub and network failures come in many exception types
        if not pretrained:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrunkError(
            f"cannot load pretrained weights for '{model_name}': the model hub could not be reached "
            f"or has no weights for it ({type(e).__name__}: {first}); use pretrained=false or a local "
            f"weights file"
        ) from None


class Trunk(nn.Module):
    """A timm backbone that returns named taps.

    Args:
        model_name: any timm model name.
        weights: a local ``.safetensors`` file with the model's state dict (classifier
            keys, if present, are ignored). Mutually exclusive with ``pretrained``.
        pretrained: load the hub's pretrained weights (needs network access).
        seed: seed for random initialisation, so an untrained trunk is reproducible.
        data_config: overrides of timm's data config (``input_size``, ``mean``, ...).
        model_kwargs: extra keyword arguments for ``timm.create_model``.
        state_dict: weights already in memory (used when training builds a new trunk).
    """

    def __init__(
        self,
        model_name: str,
        *,
        weights: str | Path | None = None,
        pretrained: bool = False,
        seed: int = 0,
        data_config: Mapping[str, Any] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if pretrained and (weights is not None or state_dict is not None):
            raise TrunkError("give either pretrained=true or a weights file, not both")
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = _create_timm_model(model_name, pretrained, self.model_kwargs)
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise TrunkError(f"trunk weights file not found: {path}")
            if path.suffix != ".safetensors":
                raise TrunkError(f"trunk weights must be a .safetensors file, got {path}")
            state_dict = load_file(str(path))
        if state_dict is not None:
            self._load_weights(state_dict, source=str(weights) if weights else "state_dict")
        self.model.eval()

        overrides = dict(data_config or {})
        if "input_size" in overrides:
            overrides["input_size"] = tuple(overrides["input_size"])
        for key in ("mean", "std"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        self.data_config = canonical_data_config(resolve_data_config(overrides, model=self.model))

        infos = self.model.feature_info
        self._tap_index = {info["module"]: i for i, info in enumerate(infos)}
        _, height, width = self.data_config["input_size"]
        self.token_prefix = token_prefix(self.model)
        taps: dict[str, TapSpec] = {}
        for i, info in enumerate(infos):
            r, c = int(info["reduction"]), int(info["num_chs"])
            if self.token_prefix:
                h, w = _grid(self.model, height, width, r)
                shape: tuple[int, ...] = (self.token_prefix + h * w, c)
            else:
                shape = (c, -(-height // r), -(-width // r))
            taps[info["module"]] = TapSpec(info["module"], i, c, r, shape)
        taps[POOLED] = TapSpec(POOLED, -1, int(self.model.num_features), None, (int(self.model.num_features),))
        self._taps = taps
        self.trunk_id = self._compute_id()
        self.eval()  # a trunk serves features; training code switches modes explicitly

    # -- identity -----------------------------------------------------------------
    def _load_weights(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        classifier = self.model.pretrained_cfg.get("classifier", "")
        classifier_prefixes = tuple(c + "." for c in ([classifier] if isinstance(classifier, str) else classifier) if c)
        own = set(self.model.state_dict())
        unexpected = [k for k in state_dict if k not in own and not k.startswith(classifier_prefixes)]
        missing = sorted(own - set(state_dict))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
            raise TrunkError(f"weights in {source} do not fit '{self.model_name}': {'; '.join(parts)}")
        self.model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=True)

    def _compute_id(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"model": self.model_name, "kwargs": self.model_kwargs,
                             "data": self.data_config}, sort_keys=True, default=str).encode())
        h.update(state_dict_digest(self.model.state_dict()).encode())
        return h.hexdigest()[:16]

    @property
    def preprocess_key(self) -> str:
        return preprocess_key(self.data_config)

    # -- taps -----------------------------------------------------------------------
    @property
    def taps(self) -> dict[str, TapSpec]:
        """Every tap this trunk offers, in network order, ``pooled`` last."""
        return dict(self._taps)

    def tap(self, name: str) -> TapSpec:
        """The spec of one tap; a clear error listing the valid ones otherwise."""
        try:
            return self._taps[name]
        except KeyError:
            raise TrunkError(
                f"trunk '{self.model_name}' has no tap '{name}'; valid taps: {', '.join(self._taps)}"
            ) from None

    def serving_model(self) -> nn.Module:
        """The network :meth:`forward` runs: the timm model itself.

        A quantized trunk (:mod:`trunk.quantize`) runs its own int8 or 16-bit copy here and
        keeps the float model in :attr:`model` for ``feature_info`` and branch heads.
        """
        return self.model

    def forward(self, x: torch.Tensor, taps: Sequence[str] = (POOLED,)) -> dict[str, torch.Tensor]:
        """Run the network only as far as the deepest requested tap needs.

        Args:
            x: a batch of preprocessed images, ``(B, 3, H, W)``.
            taps: tap names; see :attr:`taps`.

        Returns:
            ``{tap: tensor}`` for exactly the requested taps, each ``(B, *tap(name).shape)``:
            maps for CNNs, tokens with their prefix tokens first for ViT-like models.
        """
        specs = [self.tap(t) for t in dict.fromkeys(taps)]
        net = self.serving_model()
        indices = sorted({s.index for s in specs if s.name != POOLED})
        want_pooled = any(s.name == POOLED for s in specs)
        out: dict[str, torch.Tensor] = {}
        if not indices:
            if want_pooled:
                out[POOLED] = net.forward_head(net.forward_features(x), pre_logits=True)
            return out
        # Token taps: timm splits each into (spatial, prefix); they are joined back below.
        fmt = {"output_fmt": "NLC", "return_prefix_tokens": True} if self.token_prefix else {}
        if want_pooled:
            final, inter = net.forward_intermediates(x, indices=indices, intermediates_only=False, **fmt)
            out[POOLED] = net.forward_head(final, pre_logits=True)
        else:
            inter = net.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True, **fmt)
        if self.token_prefix:
            inter = [torch.cat([prefix, spatial], dim=1) for spatial, prefix in inter]
        by_index = dict(zip(indices, inter))
        for s in specs:
            if s.name != POOLED:
                out[s.name] = by_index[s.index]
        return {t: out[t] for t in dict.fromkeys(taps)}

    # -- persistence ----------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """A JSON-able description: everything but the weights."""
        return {
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            "data_config": self.data_config,
            "trunk_id": self.trunk_id,
            "taps": {name: {"channels": t.channels, "reduction": t.reduction, "shape": list(t.shape)}
                     for name, t in self._taps.items()},
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``trunk.safetensors`` and ``trunk.json`` into ``directory``, each atomically (:mod:`trunk.files`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        blob = safetensors_save(state, metadata={"trunk_id": self.trunk_id})
        atomic_write(directory / WEIGHTS_FILE, lambda f: f.write(blob))
        write_json_atomic(directory / SPEC_FILE, self.spec(), indent=2)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Trunk:
        """Rebuild a trunk saved by :meth:`save`; its trunk_id is checked against the spec.

        A spec with a ``reduction`` field is a quantized trunk, rebuilt by
        :func:`trunk.quantize.load_quantized`.
        """
        directory = Path(directory)
        spec_path = directory / SPEC_FILE
        try:
            spec = json.loads(spec_path.read_text())
        except FileNotFoundError:
            raise TrunkError(f"no trunk spec at {spec_path}") from None
        except json.JSONDecodeError as e:
            raise TrunkError(f"{spec_path}: not valid JSON ({e})") from None
        if "reduction" in spec:  # a quantized trunk: its own layout and rebuild (trunk.quantize)
            from trunk.quantize import load_quantized

            return load_quantized(directory, spec)
        trunk = cls(spec["model_name"], weights=directory / WEIGHTS_FILE,
                    data_config=spec.get("data_config"), model_kwargs=spec.get("model_kwargs"))
        if spec.get("trunk_id") and spec["trunk_id"] != trunk.trunk_id:
            raise TrunkError(
                f"{spec_path}: field 'trunk_id' says {spec['trunk_id']} but the weights hash to {trunk.trunk_id}"
            )
        return trunk

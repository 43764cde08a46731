"""Quantized trunks: the same network with int8 (CPU) or 16-bit float (GPU) serving weights.

A quantized trunk is a :class:`trunk.model.Trunk` with its own ``trunk_id``: the hash of the
float architecture, the reduction recipe (scheme, backend, source trunk_id, calibration
image count) and every stored tensor, quantized ones included. It keeps the float timm
model in ``trunk.model`` (``feature_info``, tap specs, and :meth:`heads.branch.BranchHead.init_from_trunk`,
which copies a branch's fp32 suffix from it) and runs a separate *serving* network in
``forward``, so every tap, a head bank and bulk classification work on it unchanged.

Schemes (:data:`SCHEMES`):

- ``static``: int8 weights and activations, calibrated on images; ResNet, ConvNeXt and
  EfficientNet (ViTs are refused: their int8 LayerNorm/softmax activations lose too much,
  pooled cosine 0.61 on test_vit; use ``dynamic``). Each unit (a ResNet ``layerN``, a
  ConvNeXt ``stages.N``, an EfficientNet ``blocks.N``, and the family's
  stem, plus EfficientNet's ``conv_head``) is one FX graph: ``prepare_fx`` with an example
  input captured from a real forward, observers calibrated by running the whole trunk on
  the calibration images, then ``convert_fx``. A unit takes and returns float tensors
  (quantize at its entry, dequantize at its exit), so timm's own ``forward_intermediates``
  still drives the network and every tap keeps its place and shape.
- ``dynamic``: ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear`` (weights
  int8, activations quantized on the fly): no calibration, the natural choice for ViTs,
  whose compute is Linear layers. Refused for a trunk with no Linear layer (ResNet,
  EfficientNet): it would change nothing.
- ``weight_only``: int8 weights with one scale per output channel (symmetric), dequantized
  to float at load: the stored trunk is about a quarter of the size, it runs no faster.
- ``float16`` / ``bfloat16``: the network cast to that dtype for GPU serving; inputs are
  cast in, taps come back as float32.

Why FX graph mode (``torch.ao.quantization.quantize_fx``, ``get_default_qconfig_mapping("x86")``):
it gives fbgemm / oneDNN int8 convolution and Linear kernels in plain eager PyTorch on a
CPU, with no compiler. PT2E (``prepare_pt2e``) has moved to torchao and needs
``torch.compile`` / inductor to turn its graphs into int8 kernels; torchao itself mostly
targets Linear layers of transformers on GPUs. ``torch.ao.quantization`` is deprecated in
this torch (2.14) but still ships and works: its deprecation and observer warnings are
silenced around our own calls only (:func:`quiet`), since each unit repeats them hundreds
of times and the user cannot act on them.

int8 networks run on the CPU whatever device the trunk is moved to (quantized kernels
exist only there): the serving network is kept out of ``nn.Module`` registration, inputs
go to the CPU and taps come back to the input's device.

Persistence: safetensors only, no pickle. Quantized tensors are flattened into plain
tensors (``<key>::int_repr``, ``::scale``, ``::zero_point``), with qscheme, axis and dtype
in the file's metadata; tuples (packed Linear params) and ``torch.dtype`` entries are
flattened too. ``trunk.json`` carries the recipe under ``reduction``; loading rebuilds the
float architecture, the same prepare/convert structure, loads the stored state and checks
the trunk_id.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from trunk.files import atomic_write, write_json_atomic
from trunk.model import SPEC_FILE, WEIGHTS_FILE, Trunk, TrunkError, state_dict_digest

SCHEMES = ("static", "dynamic", "weight_only", "float16", "bfloat16")
INT8_SCHEMES = ("static", "dynamic")  # quantized kernels: CPU only
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
BACKEND = "x86"  # torch's x86 int8 engine: fbgemm and oneDNN kernels
LAYOUT_KEY = "layout"
MODEL, SERVING = "model", "serving"
SEP = "::"

# Warnings torch.ao.quantization repeats per unit or per observer, that a user cannot act on.
_QUIET_MESSAGES = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
    r"must run observer before calling calculate_qparams",
    r".*_get_default_qconfig_dict",
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation and observer warnings around our own calls."""
    with warnings.catch_warnings():
        for message in _QUIET_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.ao\..*")
        yield


# -- static units per family -------------------------------------------------------------------
# Model class -> groups of module names run as one unit each, besides the feature_info modules.
# A group's modules run one after the other in the model's forward; the first is replaced by the
# quantized unit and the others by nn.Identity. A feature_info module inside a group is covered.
_EXTRA_UNITS: dict[type, tuple[tuple[str, ...], ...]] = {
    timm.models.resnet.ResNet: (("conv1", "bn1", "act1"),),
    timm.models.convnext.ConvNeXt: (("stem",),),
    timm.models.efficientnet.EfficientNet: (("conv_stem", "bn1"), ("conv_head", "bn2")),
}
# Families static int8 refuses, and why: ViT blocks quantize (FX traces them) but int8 activations
# around LayerNorm, softmax and GELU lose too much (pooled cosine 0.61 vs fp32 on test_vit).
_STATIC_REFUSED: dict[type, str] = {
    timm.models.vision_transformer.VisionTransformer: "its int8 LayerNorm/softmax activations lose too much; "
                                                      "use dynamic (int8 Linear layers, the natural choice for ViTs)",
}


def _family(model: nn.Module) -> str:
    return type(model).__name__


def static_units(model: nn.Module) -> list[tuple[str, ...]]:
    """The module-name groups static quantization turns into FX units, in network order.

    Raises:
        TrunkError: the model's family has no unit list here.
    """
    why = next((why for cls, why in _STATIC_REFUSED.items() if isinstance(model, cls)), None)
    if why is not None:
        raise TrunkError(f"static int8 quantization is refused for {_family(model)} trunks: {why}")
    extra = next((groups for cls, groups in _EXTRA_UNITS.items() if isinstance(model, cls)), None)
    if extra is None:
        families = ", ".join(c.__name__ for c in _EXTRA_UNITS)
        raise TrunkError(f"static int8 quantization supports {families} trunks, not {_family(model)}; "
                         f"use dynamic (Linear layers), weight_only or float16")
    covered = {name for group in extra for name in group}
    stages = [(info["module"],) for info in model.feature_info if info["module"] not in covered]
    return [*extra[:1], *stages, *extra[1:]]


class QuantUnit(nn.Module):
    """One FX-converted unit between float tensors; stands in for the first module of its group."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise TrunkError("a statically quantized ViT block takes no attention mask")
        return self.graph(x)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _unit_inputs(model: nn.Module, units: Sequence[tuple[str, ...]], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each unit's first module sees on a real forward of ``x`` (the FX example inputs)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(group[0]).register_forward_pre_hook(
        lambda _m, args, name=group[0]: seen.setdefault(name, args[0].detach())) for group in units]
    try:
        with torch.no_grad():
            model.forward_head(model.forward_features(x), pre_logits=True)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _prepared_static(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[tuple[str, ...]]]:
    """A copy of ``model`` whose units are FX-prepared (observers in place), and the unit list."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    units = static_units(model)
    inputs = _unit_inputs(model, units, example)
    serving = copy.deepcopy(model).eval()
    mapping = get_default_qconfig_mapping(BACKEND)
    for group in units:
        unit = nn.Sequential(*(copy.deepcopy(model.get_submodule(n)) for n in group)).eval()
        try:
            prepared = prepare_fx(unit, mapping, (inputs[group[0]],))
        except Exception as e:  # FX tracing fails in many exception types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TrunkError(f"static int8: cannot trace '{'+'.join(group)}' of {_family(model)} with FX "
                             f"({type(e).__name__}: {first}); use dynamic or weight_only") from None
        _set_module(serving, group[0], QuantUnit(prepared))
        for name in group[1:]:
            _set_module(serving, name, nn.Identity())
    return serving, units


def _convert_static(serving: nn.Module, units: Sequence[tuple[str, ...]]) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    for group in units:
        unit = serving.get_submodule(group[0])
        unit.graph = convert_fx(unit.graph)
    return serving


def _dynamic(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise TrunkError(f"dynamic int8 quantizes Linear layers only and {_family(model)} has none; use static "
                         f"(int8 convolutions) or weight_only")
    return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


# -- weight_only ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Weight:
    """A weight as int8 with one float32 scale per output channel (symmetric: no zero point)."""

    q: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def of(cls, w: torch.Tensor) -> Int8Weight:
        flat = w.detach().float().reshape(w.shape[0], -1)
        scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(w.shape)
        return cls(q.contiguous(), scale.contiguous())

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scale.reshape(-1, *([1] * (self.q.ndim - 1)))


def _weight_only_state(model: nn.Module) -> dict[str, Any]:
    """The model's state with every conv and Linear weight as :class:`Int8Weight`."""
    keys = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}
    return {k: Int8Weight.of(v) if k in keys else v.detach().cpu() for k, v in model.state_dict().items()}


def _dequantized(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.dequantized() if isinstance(v, Int8Weight) else v for k, v in state.items()}


# -- flat storage -----------------------------------------------------------------------------
def flatten_state(state: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plain tensors and a JSON layout for a state dict holding quantized tensors, tuples and dtypes.

    Returns:
        ``(tensors, layout)``: ``tensors`` maps ``<prefix><key>`` (or ``<prefix><key>::<part>``)
        to plain contiguous CPU tensors; ``layout`` maps each key of ``state`` to how to
        rebuild its value (:func:`unflatten_state`) under ``entries``, and the module
        versions of ``state._metadata`` under ``versions``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, value: Any) -> Any:
        if isinstance(value, Int8Weight):
            tensors[key + SEP + "int8"], tensors[key + SEP + "scale"] = value.q, value.scale
            return {"kind": "int8_weight"}
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            if not t.is_quantized:
                tensors[key] = t.contiguous()
                return "t"
            tensors[key + SEP + "int_repr"] = t.int_repr().contiguous()
            dtype = str(t.dtype).removeprefix("torch.")
            if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                tensors[key + SEP + "scale"] = torch.tensor([t.q_scale()], dtype=torch.float64)
                tensors[key + SEP + "zero_point"] = torch.tensor([t.q_zero_point()], dtype=torch.int64)
                return {"kind": "qtensor", "qscheme": "per_tensor", "dtype": dtype}
            if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                tensors[key + SEP + "scale"] = t.q_per_channel_scales().contiguous()
                tensors[key + SEP + "zero_point"] = t.q_per_channel_zero_points().contiguous()
                return {"kind": "qtensor", "qscheme": "per_channel", "axis": int(t.q_per_channel_axis()),
                        "dtype": dtype}
            raise TrunkError(f"state entry '{key}': quantization scheme {t.qscheme()} cannot be stored")
        if isinstance(value, (tuple, list)):
            return {"kind": "tuple", "items": [put(f"{key}{SEP}{i}", v) for i, v in enumerate(value)]}
        if value is None:
            return {"kind": "none"}
        if isinstance(value, torch.dtype):
            return {"kind": "dtype", "value": str(value).removeprefix("torch.")}
        if isinstance(value, (bool, int, float, str)):
            return {"kind": "value", "value": value}
        raise TrunkError(f"state entry '{key}' of type {type(value).__name__} cannot be stored")

    # Module versions (state_dict()._metadata): quantized modules read their state by version.
    versions = {k: int(v["version"]) for k, v in (getattr(state, "_metadata", None) or {}).items()
                if isinstance(v, dict) and isinstance(v.get("version"), int)}
    return tensors, {"entries": {k: put(prefix + k, v) for k, v in state.items()}, "versions": versions}


_QDTYPES = {"qint8": torch.qint8, "quint8": torch.quint8, "qint32": torch.qint32}
_DTYPES = {"qint8": torch.qint8, "quint8": torch.quint8, "qint32": torch.qint32, "float16": torch.float16,
           "float32": torch.float32, "bfloat16": torch.bfloat16}


def unflatten_state(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any], prefix: str = "",
                    source: str = "state") -> dict[str, Any]:
    """The inverse of :func:`flatten_state`; a one-line TrunkError naming ``source`` on anything amiss."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise TrunkError(f"{source}: tensor '{key}' is missing")
        used.add(key)
        return tensors[key]

    def get(key: str, desc: Any) -> Any:
        if desc == "t":
            return take(key)
        kind = desc.get("kind") if isinstance(desc, dict) else None
        if kind == "int8_weight":
            return Int8Weight(take(key + SEP + "int8"), take(key + SEP + "scale"))
        if kind == "qtensor":
            q, scale, zp = take(key + SEP + "int_repr"), take(key + SEP + "scale"), take(key + SEP + "zero_point")
            if desc.get("qscheme") == "per_tensor":
                out = torch._make_per_tensor_quantized_tensor(q, float(scale[0]), int(zp[0]))
            elif desc.get("qscheme") == "per_channel":
                out = torch._make_per_channel_quantized_tensor(q, scale, zp, int(desc["axis"]))
            else:
                raise TrunkError(f"{source}: entry '{key}' has unknown qscheme {desc.get('qscheme')!r}")
            if _QDTYPES.get(desc.get("dtype")) != out.dtype:
                raise TrunkError(f"{source}: entry '{key}' says dtype {desc.get('dtype')} but its int_repr "
                                 f"gives {out.dtype}")
            return out
        if kind == "tuple":
            return tuple(get(f"{key}{SEP}{i}", d) for i, d in enumerate(desc["items"]))
        if kind == "none":
            return None
        if kind == "dtype":
            if desc.get("value") not in _DTYPES:
                raise TrunkError(f"{source}: entry '{key}' names unknown dtype {desc.get('value')!r}")
            return _DTYPES[desc["value"]]
        if kind == "value" and isinstance(desc.get("value"), (bool, int, float, str)):
            return desc["value"]
        raise TrunkError(f"{source}: entry '{key}' has an unknown layout {desc!r}")

    entries, versions = layout.get("entries"), layout.get("versions", {})
    if not isinstance(entries, dict) or not isinstance(versions, dict):
        raise TrunkError(f"{source}: its layout needs mappings 'entries' and 'versions'")
    state = OrderedDict((k, get(prefix + k, d)) for k, d in entries.items())
    state._metadata = OrderedDict((k, {"version": int(v)}) for k, v in versions.items())  # type: ignore[attr-defined]
    extra = sorted(k for k in tensors if k.startswith(prefix) and k not in used)
    if extra:
        raise TrunkError(f"{source}: {len(extra)} tensors not in the layout (e.g. '{extra[0]}')")
    return state


def flat_digest(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any]) -> str:
    return hashlib.sha256((state_dict_digest(tensors) + json.dumps(layout, sort_keys=True)).encode()).hexdigest()


# -- the quantized trunk ----------------------------------------------------------------------
def _check_engine() -> None:
    if BACKEND not in torch.backends.quantized.supported_engines:
        raise TrunkError(f"this torch build has no '{BACKEND}' int8 engine "
                         f"(has: {', '.join(torch.backends.quantized.supported_engines)}); use weight_only or float16")
    torch.backends.quantized.engine = BACKEND


class QuantizedTrunk(Trunk):
    """A trunk whose ``forward`` runs a quantized (or 16-bit) copy of its float network.

    Built by :func:`quantize_trunk` or :meth:`trunk.model.Trunk.load`; not by hand.

    Args:
        model_name, data_config, model_kwargs: the float architecture (as :class:`Trunk`).
        state_dict: the float reference weights (``weight_only``: with :class:`Int8Weight`
            entries, dequantized here).
        reduction: the recipe: ``scheme``, ``backend``, ``source_trunk_id``,
            ``calibration_images`` (and ``units`` for static, ``dtype`` for 16-bit).
        calibration: static only, when quantizing: preprocessed images ``(N, 3, H, W)``.
        serving_state: when loading (int8 schemes): the stored serving state.
        batch_size: calibration batch size.
    """

    def __init__(self, model_name: str, *, data_config: Mapping[str, Any], model_kwargs: Mapping[str, Any] | None,
                 state_dict: Mapping[str, Any], reduction: Mapping[str, Any],
                 calibration: torch.Tensor | None = None, serving_state: Mapping[str, Any] | None = None,
                 batch_size: int = 32) -> None:
        scheme = reduction.get("scheme")
        if scheme not in SCHEMES:
            raise TrunkError(f"field 'reduction.scheme': {scheme!r} is not one of {', '.join(SCHEMES)}")
        packed = dict(state_dict) if scheme == "weight_only" else None
        float_state = _dequantized(state_dict) if packed is not None else dict(state_dict)
        super().__init__(model_name, data_config=data_config, model_kwargs=model_kwargs, state_dict=float_state)
        self.reduction = dict(reduction)
        self.scheme = scheme
        self._packed = packed
        self.__dict__["_int8"] = None  # int8 network: not a registered submodule, so .to(cuda) leaves it on the CPU
        if scheme in FLOAT_DTYPES:
            self.serving = copy.deepcopy(self.model).to(FLOAT_DTYPES[scheme]).eval()
        elif scheme in INT8_SCHEMES:
            _check_engine()
            self.__dict__["_int8"] = self._build_int8(calibration, serving_state, batch_size)
        self.trunk_id = self._compute_id()

    # -- building -----------------------------------------------------------------------------
    def _build_int8(self, calibration: torch.Tensor | None, stored: Mapping[str, Any] | None,
                    batch_size: int) -> nn.Module:
        model = self.model.cpu().eval()
        with quiet(), torch.no_grad():
            if self.scheme == "dynamic":
                serving = _dynamic(model)
            else:
                example = torch.zeros(1, *self.data_config["input_size"])
                serving, units = _prepared_static(model, example)
                if stored is None:
                    if calibration is None or len(calibration) == 0:
                        raise TrunkError("static int8 quantization needs calibration images")
                    for start in range(0, len(calibration), batch_size):
                        serving.forward_features(calibration[start:start + batch_size].float().cpu())
                else:  # structure only: the stored state replaces whatever these observers saw
                    serving.forward_features(example)
                serving = _convert_static(serving, units)
            if stored is not None:
                try:
                    serving.load_state_dict(stored, strict=True)
                except (RuntimeError, KeyError, ValueError, TypeError) as e:
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise TrunkError(f"stored {self.scheme} int8 state does not fit '{self.model_name}': "
                                     f"{first[:300]}") from None
        return serving.eval()

    # -- what is stored, and the id -----------------------------------------------------------
    def stored_groups(self) -> dict[str, Mapping[str, Any]]:
        """``{group: state}`` as saved: the float reference (weight_only: its int8 form), the int8 serving state."""
        groups: dict[str, Mapping[str, Any]] = {
            MODEL: self._packed if self._packed is not None else
            {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}
        if self._int8 is not None:
            groups[SERVING] = self._int8.state_dict()
        return groups

    def _flat(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, layout = {}, {}
        for group, state in self.stored_groups().items():
            t, lay = flatten_state(state, prefix=f"{group}.")
            tensors.update(t)
            layout[group] = lay
        return tensors, layout

    def _compute_id(self) -> str:
        if not hasattr(self, "reduction"):  # Trunk.__init__, before the serving network exists
            return super()._compute_id()
        h = hashlib.sha256()
        h.update(json.dumps({"model": self.model_name, "kwargs": self.model_kwargs, "data": self.data_config,
                             "reduction": self.reduction}, sort_keys=True, default=str).encode())
        h.update(flat_digest(*self._flat()).encode())
        if self.scheme in FLOAT_DTYPES:  # derived from the float weights, but what forward runs: part of the id
            h.update(state_dict_digest(self.serving.state_dict()).encode())
        return h.hexdigest()[:16]

    # -- serving ------------------------------------------------------------------------------
    def serving_model(self) -> nn.Module:
        if self._int8 is not None:
            return self._int8
        return self.serving if self.scheme in FLOAT_DTYPES else self.model

    def forward(self, x: torch.Tensor, taps: Sequence[str] = ("pooled",)) -> dict[str, torch.Tensor]:
        """As :meth:`Trunk.forward`; taps are float32 on the input's device whatever the serving dtype."""
        if self._int8 is not None:
            out = super().forward(x.detach().to("cpu", torch.float32), taps)
            return {k: v.to(x.device) for k, v in out.items()}
        if self.scheme in FLOAT_DTYPES:
            out = super().forward(x.to(FLOAT_DTYPES[self.scheme]), taps)
            return {k: v.float() for k, v in out.items()}
        return super().forward(x, taps)

    def serving_weight_bytes(self) -> int:
        """Bytes of the weights ``forward`` runs with (int8 values 1 byte each, with their scales)."""
        if self._int8 is not None:
            tensors, _ = flatten_state(self._int8.state_dict())
        else:
            tensors = dict(self.serving_model().state_dict())
        return int(sum(t.numel() * t.element_size() for t in tensors.values()))

    def stored_weight_bytes(self) -> int:
        """Bytes of every tensor the saved trunk holds (the float reference included)."""
        return int(sum(t.numel() * t.element_size() for t in self._flat()[0].values()))

    # -- persistence --------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "reduction": self.reduction}

    def save(self, directory: str | Path) -> Path:
        """``trunk.safetensors`` (plain tensors, layout in its metadata) and ``trunk.json`` with the recipe."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, layout = self._flat()
        blob = safetensors_save(tensors, metadata={"trunk_id": self.trunk_id, LAYOUT_KEY: json.dumps(layout)})
        atomic_write(directory / WEIGHTS_FILE, lambda f: f.write(blob))
        write_json_atomic(directory / SPEC_FILE, self.spec(), indent=2)
        return directory


def load_quantized(directory: str | Path, spec: Mapping[str, Any]) -> QuantizedTrunk:
    """Rebuild a trunk saved by :meth:`QuantizedTrunk.save` (``spec``: its ``trunk.json``); checks its trunk_id."""
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    spec_path = directory / SPEC_FILE
    reduction = spec.get("reduction")
    if not isinstance(reduction, dict):
        raise TrunkError(f"{spec_path}: field 'reduction' must be a mapping")
    if not path.is_file():
        raise TrunkError(f"trunk weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise TrunkError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        layout = json.loads(metadata.get(LAYOUT_KEY, ""))
    except json.JSONDecodeError:
        raise TrunkError(f"{path}: metadata '{LAYOUT_KEY}' is missing or not JSON") from None
    if not isinstance(layout, dict) or MODEL not in layout:
        raise TrunkError(f"{path}: metadata '{LAYOUT_KEY}' has no '{MODEL}' group")
    unknown = set(layout) - {MODEL, SERVING}
    if unknown:
        raise TrunkError(f"{path}: metadata '{LAYOUT_KEY}' has unknown groups {sorted(unknown)}")
    groups = {g: unflatten_state({k: v for k, v in tensors.items() if k.startswith(g + ".")}, layout[g],
                                 prefix=g + ".", source=str(path)) for g in layout}
    stray = sorted(k for k in tensors if k.split(".", 1)[0] not in layout)
    if stray:
        raise TrunkError(f"{path}: tensor '{stray[0]}' belongs to no group")
    trunk = QuantizedTrunk(spec["model_name"], data_config=spec.get("data_config") or {},
                           model_kwargs=spec.get("model_kwargs"), state_dict=groups[MODEL], reduction=reduction,
                           serving_state=groups.get(SERVING))
    if spec.get("trunk_id") != trunk.trunk_id:
        raise TrunkError(f"{spec_path}: field 'trunk_id' says {spec.get('trunk_id')} but the weights hash to "
                         f"{trunk.trunk_id}")
    return trunk


def quantize_trunk(trunk: Trunk, scheme: str, *, calibration: torch.Tensor | None = None,
                   batch_size: int = 32) -> QuantizedTrunk:
    """A quantized copy of ``trunk``; the trunk itself is left as it was.

    Args:
        trunk: a plain (float) trunk.
        scheme: one of :data:`SCHEMES`.
        calibration: ``static``: preprocessed images ``(N, 3, H, W)`` (the trunk's data
            config) to calibrate activation ranges on; ignored by the other schemes.
        batch_size: calibration batch size.

    Raises:
        TrunkError: an unknown scheme, an already reduced trunk, a family/scheme pair that
            cannot work (one line naming both and what to use instead), or static with no images.
    """
    if scheme not in SCHEMES:
        raise TrunkError(f"unknown quantization scheme '{scheme}'; valid: {', '.join(SCHEMES)}")
    if isinstance(trunk, QuantizedTrunk):
        raise TrunkError(f"trunk {trunk.trunk_id} is already reduced ({trunk.scheme}); quantize its source trunk "
                         f"{trunk.reduction.get('source_trunk_id')}")
    try:  # a family/scheme pair that cannot work is refused before any image is read
        if scheme == "static":
            static_units(trunk.model)
        if scheme == "dynamic" and not any(isinstance(m, nn.Linear) for m in trunk.model.modules()):
            _dynamic(trunk.model)  # raises, saying what to use instead
    except TrunkError as e:
        raise TrunkError(f"trunk '{trunk.model_name}': {e}") from None
    images = 0
    if scheme == "static":
        if calibration is None or len(calibration) == 0:
            raise TrunkError(f"static int8 quantization of '{trunk.model_name}' needs calibration images")
        if calibration.ndim != 4 or tuple(calibration.shape[1:]) != tuple(trunk.data_config["input_size"]):
            raise TrunkError(f"calibration images must be (N, {', '.join(map(str, trunk.data_config['input_size']))}), "
                             f"got {tuple(calibration.shape)}")
        images = int(len(calibration))
    reduction: dict[str, Any] = {"scheme": scheme, "source_trunk_id": trunk.trunk_id, "calibration_images": images,
                                 "backend": BACKEND if scheme in INT8_SCHEMES else None}
    if scheme == "static":
        reduction["units"] = ["+".join(g) for g in static_units(trunk.model)]
    if scheme in FLOAT_DTYPES:
        reduction["dtype"] = scheme
    float_model = copy.deepcopy(trunk.model).cpu().float().eval()
    state: Mapping[str, Any] = (_weight_only_state(float_model) if scheme == "weight_only" else
                                {k: v.detach().cpu() for k, v in float_model.state_dict().items()})
    return QuantizedTrunk(trunk.model_name, data_config=trunk.data_config, model_kwargs=trunk.model_kwargs,
                          state_dict=state, reduction=reduction, calibration=calibration, batch_size=batch_size)

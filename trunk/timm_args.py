"""Which ``timm.create_model`` arguments a stored head may carry: an explicit allowlist.

A branch head rebuilds its copy of the trunk's layers with
``timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)``, and
both values come from the head's ``head.json``, i.e. from an artifact store. Many of
``create_model``'s arguments are not architecture at all: ``checkpoint_path`` makes timm
``torch.load`` any file, ``pretrained`` / ``pretrained_cfg`` / ``pretrained_cfg_overlay``
fetch or read weights, ``cache_dir`` points at a folder, and a model name like
``local-dir:/some/folder`` or ``hf-hub:org/repo`` reads a config from disk or the network.
So only the architecture arguments listed here, each with the JSON type it may have, ever
reach timm; a key not listed is refused before timm is called, with its field named.

The list covers the families branch heads support (ResNet, ConvNeXt, EfficientNet,
VisionTransformer). Arguments that take classes or callables (``block``, ``block_fn``,
``embed_layer``, ``se_layer``, ...) are left out on purpose: a JSON file cannot hold one,
and string stand-ins are what an attacker would try. A trunk whose ``model_kwargs`` use a
key outside the list cannot have branch heads until the key is added here (with a test).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

# Registered timm model names, optionally with a pretrained tag (``resnet50.a1_in1k``);
# never a source prefix (``hf-hub:``, ``local-dir:``) or a path.
_MODEL_NAME = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)?$")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= 64


def _is_ints(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and 0 < len(v) <= 64 and all(_is_int(x) for x in v)


def _int_or_ints(v: Any) -> bool:
    return _is_int(v) or _is_ints(v)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# key -> (check, what the check accepts, for messages)
INT, FLOAT, BOOL, STR = (_is_int, "an integer"), (_is_float, "a number"), (_is_bool, "true/false"), (_is_str, "a short string")
INTS, INT_OR_INTS = (_is_ints, "a list of integers"), (_int_or_ints, "an integer or a list of integers")
OPT_FLOAT, OPT_BOOL = (_optional(_is_float), "a number or null"), (_optional(_is_bool), "true/false or null")

TIMM_MODEL_KWARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # shared by the families
    "in_chans": INT, "img_size": INT_OR_INTS, "output_stride": INT, "global_pool": STR,
    "drop_rate": FLOAT, "drop_path_rate": FLOAT,
    # looked up by name in timm's own tables (get_act_layer / get_norm_layer), nothing imported
    "act_layer": STR, "norm_layer": STR,
    # ResNet
    "layers": INTS, "channels": INTS, "cardinality": INT, "base_width": INT, "stem_width": INT,
    "stem_type": STR, "replace_stem_pool": BOOL, "block_reduce_first": INT, "down_kernel_size": INT,
    "avg_down": BOOL, "drop_block_rate": FLOAT, "zero_init_last": BOOL,
    # ConvNeXt
    "depths": INTS, "dims": INTS, "kernel_sizes": INT_OR_INTS, "ls_init_value": OPT_FLOAT,
    "patch_size": INT_OR_INTS, "head_init_scale": FLOAT, "head_norm_first": BOOL, "conv_mlp": BOOL,
    "conv_bias": BOOL, "use_grn": BOOL, "norm_eps": OPT_FLOAT,
    # EfficientNet
    "channel_multiplier": FLOAT, "depth_multiplier": FLOAT, "num_features": INT, "stem_size": INT,
    "stem_kernel_size": INT, "fix_stem": BOOL, "pad_type": STR,
    # VisionTransformer
    "embed_dim": INT, "depth": INT, "num_heads": INT, "mlp_ratio": FLOAT, "qkv_bias": BOOL, "qk_norm": BOOL,
    "proj_bias": BOOL, "init_values": OPT_FLOAT, "class_token": BOOL, "pos_embed": STR, "no_embed_class": BOOL,
    "reg_tokens": INT, "pre_norm": BOOL, "final_norm": BOOL, "fc_norm": OPT_BOOL, "pool_include_prefix": BOOL,
    "dynamic_img_size": BOOL, "dynamic_img_pad": BOOL, "pos_drop_rate": FLOAT, "patch_drop_rate": FLOAT,
    "proj_drop_rate": FLOAT, "attn_drop_rate": FLOAT, "weight_init": STR, "fix_init": BOOL,
}


class TimmArgumentError(ValueError):
    """A timm model name or argument a stored head may not carry.

    Attributes:
        field: the dotted field, e.g. ``model_kwargs.checkpoint_path``.
        reason: why, in a few words.
    """

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"field '{field_name}': {reason}")
        self.field = field_name
        self.reason = reason


def check_model_name(model_name: Any, field_name: str = "model_name") -> str:
    """``model_name`` if it names a model in timm's registry (no source prefix, no path)."""
    import timm  # here, not at import: the allowlist itself needs no torch

    if not isinstance(model_name, str) or not _MODEL_NAME.match(model_name):
        raise TimmArgumentError(field_name, f"{model_name!r} is not a timm model name "
                                            f"(registered names only; no 'hf-hub:'/'local-dir:' prefix or path)")
    if not timm.is_model(model_name):
        raise TimmArgumentError(field_name, f"'{model_name}' is not a model in timm's registry")
    return model_name


def check_model_kwargs(model_kwargs: Any, field_name: str = "model_kwargs") -> dict[str, Any]:
    """``model_kwargs`` as a dict if every key is an allowed architecture argument of the right type.

    Raises:
        TimmArgumentError: not a mapping, a key outside :data:`TIMM_MODEL_KWARGS` (e.g.
            ``checkpoint_path``, ``pretrained``, ``pretrained_cfg_overlay``), or a value of
            another type; the message names the key.
    """
    if not isinstance(model_kwargs, Mapping):
        raise TimmArgumentError(field_name, f"must be a mapping, got {type(model_kwargs).__name__}")
    for key, value in model_kwargs.items():
        if key not in TIMM_MODEL_KWARGS:
            raise TimmArgumentError(f"{field_name}.{key}", "not an architecture argument the platform passes "
                                                           "to timm.create_model (see trunk/timm_args.py)")
        check, kind = TIMM_MODEL_KWARGS[key]
        if not check(value):
            raise TimmArgumentError(f"{field_name}.{key}", f"must be {kind}, got {value!r:.60}")
    return dict(model_kwargs)

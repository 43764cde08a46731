"""Resolving a config's ``_target_`` to an allowed class without running anything.

Configs written by other teams are untrusted. Hydra's ``instantiate`` imports whatever
module a ``_target_`` names and calls whatever it finds there, and honours ``_args_``,
``_partial_`` and friends; checking the *result's* type afterwards is too late (the call
has already happened). Here a target is resolved by walking module ``__dict__`` entries
from an already-imported package the caller names (never ``importlib`` on the config's
string, never a module ``__getattr__`` hook), every step must stay inside that package,
and the object found must be a class the caller's predicate accepts. Only then is anything
called, and only with keyword arguments.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

TARGET_KEY = "_target_"
_DOTTED = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*$")


class TargetError(ValueError):
    """A ``_target_`` (or another ``_`` key) a config may not use.

    Attributes:
        field: the dotted config field, e.g. ``augment[0].transforms[1]._target_``.
        reason: why, in a few words.
    """

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"field '{field_name}': {reason}")
        self.field = field_name
        self.reason = reason


def resolve_allowed_class(target: Any, package: ModuleType, allowed: Callable[[type], bool], where: str,
                          hint: str = "") -> type:
    """The class ``target`` names inside ``package``, if ``allowed`` accepts it; nothing is called.

    Args:
        target: the ``_target_`` value, e.g. ``"albumentations.HorizontalFlip"``.
        package: the imported package the target must live in (its first dotted part).
        allowed: the allowlist, as a predicate on the resolved class.
        where: the field, for messages.
        hint: appended to refusals (what would be allowed).

    Raises:
        TargetError: a non-string, a private name, a step outside ``package``, a missing
            name, something that is not a class, or a class ``allowed`` refuses.
    """
    suffix = f"; {hint}" if hint else ""
    if not isinstance(target, str) or not _DOTTED.match(target):
        raise TargetError(where, f"{target!r} is not an allowed class (a dotted name){suffix}")
    root, *parts = target.split(".")
    if root != package.__name__ or not parts:
        raise TargetError(where, f"'{target}' is not an allowed class: outside {package.__name__}{suffix}")
    obj: Any = package
    walked = root
    for part in parts:
        # Only modules of the package itself may be walked through: `albumentations.os` is
        # the standard library's os, reached through albumentations' own `import os`.
        if not isinstance(obj, ModuleType) or not (obj.__name__ == root or obj.__name__.startswith(root + ".")):
            what = f"is the module '{obj.__name__}', not part of {root}" if isinstance(obj, ModuleType) \
                else f"is not a module of {root}"
            raise TargetError(where, f"'{target}' is not an allowed class: {walked} {what}{suffix}")
        # vars(), not getattr(): a module-level __getattr__ (lazy imports) must not run.
        if part not in vars(obj):
            raise TargetError(where, f"'{target}' is not an allowed class: {walked} has no '{part}'{suffix}")
        obj = vars(obj)[part]
        walked = f"{walked}.{part}"
    if isinstance(obj, ModuleType):
        module_kind = f"the module '{obj.__name__}'"
        raise TargetError(where, f"'{target}' is not an allowed class: it is {module_kind}{suffix}")
    if not isinstance(obj, type):
        raise TargetError(where, f"'{target}' is not an allowed class: it is a {type(obj).__name__}{suffix}")
    if not allowed(obj):
        raise TargetError(where, f"'{target}' is not an allowed class{suffix}")
    return obj


def check_private_keys(node: Any, where: str, allow: tuple[str, ...] = (TARGET_KEY,)) -> None:
    """Refuse ``_args_``, ``_partial_``, ``_recursive_``, ``_convert_`` and any other ``_`` key, at any depth.

    Args:
        node: a plain config value (dicts, lists, scalars).
        where: the field ``node`` sits at.
        allow: ``_`` keys the caller's schema knows.
    """
    if isinstance(node, Mapping):
        for key, value in node.items():
            field_name = f"{where}.{key}"
            if not isinstance(key, str):
                raise TargetError(field_name, f"keys must be strings, got {type(key).__name__}")
            if key.startswith("_") and key not in allow:
                raise TargetError(field_name, f"'{key}' is not allowed here; give keyword arguments only")
            check_private_keys(value, field_name, allow)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_private_keys(value, f"{where}[{i}]", allow)


def build(node: Any, resolve: Callable[[Any, str], type], where: str) -> Any:
    """Build a checked config value: every mapping with a ``_target_`` becomes ``cls(**kwargs)``.

    Call only after the whole value passed :func:`check_private_keys` and every target
    passed ``resolve`` (so that a refusal deep inside comes before any call). Nested
    values are built first, as Hydra's recursive instantiation does.
    """
    if isinstance(node, Mapping):
        kwargs = {k: build(v, resolve, f"{where}.{k}") for k, v in node.items() if k != TARGET_KEY}
        if TARGET_KEY in node:
            return resolve(node[TARGET_KEY], f"{where}.{TARGET_KEY}")(**kwargs)
        return kwargs
    if isinstance(node, (list, tuple)):
        return [build(v, resolve, f"{where}[{i}]") for i, v in enumerate(node)]
    return node


def targets(node: Any, where: str):
    """Every ``(field, target)`` in a plain config value, outermost first."""
    if isinstance(node, Mapping):
        if TARGET_KEY in node:
            yield f"{where}.{TARGET_KEY}", node[TARGET_KEY]
        for key, value in node.items():
            if key != TARGET_KEY:
                yield from targets(value, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from targets(value, f"{where}[{i}]")

"""A release's heads in one file pair: ``heads.safetensors`` plus ``heads.json``.

A release model holds every head's two files (``head.safetensors``, ``head.json``) byte for
byte as a head version registered them, so that the sha256 recorded at registration can be
checked on the release's own copy, and each head is rebuilt by the very code that loads a
head version (:func:`heads.store.load_head`):

- ``heads.safetensors``: one ``uint8`` tensor per head, ``<head>/head.safetensors``, holding
  that file's bytes (a safetensors file inside a safetensors file: nothing is unpickled at
  either level);
- ``heads.json``: ``{"format": 1, "heads": {name: {"version", "tap", "trunk_id",
  "weights_sha256", "spec_sha256", "spec"}}}``, ``spec`` being the head's ``head.json`` text.

Two files whatever the head count, so a release moves through a tracking server in a
constant number of requests. Their own sha256 is recorded by whoever points at the pack
(``serving.json``, ``release.json``), and checked before either is parsed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from heads.store import SPEC_FILE, SPEC_SHA256, WEIGHTS_FILE, WEIGHTS_SHA256, LoadedHead, load_head, sha256_bytes
from trunk.files import atomic_write, write_json_atomic

PACK_INDEX = "heads.json"
PACK_WEIGHTS = "heads.safetensors"
PACK_FILES = (PACK_INDEX, PACK_WEIGHTS)
PACK_FORMAT = 1


class PackError(ValueError):
    """A heads pack cannot be read; the message is one line naming the file and the field."""


@dataclass(frozen=True)
class PackedHead:
    """One head's two files as registered, with what the release records about it.

    Attributes:
        name: the head.
        version: its ``head.<name>`` version (None: not from the registry).
        tap: the trunk tap it reads.
        trunk_id: the trunk it was trained on.
        weights: ``head.safetensors``, byte for byte.
        spec: ``head.json``, byte for byte.
    """

    name: str
    version: int | None
    tap: str | None
    trunk_id: str | None
    weights: bytes
    spec: bytes

    def digests(self) -> dict[str, str]:
        """``{"weights_sha256", "spec_sha256"}`` of the two files (the registry's tags for them)."""
        return {WEIGHTS_SHA256: sha256_bytes(self.weights), SPEC_SHA256: sha256_bytes(self.spec)}

    def load(self, *, expected: Mapping[str, str] | None, label: str) -> LoadedHead:
        """Rebuild the head with :func:`heads.store.load_head`: both files checked against
        ``expected`` before either is parsed, nothing unpickled."""
        with tempfile.TemporaryDirectory(prefix="packed-head-") as tmp:
            (Path(tmp) / WEIGHTS_FILE).write_bytes(self.weights)
            (Path(tmp) / SPEC_FILE).write_bytes(self.spec)
            return load_head(tmp, expected=expected, label=label)


@dataclass(frozen=True)
class PackSource:
    """Where an existing release keeps its pack, for building the next release from it.

    Attributes:
        uri: the artifact folder holding ``heads.json`` and ``heads.safetensors``.
        files: their sha256 (``{file name: sha256}``).
        heads: ``{head name: version}`` the pack holds, as the release's manifest says.
        label: what to call it in messages (``release v7``).
        recorded_in: where ``files`` was read (``release.json``).
    """

    uri: str
    files: Mapping[str, str]
    heads: Mapping[str, int]
    label: str
    recorded_in: str = "release.json"


def _key(name: str) -> str:
    return f"{name}/{WEIGHTS_FILE}"


def write_pack(folder: str | Path, heads: Mapping[str, PackedHead]) -> dict[str, str]:
    """Write ``heads.json`` and ``heads.safetensors`` for ``heads`` into ``folder``.

    Returns:
        ``{"heads.json": sha256, "heads.safetensors": sha256}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"format": PACK_FORMAT, "heads": {
        name: {"version": h.version, "tap": h.tap, "trunk_id": h.trunk_id, **h.digests(),
               "spec": h.spec.decode("utf-8")} for name, h in sorted(heads.items())}}
    blob = save_safetensors({_key(name): np.frombuffer(h.weights, dtype=np.uint8) for name, h in heads.items()},
                            metadata={"format": str(PACK_FORMAT)})
    atomic_write(folder / PACK_WEIGHTS, lambda f: f.write(blob))
    write_json_atomic(folder / PACK_INDEX, index, indent=1, sort_keys=True)
    return {PACK_INDEX: sha256_bytes((folder / PACK_INDEX).read_bytes()), PACK_WEIGHTS: sha256_bytes(blob)}


def _read_checked(path: Path, shown: str, expected: str | None, recorded_in: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PackError(f"{shown}: no such file") from None
    if expected is not None and sha256_bytes(data) != expected:
        raise PackError(f"{shown} does not match the sha256 in {recorded_in} (tampered or corrupt)")
    return data


def read_pack(folder: str | Path, *, expected: Mapping[str, str] | None, recorded_in: str = "serving.json",
              label: str | None = None) -> dict[str, PackedHead]:
    """The heads of the pack in ``folder``; both files are checked against ``expected``
    (``{file name: sha256}``, as :func:`write_pack` returned) before either is parsed.

    Each head's own files are not checked here: the caller compares them with the hashes it
    trusts (the registry's, or its manifest's) in :meth:`PackedHead.load`.

    Args:
        folder: holds ``heads.json`` and ``heads.safetensors``.
        expected: their sha256; None: unchecked (the caller checks every head's files).
        recorded_in: where ``expected`` comes from, for messages.
        label: what to call the pack in messages (``release v7``) instead of its files' paths.

    Raises:
        PackError: a file is missing, does not match its sha256, or is not what
            :func:`write_pack` writes (one line naming the file and the field).
    """
    folder = Path(folder)
    expected = dict(expected) if expected is not None else {}
    where = f"{label}: {PACK_INDEX}" if label else str(folder / PACK_INDEX)
    weights_where = f"{label}: {PACK_WEIGHTS}" if label else str(folder / PACK_WEIGHTS)
    index_bytes = _read_checked(folder / PACK_INDEX, where, expected.get(PACK_INDEX), recorded_in)
    weights_bytes = _read_checked(folder / PACK_WEIGHTS, weights_where, expected.get(PACK_WEIGHTS), recorded_in)
    try:
        index = json.loads(index_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PackError(f"{where}: not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
    if not isinstance(index, dict) or index.get("format") != PACK_FORMAT:
        raise PackError(f"{where}: field 'format' is {index.get('format') if isinstance(index, dict) else None!r}, "
                        f"not {PACK_FORMAT}")
    entries = index.get("heads")
    if not isinstance(entries, dict):
        raise PackError(f"{where}: field 'heads' must be a mapping of head name to entry")
    try:
        tensors = load_safetensors(weights_bytes)
    except SafetensorError as e:
        raise PackError(f"{weights_where}: not a safetensors file ({str(e).splitlines()[0]}); "
                        f"nothing was unpickled") from None
    extra = sorted(set(tensors) - {_key(n) for n in entries})
    if extra:
        raise PackError(f"{weights_where}: tensor '{extra[0]}' belongs to no head in {PACK_INDEX}")
    return {name: _packed(name, entry, tensors.get(_key(name)), where, weights_where)
            for name, entry in entries.items()}


def _packed(name: str, entry: Any, tensor: Any, where: str, weights_where: str) -> PackedHead:
    if not isinstance(entry, dict):
        raise PackError(f"{where}: field 'heads.{name}' must be a mapping")
    version = entry.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise PackError(f"{where}: field 'heads.{name}.version' must be an integer")
    for key in ("spec", WEIGHTS_SHA256, SPEC_SHA256):
        if not isinstance(entry.get(key), str):
            raise PackError(f"{where}: field 'heads.{name}.{key}' is missing")
    if tensor is None:
        raise PackError(f"{weights_where}: tensor '{_key(name)}' is missing")
    if tensor.dtype != np.uint8 or tensor.ndim != 1:
        raise PackError(f"{weights_where}: tensor '{_key(name)}' must be 1-D uint8 (a file's bytes)")
    return PackedHead(name=name, version=version, tap=entry.get("tap"), trunk_id=entry.get("trunk_id"),
                      weights=tensor.tobytes(), spec=entry["spec"].encode("utf-8"))


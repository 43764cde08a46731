"""Small verified files: named tensors plus a JSON body in one safetensors file, with a digest.

The platform keeps several small records beside its models: what a trunk trained on
(:mod:`trunk.seen`), what a head version remembers for monitoring
(:mod:`heads.monitor.reference`) and what a bulk run saw (:mod:`heads.monitor.stats`).
Each is written and read here, one way: safetensors (no pickles), a ``format`` name, a
JSON ``body``, and a ``digest`` over the tensors and the body. Reading refuses a file of
another format, or one whose contents no longer hash to its digest, or to the digest a
caller (the registry's tag) says was recorded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from trunk.files import atomic_write


class RecordError(ValueError):
    """A record that cannot be read, is of another format, or was altered."""


def tensor_digest(tensors: Mapping[str, torch.Tensor], text: str = "") -> str:
    """16 hex digits over named tensors (name, dtype, shape, bytes) and a text."""
    h = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def record_bytes(fmt: str, tensors: Mapping[str, torch.Tensor], body: str = "") -> bytes:
    """The bytes of a record: ``tensors`` with ``format``, ``body`` and ``digest`` in the metadata."""
    header = {"format": fmt, "body": body, "digest": tensor_digest(tensors, body)}
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)


def write_record(path: str | Path, fmt: str, tensors: Mapping[str, torch.Tensor], body: str = "") -> Path:
    """Write a record atomically (:func:`trunk.files.atomic_write`); returns ``path``."""
    path = Path(path)
    blob = record_bytes(fmt, tensors, body)
    atomic_write(path, lambda f: f.write(blob))
    return path


def read_record(path: str | Path, fmt: str, what: str, expected_digest: str | None = None,
                error: type[Exception] = RecordError) -> tuple[dict[str, torch.Tensor], str, str]:
    """``(tensors, body, digest)`` of a record written by :func:`write_record`, verified.

    Args:
        path: the file.
        fmt: the format it must have.
        what: how to name it in an error ("a head reference").
        expected_digest: the digest recorded elsewhere (a registry tag); None: only its own.
        error: the exception class to raise (a caller's own subclass of ValueError).

    Raises:
        ``error``: unreadable, another format, or altered.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise error(f"{path}: cannot be read as {what}: {e}") from None
    if header.get("format") != fmt:
        raise error(f"{path}: not {what} (format {header.get('format')!r})")
    body = header.get("body", "")
    digest = tensor_digest(tensors, body)
    if digest != header.get("digest"):
        raise error(f"{path}: contents do not match the digest in its metadata; the file was altered")
    if expected_digest is not None and digest != expected_digest:
        raise error(f"{path}: has digest {digest}, but {expected_digest} was recorded; the file was altered or "
                    f"replaced")
    return tensors, body, digest

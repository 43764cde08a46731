"""A lock with a lease, built only on what every MLflow store guarantees atomically.

MLflow has no compare-and-swap for aliases, and a tracking server offers no lock. What
every store does guarantee is that versions of one registered model get unique,
increasing numbers: the SQLAlchemy store behind both a local ``sqlite:///`` store and a
``mlflow server`` inserts ``max(version) + 1`` under the primary key ``(name, version)``
inside one transaction and retries on an integrity error, keeps deleted versions as
rows (so a number is never handed out twice), and commits before the call returns.

So the lock is a ticket queue on the registered model ``release.lock``:

1. a contender creates a version of it: its **ticket**, tagged ``holder``
   (``host:pid:start``) and ``expires_at`` (its lease end, Unix seconds);
2. the lowest live ticket holds the lock; every other contender polls until each ticket
   below its own is gone. A ticket below ours is reaped (deleted) when its lease has
   expired, or at once when its holder ran on this host and that process is gone
   (SIGKILL, OOM), so a crashed promoter blocks the others for at most one lease;
3. the holder releases by deleting its ticket.

A ticket can never appear below one already seen (it would need a number already
handed out), so two contenders can never both see themselves lowest. Waiting contenders
renew their lease, and the holder renews it when it gets the lock, so only a contender
that stops responding loses its place. Before it acts, the holder checks with
:meth:`Lease.check` that its ticket still exists and its lease has a margin left; the
lease therefore assumes the promoters' clocks agree to well within that margin (NTP).

Settings: ``VTP_PROMOTION_LEASE_S`` (default 60 s) and ``VTP_PROMOTION_WAIT_S`` (how long
to queue before giving up, default 600 s), or the ``lease_s`` / ``wait_s`` arguments.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry.store.tracking import RegistryError, ensure_registered_model, is_not_found

log = logging.getLogger(__name__)

LOCK_MODEL = "release.lock"
LEASE_ENV = "VTP_PROMOTION_LEASE_S"
WAIT_ENV = "VTP_PROMOTION_WAIT_S"
DEFAULT_LEASE_S = 60.0
DEFAULT_WAIT_S = 600.0
POLL_S = 0.05
# A ticket is a registry entry, not a model: its source names nothing to load.
TICKET_SOURCE = "lock:/release"
HOLDER, EXPIRES_AT, PURPOSE = "holder", "expires_at", "purpose"


class LeaseError(RegistryError):
    """The lock could not be taken in time, or its lease was lost; nothing was changed under it."""


def _setting(env: str, given: float | None, default: float) -> float:
    if given is not None:
        return float(given)
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise LeaseError(f"environment variable {env}: '{raw}' is not a number of seconds") from None
    if value <= 0:
        raise LeaseError(f"environment variable {env}: must be more than 0 seconds, got {raw}")
    return value


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not mistaken for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def holder_id() -> str:
    """``host:pid:start`` of this process."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or '-'}"


def _gone(holder: str) -> bool:
    """True when ``holder`` names a process on this host that no longer runs (or is a zombie)."""
    try:
        host, pid_s, start = holder.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False  # another machine: only its lease can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    if _state(pid) == "Z":  # killed, not yet waited for by its parent
        return True
    now = _start_ticks(pid)
    return start != "-" and now is not None and now != start


@dataclass
class Reaped:
    """A ticket removed because its holder was gone or its lease had expired."""

    ticket: int
    holder: str
    why: str


@dataclass
class Lease:
    """A held (or queued) ticket of :data:`LOCK_MODEL`.

    Attributes:
        client: the registry.
        ticket: this contender's version of ``release.lock``.
        lease_s: how long a lease lasts from its last renewal.
        expires_at: the lease's end, Unix seconds (this host's clock).
        reaped: tickets this contender removed while queueing.
        waited_s: how long it queued.
    """

    client: MlflowClient
    ticket: int
    lease_s: float
    expires_at: float
    reaped: list[Reaped] = field(default_factory=list)
    waited_s: float = 0.0

    def renew(self) -> None:
        expires = time.time() + self.lease_s
        self.client.set_model_version_tag(LOCK_MODEL, str(self.ticket), EXPIRES_AT, f"{expires:.3f}")
        self.expires_at = expires

    def check(self) -> None:
        """Raise :class:`LeaseError` unless this ticket still exists and its lease has a margin left.

        The margin is a tenth of the lease (at least 0.5 s): what the one write that follows
        may take.
        """
        margin = max(0.5, self.lease_s / 10)
        left = self.expires_at - time.time()
        if left < margin:
            raise LeaseError(f"the promotion lock's lease (ticket {LOCK_MODEL} v{self.ticket}) has {left:.1f}s left, "
                             f"under the {margin:.1f}s margin; nothing was changed, try again")
        if not _exists(self.client, self.ticket):
            raise LeaseError(f"the promotion lock's ticket {LOCK_MODEL} v{self.ticket} was reaped by another "
                             f"promoter (lease thought expired); nothing was changed, try again")


def _exists(client: MlflowClient, ticket: int) -> bool:
    try:
        client.get_model_version(LOCK_MODEL, str(ticket))
    except MlflowException as e:
        if is_not_found(e):
            return False
        raise
    return True


def tickets(client: MlflowClient) -> list[Any]:
    """Every live ticket of ``release.lock``, lowest first."""
    found: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name='{LOCK_MODEL}'", page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda mv: int(mv.version))


def _why_dead(mv: Any, now: float, default_lease_s: float) -> str | None:
    holder = mv.tags.get(HOLDER, "")
    if holder and _gone(holder):
        return f"its process {holder} is gone"
    try:
        expires = float(mv.tags[EXPIRES_AT])
    except (KeyError, ValueError):
        expires = int(mv.creation_timestamp) / 1000 + default_lease_s
    if now > expires:
        return f"its lease expired {now - expires:.1f}s ago"
    return None


def _reap(client: MlflowClient, mv: Any, why: str) -> Reaped:
    log.warning("promotion lock: removing ticket %s v%s of %s: %s", LOCK_MODEL, mv.version,
                mv.tags.get(HOLDER, "?"), why)
    with contextlib.suppress(MlflowException):  # another contender may have removed it first
        client.delete_model_version(LOCK_MODEL, str(mv.version))
    return Reaped(int(mv.version), mv.tags.get(HOLDER, ""), why)


def _take_ticket(client: MlflowClient, lease_s: float, purpose: str) -> Lease:
    expires = time.time() + lease_s
    mv = client.create_model_version(LOCK_MODEL, source=TICKET_SOURCE,
                                     tags={HOLDER: holder_id(), EXPIRES_AT: f"{expires:.3f}", PURPOSE: purpose[:200]})
    return Lease(client, int(mv.version), lease_s, expires)


@contextlib.contextmanager
def hold(client: MlflowClient, *, purpose: str = "", lease_s: float | None = None,
         wait_s: float | None = None) -> Iterator[Lease]:
    """Hold the promotion lock for the duration of the ``with`` block.

    Args:
        client: the registry (a local store or a tracking server).
        purpose: stored on the ticket, so the UI shows who holds or waits.
        lease_s: the lease; default ``VTP_PROMOTION_LEASE_S`` or 60 s.
        wait_s: how long to queue; default ``VTP_PROMOTION_WAIT_S`` or 600 s.

    Yields:
        The held :class:`Lease`; call :meth:`Lease.check` just before each write that
        must happen under the lock.

    Raises:
        LeaseError: the lock was not free within ``wait_s``.
    """
    lease_s = _setting(LEASE_ENV, lease_s, DEFAULT_LEASE_S)
    wait_s = _setting(WAIT_ENV, wait_s, DEFAULT_WAIT_S)
    ensure_registered_model(client, LOCK_MODEL, "Promotion lock: one version per contender; the lowest live "
                                                "version holds it (registry.store.lease).")
    started = time.monotonic()
    lease = _take_ticket(client, lease_s, purpose)
    try:
        reaped: list[Reaped] = []
        while True:
            now = time.time()
            live = tickets(client)
            if not any(int(mv.version) == lease.ticket for mv in live):
                # Reaped while queueing (this process stalled past its lease): queue again.
                log.warning("promotion lock: ticket v%s was reaped while waiting; taking a new one", lease.ticket)
                lease = _take_ticket(client, lease_s, purpose)
                continue
            blockers = []
            for mv in live:
                if int(mv.version) >= lease.ticket:
                    break
                why = _why_dead(mv, now, lease_s)
                if why:
                    reaped.append(_reap(client, mv, why))
                else:
                    blockers.append(mv)
            if not blockers:
                break
            if time.monotonic() - started > wait_s:
                first = blockers[0]
                raise LeaseError(f"waited {wait_s:g}s for the promotion lock; ticket {LOCK_MODEL} v{first.version} "
                                 f"({first.tags.get(HOLDER, '?')}, {first.tags.get(PURPOSE, '')}) still holds it")
            if lease.expires_at - now < lease_s / 2:
                lease.renew()
            time.sleep(POLL_S * (1 + random.random()))
        lease.reaped, lease.waited_s = reaped, time.monotonic() - started
        if lease.expires_at - time.time() < 0.75 * lease_s:
            lease.renew()  # the holder's work starts with most of a lease ahead of it
        yield lease
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_model_version(LOCK_MODEL, str(lease.ticket))

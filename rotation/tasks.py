"""Celery tasks: thin, id-taking callers of ``rotation.services``.

All are idempotent and ``acks_late`` with ``reject_on_worker_lost`` (see settings),
so a task whose worker dies is redelivered and simply continues from the database;
partitions also carry a lease, held in the task's name across its retries, that another
worker or the sweep takes over when it runs out (``rotation.engine.leases``).

When a provider or the database is down, a task retries first and records the pause
second: the retry never depends on a database write, and a pause the database could
not take is handed to the next attempt, which records it once the database is back.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from celery import shared_task
from django.db import DatabaseError, InterfaceError, OperationalError
from django.utils import timezone

from keyvault.kms import ProviderUnavailable
from keyvault.secrets import SecretSourceUnavailable
from rotation import services

log = logging.getLogger(__name__)

#: Exponential backoff while a provider is down: 2, 4, 8 … seconds, at most this long between tries.
MAX_BACKOFF_SECONDS = 300
#: Errors after which a task retries instead of failing: the run stays where it is.
TRANSIENT = (ProviderUnavailable, SecretSourceUnavailable, OperationalError, InterfaceError)


def _backoff(retries: int, exc: BaseException | None = None) -> int:
    """2, 4, 8 … seconds, at least what a throttling provider asked for, at most MAX_BACKOFF_SECONDS."""
    wanted = max(2 ** (retries + 1), int(getattr(exc, "retry_after", 0) or 0))
    return min(wanted, MAX_BACKOFF_SECONDS)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _record_pause(run_id: int, reason: str, **where) -> bool:
    """Write the pause on the run; False when the database cannot take it now."""
    try:
        services.mark_paused(run_id, reason, **where)
    except DatabaseError as exc:
        log.warning("run #%s: could not record the pause yet (%s); a later attempt will", run_id, _first_line(exc))
        return False
    return True


def _record_late_pause(run_id: int, paused: dict | None) -> dict | None:
    """Record a pause an earlier attempt could not write; returns it again while the database still refuses."""
    if not paused:
        return None
    try:
        services.note_pause(run_id, paused["reason"], at=datetime.fromisoformat(paused["at"]))
    except DatabaseError:
        return paused
    return None


def _retry(task, run_id: int, exc: BaseException, *, carried: dict | None = None, **where):
    """Send the retry, carrying the pause if the database refused it (the first one, with its time)."""
    countdown = _backoff(task.request.retries, exc)
    what = "database" if isinstance(exc, DatabaseError) else "provider"
    reason = f"{what} unavailable, retrying in {countdown} s: {_first_line(exc)}"
    now = timezone.now()
    if _record_pause(run_id, reason, retry_at=now + timedelta(seconds=countdown), **where):
        carried = None
    else:
        carried = carried or {"reason": reason, "at": now.isoformat()}
    kwargs = {**(task.request.kwargs or {}), "paused": carried}
    return task.retry(exc=exc, countdown=countdown, kwargs=kwargs, throw=False)


@shared_task(name="rotation.dispatch_due_rotations", ignore_result=True)
def dispatch_due_rotations() -> int:
    """Every minute (beat): start due runs, recover lost work, retire, destroy due KEKs."""
    return len(services.dispatch_due_rotations(now=timezone.now()))


@shared_task(name="rotation.recover", ignore_result=True)
def recover() -> dict:
    """Every few seconds (beat): send the outbox, take over expired leases, re-send stalled runs."""
    try:
        return services.recover(now=timezone.now())
    except (OperationalError, InterfaceError) as exc:  # the database is down: nothing to recover until it is back
        log.warning("recovery sweep skipped: database unavailable (%s)", _first_line(exc))
        return {}


@shared_task(name="rotation.execute_run", bind=True, ignore_result=True, max_retries=None)
def execute_run(self, run_id: int, paused: dict | None = None) -> str:
    """Advance one run by one phase."""
    paused = _record_late_pause(run_id, paused)
    try:
        return services.execute_run(run_id, now=timezone.now())
    except TRANSIENT as exc:
        raise _retry(self, run_id, exc, carried=paused) from None


@shared_task(name="rotation.rewrap_partition", bind=True, ignore_result=True, max_retries=None)
def rewrap_partition(self, run_id: int, partition_id: int, legacy_hi: int | None = None,
                     paused: dict | None = None) -> int:
    """Rewrap one leased partition of the run (and any other nobody holds)."""
    if legacy_hi is not None:
        return 0  # (run, lo, hi) from before partitions were leased rows: the sweep re-sends the run's rewrap
    paused = _record_late_pause(run_id, paused)
    try:
        return services.rewrap_partition(run_id, partition_id, task_id=self.request.id)
    except TRANSIENT as exc:
        raise _retry(self, run_id, exc, carried=paused, partition_id=partition_id, task_id=self.request.id) from None


@shared_task(name="rotation.flag_expiring_secrets", ignore_result=True)
def flag_expiring_secrets() -> int:
    """Daily (beat): audit and notify managed secrets that expire soon, are overdue or failed."""
    return len(services.flag_expiring_secrets(now=timezone.now()))


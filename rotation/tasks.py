"""Celery tasks: thin, id-taking callers of ``rotation.services``.

All are idempotent and ``acks_late`` with ``reject_on_worker_lost`` (see settings),
so a task whose worker dies is redelivered and simply continues from the database.
"""

from __future__ import annotations

from celery import shared_task
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from keyvault.kms import ProviderUnavailable
from keyvault.secrets import SecretSourceUnavailable
from rotation import services

#: Exponential backoff while a provider is down: 2, 4, 8 … seconds, at most this long between tries.
MAX_BACKOFF_SECONDS = 300


def _backoff(retries: int) -> int:
    return min(2 ** (retries + 1), MAX_BACKOFF_SECONDS)


@shared_task(name="rotation.dispatch_due_rotations", ignore_result=True)
def dispatch_due_rotations() -> int:
    """Every minute (beat): start due runs, resume stalled ones, retire, destroy due KEKs."""
    return len(services.dispatch_due_rotations(now=timezone.now()))


@shared_task(name="rotation.execute_run", bind=True, ignore_result=True, max_retries=None)
def execute_run(self, run_id: int) -> str:
    """Advance one run by one phase."""
    try:
        return services.execute_run(run_id, now=timezone.now())
    except (ProviderUnavailable, SecretSourceUnavailable, OperationalError, InterfaceError) as exc:
        services.mark_paused(run_id, f"provider unavailable, retrying: {exc}")
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from None


@shared_task(name="rotation.rewrap_partition", bind=True, ignore_result=True, max_retries=None)
def rewrap_partition(self, run_id: int, lo: int, hi: int) -> int:
    """Rewrap the run's remaining data keys with ids in [lo, hi)."""
    try:
        return services.rewrap_partition(run_id, lo, hi)
    except (ProviderUnavailable, OperationalError, InterfaceError) as exc:
        services.mark_paused(run_id, f"provider unavailable, retrying: {exc}")
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from None


@shared_task(name="rotation.flag_expiring_secrets", ignore_result=True)
def flag_expiring_secrets() -> int:
    """Daily (beat): audit and notify managed secrets that expire soon, are overdue or failed."""
    return len(services.flag_expiring_secrets(now=timezone.now()))

"""Celery tasks of the keyvault app: thin callers of ``keyvault.audit`` and ``keyvault.access.security``."""

from __future__ import annotations

from celery import shared_task

from keyvault import audit
from keyvault.access import security


@shared_task(name="keyvault.audit_checkpoint", ignore_result=True)
def audit_checkpoint() -> int | None:
    """Every ``AUDIT_CHECKPOINT_SECONDS`` (beat): sign the chain head if it moved; the sequence signed, if any."""
    cp = audit.checkpoint_if_moved()
    return cp.sequence if cp else None


@shared_task(name="keyvault.flush_login_failure_summaries", ignore_result=True)
def flush_login_failure_summaries() -> int:
    """Every minute (beat): audit the counted failed logins and API refusals of finished minutes; how many summaries."""
    return security.flush_failure_summaries()

"""Celery tasks of the keyvault app: thin callers of ``keyvault.audit``."""

from __future__ import annotations

from celery import shared_task

from keyvault import audit


@shared_task(name="keyvault.audit_checkpoint", ignore_result=True)
def audit_checkpoint() -> int | None:
    """Every ``AUDIT_CHECKPOINT_SECONDS`` (beat): sign the chain head if it moved; the sequence signed, if any."""
    cp = audit.checkpoint_if_moved()
    return cp.sequence if cp else None

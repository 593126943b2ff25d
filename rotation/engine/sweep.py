"""The minute's periodic job (Celery beat): start due runs, recover lost work, retire, flag expiring secrets.

Due dates live on our own policies, never in per-key beat rows.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from keyvault.audit import Actor, events
from keyvault.exceptions import KeyvaultError
from keyvault.keys import services as key_services
from keyvault.kms import KMSError
from keyvault.models import KeyEncryptionKey, ManagedSecret
from rotation.engine.dispatch import dispatcher
from rotation.engine.drivers.secret import check_secret_config, notify_secret
from rotation.engine.policies import ensure_policy
from rotation.engine.recovery import recover
from rotation.engine.runs import start_run
from rotation.exceptions import RunAlreadyActive, SecretConfigError
from rotation.models import RotationPolicy, RotationRun, format_period

log = logging.getLogger(__name__)
Run = RotationRun
S = RotationRun.State
BEAT = Actor.system("beat")

#: A secret needing attention is reported at most once within this time.
FLAG_INTERVAL = timedelta(hours=20)


def dispatch_due_rotations(*, now: datetime | None = None) -> list[RotationRun]:
    """The minute's job: start due runs, recover lost work (:func:`recover`), retire, destroy due KEKs."""
    now = now or timezone.now()
    for kek in KeyEncryptionKey.objects.filter(state=KeyEncryptionKey.State.ENABLED, rotation_policy__isnull=True):
        ensure_policy(kek)
    started = _start_due(due_policies(now), now)
    started.extend(_start_due(due_secret_policies(now), now))
    recover(now=now)  # beat also runs it on its own, every few seconds; ``rotation sweep`` relies on this call
    for run in RotationRun.objects.filter(state=S.RETIRING, retire_after__lte=now):
        dispatcher("execute_run", run.pk)
    key_services.destroy_due_keks(now=now, actor=BEAT)
    return started


def _start_due(policies: list[RotationPolicy], now: datetime) -> list[RotationRun]:
    started = []
    for policy in policies:
        target = {"kek": policy.kek} if policy.kek_id else {"secret": policy.secret}
        try:
            started.append(start_run(**target, actor=BEAT, kind=Run.Kind.PLANNED, reason=_due_reason(policy, now)))
        except RunAlreadyActive:
            continue
        except KeyvaultError as exc:
            what = policy.kek.name if policy.kek_id else f"secret {policy.secret.name}"
            log.warning("could not start planned rotation of %s: %s", what, exc)
    return started


def due_policies(now: datetime) -> list[RotationPolicy]:
    """Automatic policies of enabled KEKs that are due by date or usage and inside their window."""
    candidates = (
        RotationPolicy.objects.select_related("kek")
        .filter(auto=True, kek__state=KeyEncryptionKey.State.ENABLED)
        .exclude(kek__rotation_runs__state__in=Run.BLOCKING_STATES)
    )
    due = []
    for policy in candidates.filter(Q(next_due_at__lte=now) | Q(usage_threshold__isnull=False)):
        if not policy.in_window(now):
            continue
        if (policy.next_due_at and policy.next_due_at <= now) or _over_usage(policy):
            due.append(policy)
    return due


def due_secret_policies(now: datetime) -> list[RotationPolicy]:
    """Automatic policies of managed secrets that are due and inside their window."""
    candidates = (RotationPolicy.objects.select_related("secret")
                  .filter(auto=True, secret__isnull=False, next_due_at__lte=now)
                  .exclude(secret__rotation_runs__state__in=Run.BLOCKING_STATES))
    return [policy for policy in candidates if policy.in_window(now)]


def start_due_secret_rotations(*, now: datetime) -> list[RotationRun]:
    """Planned runs for automatic secret policies that are due and inside their window."""
    return _start_due(due_secret_policies(now), now)


def _over_usage(policy: RotationPolicy) -> bool:
    if not policy.usage_threshold:
        return False
    try:
        key_services.refresh_kek(policy.kek)
    except KMSError as exc:
        log.warning("could not read usage of %s: %s", policy.kek.name, exc)
        return False
    primary = policy.kek.versions.filter(is_primary=True).first()
    return bool(primary and primary.encrypt_count >= policy.usage_threshold)


def _due_reason(policy: RotationPolicy, now: datetime) -> str:
    if policy.next_due_at and policy.next_due_at <= now:
        return f"scheduled: due {policy.next_due_at:%Y-%m-%d %H:%M} UTC (every {format_period(policy.period)})"
    return f"usage: primary version passed {policy.usage_threshold} encryptions"


# -- expiry and overdue reminders --------------------------------------------------------


def secrets_needing_attention(now: datetime | None = None) -> list[tuple[ManagedSecret, list[str]]]:
    """Secrets that are expired, expiring within their warning window, overdue for rotation, failed,
    or whose stored configuration no longer validates (their next run would be refused)."""
    now = now or timezone.now()
    found = []
    for secret in ManagedSecret.objects.select_related("rotation_policy").order_by("name"):
        reasons = []
        if secret.expires_at and secret.expires_at <= now:
            reasons.append(f"expired {secret.expires_at:%Y-%m-%d %H:%M} UTC")
        elif secret.expires_at and secret.expires_at - secret.effective_warn_before <= now:
            reasons.append(f"expires {secret.expires_at:%Y-%m-%d %H:%M} UTC (in {(secret.expires_at - now).days} days)")
        policy = getattr(secret, "rotation_policy", None)
        if policy and policy.next_due_at and policy.next_due_at <= now:
            reasons.append(f"rotation overdue since {policy.next_due_at:%Y-%m-%d %H:%M} UTC")
        if secret.status == ManagedSecret.Status.FAILED:
            reasons.append("last rotation failed")
        try:
            check_secret_config(secret)
        except SecretConfigError as exc:
            reasons.append(f"configuration no longer valid: {exc} (manage.py secret change {secret.name})")
        if reasons:
            found.append((secret, reasons))
    return found


def _attention_status(secret: ManagedSecret, now: datetime) -> str:
    if secret.status in (ManagedSecret.Status.FAILED, ManagedSecret.Status.ROTATING):
        return secret.status
    if secret.expires_at and secret.expires_at <= now:
        return ManagedSecret.Status.EXPIRED
    if secret.expires_at and secret.expires_at - secret.effective_warn_before <= now:
        return ManagedSecret.Status.EXPIRING
    policy = getattr(secret, "rotation_policy", None)
    if policy and policy.next_due_at and policy.next_due_at <= now:
        return ManagedSecret.Status.OVERDUE
    return ManagedSecret.Status.ACTIVE


def flag_expiring_secrets(*, now: datetime | None = None) -> list[ManagedSecret]:
    """The daily check: set each secret's status, and audit and notify those needing attention.

    Each secret is reported at most once per day, so running it twice is harmless.
    """
    now = now or timezone.now()
    flagged = []
    attention = dict((secret.pk, reasons) for secret, reasons in secrets_needing_attention(now))
    for secret in ManagedSecret.objects.select_related("rotation_policy"):
        status = _attention_status(secret, now)
        if status != secret.status:
            ManagedSecret.objects.filter(pk=secret.pk).update(status=status)
        reasons = attention.get(secret.pk)
        if not reasons or (secret.last_flagged_at and secret.last_flagged_at > now - FLAG_INTERVAL):
            continue
        with transaction.atomic():
            ManagedSecret.objects.filter(pk=secret.pk).update(last_flagged_at=now)
            events.secret_needs_attention(secret, actor=BEAT, status=status, reasons=reasons)
        notify_secret(secret, f"{secret.name}: {'; '.join(reasons)}",
                      f"Managed secret {secret.name} ({secret.get_secret_type_display()}, owner "
                      f"{secret.owner or 'unassigned'}) needs attention: {'; '.join(reasons)}.",
                      severity="error" if status in ("expired", "failed") else "warning", reasons=reasons)
        flagged.append(secret)
    return flagged

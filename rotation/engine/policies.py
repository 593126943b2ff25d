"""A target's rotation policy — the one place its schedule (period, next due date) is kept.

Created from its driver's defaults, or with the KEK that :func:`create_kek_with_policy`
makes; changed with an audit event.
"""

from __future__ import annotations

from datetime import timedelta

from django.db import transaction

from keyvault.audit import Actor, events
from keyvault.keys import services as key_services
from keyvault.models import KeyEncryptionKey
from rotation.engine.wiring import driver_for_target
from rotation.models import DEFAULT_PERIOD, MIN_PERIOD, RotationPolicy, format_period

#: Policy fields a person may change (console form, ``rotation policy``).
POLICY_FIELDS = (
    "period", "usage_threshold", "window_weekdays", "window_start", "window_end", "auto",
    "approvals_required", "grace_period",
)


def ensure_policy(target) -> RotationPolicy:
    """The policy of ``target`` (a KEK or a managed secret), created from its driver's defaults if it has none."""
    driver = driver_for_target(target)
    lookup = {driver.target_kind: target}
    policy = RotationPolicy.objects.filter(**lookup).first()
    if policy is not None:
        return policy
    policy, _ = RotationPolicy.objects.get_or_create(**lookup, defaults=driver.policy_defaults(target))
    return policy


def policy_of(target) -> RotationPolicy:
    """The policy of ``target``; for one that has none yet, the unsaved policy :func:`ensure_policy` would create.

    For pages and commands that only read (the dashboard, ``kms describe-key``): they show
    the schedule the sweep will keep without writing it.
    """
    driver = driver_for_target(target)
    lookup = {driver.target_kind: target}
    return RotationPolicy.objects.filter(**lookup).first() or RotationPolicy(**lookup, **driver.policy_defaults(target))


def create_kek_with_policy(
    *,
    name: str,
    actor: Actor,
    provider_name: str | None = None,
    description: str = "",
    period: timedelta = DEFAULT_PERIOD,
    max_encryptions_per_version: int | None = None,
) -> KeyEncryptionKey:
    """Create a KEK (through the key services) and its rotation policy, in one transaction.

    The first rotation falls ``period`` after creation. Audited as ``kek.created`` and
    ``rotation.policy_changed`` (the period and the first due date).

    :raises ValueError: a period shorter than the policies' minimum (nothing is created).
    """
    if period < MIN_PERIOD:
        raise ValueError(f"rotation period must be at least {format_period(MIN_PERIOD)}")
    with transaction.atomic():
        kek = key_services.create_kek(name=name, actor=actor, provider_name=provider_name, description=description,
                                      max_encryptions_per_version=max_encryptions_per_version)
        fields = {**driver_for_target(kek).policy_defaults(kek), "period": period,
                  "next_due_at": kek.created_at + period}
        RotationPolicy.objects.create(kek=kek, **fields)
        events.policy_changed(kek, actor=actor, changes={"period": period, "next_due_at": fields["next_due_at"].isoformat()})
    return kek


def update_policy(target, *, actor: Actor, **changes) -> RotationPolicy:
    """Change the rotation policy of ``target``; its next due date follows it."""
    unknown = set(changes) - set(POLICY_FIELDS)
    if unknown:
        raise ValueError(f"unknown policy fields: {sorted(unknown)}")
    driver = driver_for_target(target)
    with transaction.atomic():
        policy = RotationPolicy.objects.select_for_update().get(pk=ensure_policy(target).pk)
        for name, value in changes.items():
            setattr(policy, name, value)
        policy.full_clean(exclude=["kek", "secret"])
        driver.reschedule(target, policy, changes)
        policy.save()
        driver.policy_saved(target, policy, actor=actor)
        events.policy_changed(target, actor=actor, changes=changes)
    return policy

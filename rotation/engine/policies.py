"""A target's rotation policy: created from its driver's defaults, changed with an audit event."""

from __future__ import annotations

from django.db import transaction

from keyvault.audit import Actor, events
from rotation.engine.wiring import driver_for_target
from rotation.models import RotationPolicy

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


def update_policy(target, *, actor: Actor, **changes) -> RotationPolicy:
    """Change the rotation policy of ``target``; its next due date (and a KEK's own schedule) follow it."""
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

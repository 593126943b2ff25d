"""The rotation policy becomes the one owner of a KEK's schedule: carry the KEK's own copy over.

Until now a KEK kept its own period (whole days) and next rotation date beside its
policy's. Keyvault's migration ``0010_kek_schedule_on_policy`` drops the KEK's copy;
this one first makes sure no schedule is lost:

* a KEK without a policy (not destroyed) gets one from its own fields: that period, that
  next date (or a period after its last rotation or creation), its usage limit as the
  usage threshold — what the sweep would have given it;
* a KEK with a policy keeps the policy's schedule, which is the one the sweep obeyed,
  except where the KEK's own is stricter: the console's KEK settings form changed the
  KEK's period without reaching the policy, and an operator who read "rotation period
  30 days" there must not find the key on a yearly schedule. So a shorter KEK period
  (in whole days, the policy's rounded up) and an earlier KEK date win.

Backwards, the KEK's fields are filled from its policy again.
"""

from datetime import timedelta

from django.db import migrations

DAY = timedelta(days=1)
DESTROYED = "destroyed"


def _whole_days(period: timedelta) -> int:
    return max(1, -(-period // DAY))


def _kek_due(kek, period: timedelta):
    return kek.next_rotation_at or (kek.last_rotated_at or kek.created_at) + period


def _stricter(policy, kek) -> dict:
    """The policy fields the KEK's own schedule tightens."""
    changes = {}
    kek_period = timedelta(days=kek.rotation_period_days)
    if kek.rotation_period_days < _whole_days(policy.period):
        changes["period"] = kek_period
    kek_due = _kek_due(kek, kek_period)
    if policy.next_due_at is None or kek_due < policy.next_due_at:
        changes["next_due_at"] = kek_due
    return changes


def schedules_to_policies(apps, schema_editor):
    KeyEncryptionKey = apps.get_model("keyvault", "KeyEncryptionKey")
    RotationPolicy = apps.get_model("rotation", "RotationPolicy")
    policies = {policy.kek_id: policy for policy in RotationPolicy.objects.filter(kek__isnull=False)}
    for kek in KeyEncryptionKey.objects.exclude(state=DESTROYED).order_by("pk"):
        policy = policies.get(kek.pk)
        if policy is None:
            period = timedelta(days=kek.rotation_period_days)
            RotationPolicy.objects.create(kek=kek, period=period, usage_threshold=kek.max_encryptions_per_version,
                                          next_due_at=_kek_due(kek, period))
            continue
        changes = _stricter(policy, kek)
        if changes:
            RotationPolicy.objects.filter(pk=policy.pk).update(**changes)


def policies_to_schedules(apps, schema_editor):
    KeyEncryptionKey = apps.get_model("keyvault", "KeyEncryptionKey")
    RotationPolicy = apps.get_model("rotation", "RotationPolicy")
    for policy in RotationPolicy.objects.filter(kek__isnull=False):
        KeyEncryptionKey.objects.filter(pk=policy.kek_id).update(
            rotation_period_days=_whole_days(policy.period), next_rotation_at=policy.next_due_at)


class Migration(migrations.Migration):

    dependencies = [
        ("keyvault", "0009_totp_device_encrypted"),
        ("rotation", "0004_partition_leases_and_outbox"),
    ]

    operations = [
        migrations.RunPython(schedules_to_policies, policies_to_schedules),
    ]

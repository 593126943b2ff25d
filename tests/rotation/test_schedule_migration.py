"""Migrations rotation 0005 and keyvault 0010: a KEK's own schedule moves onto its rotation policy, none lost.

Each test migrates the test database back to before them, writes rows as the old code
left them (through the historical models), migrates forward to the newest migrations
and reads the policies.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("keyvault", "0009_totp_device_encrypted"), ("rotation", "0004_partition_leases_and_outbox")]
CREATED = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def migrate(targets):
    """Migrate to ``targets``; returns the models as they were there."""
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    executor.loader.build_graph()
    return executor.loader.project_state(targets).apps


def newest():
    return MigrationExecutor(connection).loader.graph.leaf_nodes()


@pytest.fixture
def old_state():
    """The models before the move; the database is back at the newest migrations afterwards, whatever happens."""
    try:
        yield migrate(BEFORE)
    finally:
        migrate(newest())


def old_kek(apps, name, *, days, next_at=None, last_rotated=None, state="enabled", limit=None):
    kek = apps.get_model("keyvault", "KeyEncryptionKey").objects.create(
        name=name, provider="local", provider_key_id=name, state=state, rotation_period_days=days,
        next_rotation_at=next_at, last_rotated_at=last_rotated, max_encryptions_per_version=limit)
    apps.get_model("keyvault", "KeyEncryptionKey").objects.filter(pk=kek.pk).update(created_at=CREATED)
    return kek


def policies_after() -> dict[str, tuple]:
    from rotation.models import RotationPolicy

    return {p.kek.name: (p.period, p.next_due_at, p.usage_threshold)
            for p in RotationPolicy.objects.select_related("kek").filter(kek__isnull=False)}


def test_keks_without_a_policy_get_one_from_their_own_schedule(old_state):
    # given: KEKs the old code left without a policy (the sweep had not reached them, or they were not enabled)
    due = datetime(2026, 3, 1, tzinfo=UTC)
    old_kek(old_state, "scheduled", days=30, next_at=due, limit=5000)
    old_kek(old_state, "undated", days=90, last_rotated=datetime(2026, 2, 1, tzinfo=UTC))
    old_kek(old_state, "never-rotated", days=7)
    old_kek(old_state, "switched-off", days=60, next_at=due, state="disabled")
    old_kek(old_state, "gone", days=60, next_at=due, state="destroyed")

    # when
    migrate(newest())

    # then: each live KEK's policy holds exactly the schedule the KEK held; a destroyed one has none to keep
    assert policies_after() == {
        "scheduled": (timedelta(days=30), due, 5000),
        "undated": (timedelta(days=90), datetime(2026, 5, 2, tzinfo=UTC), None),
        "never-rotated": (timedelta(days=7), CREATED + timedelta(days=7), None),
        "switched-off": (timedelta(days=60), due, None),
    }


def test_existing_policies_keep_their_schedule_unless_the_keks_own_is_stricter(old_state):
    # given: policies beside the KEKs' own copies
    policy_model = old_state.get_model("rotation", "RotationPolicy")
    due = datetime(2026, 6, 1, tzinfo=UTC)
    in_step = old_kek(old_state, "in-step", days=1, next_at=due)  # a 12-hour policy shows as 1 whole day
    policy_model.objects.create(kek_id=in_step.pk, period=timedelta(hours=12), next_due_at=due, approvals_required=1)
    rotated = old_kek(old_state, "rotated-directly", days=90, next_at=due + timedelta(days=40))  # kms rotate-key
    policy_model.objects.create(kek_id=rotated.pk, period=timedelta(days=90), next_due_at=due)
    shortened = old_kek(old_state, "shortened-on-kek-page", days=30, next_at=due - timedelta(days=60))
    policy_model.objects.create(kek_id=shortened.pk, period=timedelta(days=90), next_due_at=due)
    lengthened = old_kek(old_state, "lengthened-on-kek-page", days=730, next_at=due + timedelta(days=365))
    policy_model.objects.create(kek_id=lengthened.pk, period=timedelta(days=365), next_due_at=due)
    undated = old_kek(old_state, "policy-undated", days=365, next_at=due)
    policy_model.objects.create(kek_id=undated.pk, period=timedelta(days=365), next_due_at=None)

    # when
    migrate(newest())

    # then
    assert policies_after() == {
        "in-step": (timedelta(hours=12), due, None),
        "rotated-directly": (timedelta(days=90), due, None),
        "shortened-on-kek-page": (timedelta(days=30), due - timedelta(days=60), None),
        "lengthened-on-kek-page": (timedelta(days=365), due, None),
        "policy-undated": (timedelta(days=365), due, None),
    }
    from rotation.models import RotationPolicy

    assert RotationPolicy.objects.get(kek__name="in-step").approvals_required == 1  # the rest of a policy stays


def test_migrating_back_gives_the_keks_their_schedule_again(old_state):
    # given: a KEK whose schedule now lives on its 12-hour policy only
    due = datetime(2026, 6, 1, tzinfo=UTC)
    old_kek(old_state, "drill", days=1, next_at=due)
    migrate(newest())
    from rotation.models import RotationPolicy

    RotationPolicy.objects.filter(kek__name="drill").update(period=timedelta(hours=36), next_due_at=due)

    # when the two migrations are undone
    apps = migrate(BEFORE)

    # then the KEK's own fields hold the policy's schedule (the period in whole days, rounded up)
    kek = apps.get_model("keyvault", "KeyEncryptionKey").objects.get(name="drill")
    assert (kek.rotation_period_days, kek.next_rotation_at) == (2, due)

"""One schedule: a KEK's period and next due date live on its rotation policy, made with the KEK."""

from datetime import timedelta

import pytest

from keyvault.audit import Actor
from keyvault.keys import services as key_services
from keyvault.models import AuditEvent, KeyEncryptionKey
from keyvault.ops.bootstrap import DEFAULT_KEK, bootstrap
from rotation import services
from rotation.models import RotationPolicy

pytestmark = pytest.mark.django_db
ACTOR = Actor.system("tests")


def trail() -> list[tuple[str, str]]:
    return list(AuditEvent.objects.order_by("sequence").values_list("action", "target_id"))


def test_a_kek_is_created_with_its_policy_in_one_audited_step():
    kek = services.create_kek_with_policy(name="orders", actor=ACTOR, description="order rows",
                                          period=timedelta(days=30), max_encryptions_per_version=5000)

    policy = RotationPolicy.objects.get(kek=kek)
    assert (policy.period, policy.next_due_at, policy.usage_threshold) == (
        timedelta(days=30), kek.created_at + timedelta(days=30), 5000)
    assert trail() == [("kek.created", "orders"), ("rotation.policy_changed", "orders")]
    scheduled = AuditEvent.objects.get(action="rotation.policy_changed")
    assert scheduled.details == {"period": str(timedelta(days=30)), "next_due_at": policy.next_due_at.isoformat()}


def test_a_period_below_the_minimum_creates_nothing():
    with pytest.raises(ValueError, match="at least 1m"):
        services.create_kek_with_policy(name="orders", actor=ACTOR, period=timedelta(seconds=30))

    assert not KeyEncryptionKey.objects.exists() and trail() == []


def test_the_bootstrap_kek_has_its_policy_from_the_start():
    bootstrap(admin_password="correct horse battery staple")

    policy = RotationPolicy.objects.get(kek__name=DEFAULT_KEK)
    assert policy.period == timedelta(days=365) and policy.next_due_at == policy.kek.created_at + policy.period


def test_policy_of_reads_without_writing():
    bare = key_services.create_kek(name="bare", actor=ACTOR)
    kept = services.create_kek_with_policy(name="kept", actor=ACTOR, period=timedelta(hours=12))

    planned, existing = services.policy_of(bare), services.policy_of(kept)

    assert planned.pk is None and (planned.period, planned.next_due_at) == (
        timedelta(days=365), bare.created_at + timedelta(days=365))
    assert existing.pk == RotationPolicy.objects.get(kek=kept).pk and existing.period == timedelta(hours=12)
    assert not RotationPolicy.objects.filter(kek=bare).exists()


def test_a_policy_change_moves_only_the_policy_and_the_kek_usage_limit():
    kek = services.create_kek_with_policy(name="orders", actor=ACTOR)

    policy = services.update_policy(kek, actor=ACTOR, period=timedelta(days=90), usage_threshold=1000)

    kek.refresh_from_db()
    assert policy.next_due_at == kek.created_at + timedelta(days=90)
    assert kek.max_encryptions_per_version == 1000
    assert AuditEvent.objects.filter(action="kek.updated").latest("sequence").details == {
        "max_encryptions_per_version": 1000}

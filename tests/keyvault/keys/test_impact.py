"""What deleting a KEK breaks: data keys per version, encrypted fields, active runs (read from real rows)."""

import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from keyvault.keys import envelopes, services
from keyvault.keys.impact import deletion_impact
from keyvault.models import AuditEvent, KeyEncryptionKey
from rotation.models import RotationRun
from tests.fieldapp.models import Customer, Supplier
from tests.rotation.conftest import seed_data_keys

pytestmark = pytest.mark.django_db


@pytest.fixture
def keys(system_actor):
    """default: 2 data keys on v1, 3 on v2, two customers (fields sealed under it); suppliers: one supplier."""
    envelopes.forget()
    default = services.create_kek(name="default", actor=system_actor)
    suppliers = services.create_kek(name="suppliers", actor=system_actor)
    seed_data_keys(default, 2)
    services.rotate_kek_version(default, actor=system_actor, reason="test")
    seed_data_keys(default, 3)
    Customer.objects.create(name="Ada", national_id="AB-1", photo=b"x")
    Customer.objects.create(name="Bo", national_id="CD-2", photo=None)
    Supplier.objects.create(national_id="S-1")
    return default, suppliers


def test_impact_counts_data_keys_per_version_and_field_values_by_their_headers(keys):
    default, suppliers = keys

    found = deletion_impact(default)

    assert [(v.number, v.primary, v.data_keys) for v in found.versions] == [(1, False, 2), (2, True, 3)]
    assert found.data_keys == 5
    fields = {item.label: (item.values, item.configured) for item in found.fields}
    # Ada: national_id, photo, profile; Bo: national_id, profile (photo NULL)
    assert fields == {"fieldapp.customer.national_id": (2, True), "fieldapp.customer.photo": (1, True),
                      "fieldapp.customer.profile": (2, True), "keyvault.totpdevice.key": (0, True)}
    assert found.field_values == 5 and found.runs == [] and found.managed_secrets == []
    other = deletion_impact(suppliers)
    assert [(item.label, item.values, item.configured) for item in other.fields] == [
        ("fieldapp.supplier.national_id", 1, True)]
    assert other.data_keys == 0 and not other.breaks_nothing


def test_impact_lists_runs_rotating_or_migrating_into_the_key_but_not_finished_ones(keys):
    default, suppliers = keys
    rotating = RotationRun.objects.create(kek=default, state=RotationRun.State.REWRAPPING, initiator="system:test")
    migrating = RotationRun.objects.create(kek=suppliers, destination_kek=default, kind=RotationRun.Kind.MIGRATE,
                                           state=RotationRun.State.QUEUED, initiator="system:test")
    RotationRun.objects.create(kek=default, state=RotationRun.State.COMPLETED, initiator="system:test")

    runs = deletion_impact(default).runs

    assert [(run.run_id, run.role) for run in runs] == [(rotating.pk, "rotates this key"),
                                                        (migrating.pk, "migrates into this key")]


def test_a_key_nothing_uses_breaks_nothing(system_actor):
    lonely = services.create_kek(name="lonely", actor=system_actor)

    found = deletion_impact(lonely)

    assert found.breaks_nothing and found.data_keys == 0 and found.fields == []


def test_schedule_deletion_dry_run_prints_the_impact_and_changes_nothing(keys, capsys):
    default, _ = keys
    events = AuditEvent.objects.count()

    call_command("kms", "schedule-key-deletion", "default", "--dry-run", "--json")

    shown = json.loads(capsys.readouterr().out)
    assert shown["scheduled"] is False and shown["data_keys"] == 5
    assert [v["data_keys"] for v in shown["versions"]] == [2, 3]
    assert {f["label"] for f in shown["encrypted_fields"]} >= {"fieldapp.customer.national_id"}
    default.refresh_from_db()
    assert default.state == KeyEncryptionKey.State.ENABLED and AuditEvent.objects.count() == events


def test_schedule_then_cancel_from_the_cli_leaves_the_key_disabled(keys, capsys):
    _, suppliers = keys

    call_command("kms", "schedule-key-deletion", "suppliers", "--waiting-days", "7")
    out = capsys.readouterr().out
    suppliers.refresh_from_db()
    assert suppliers.state == KeyEncryptionKey.State.PENDING_DELETION
    assert "field fieldapp.supplier.national_id: 1 value(s)" in out and "suppliers is pending deletion on" in out

    call_command("kms", "describe-key", "suppliers")
    assert "unless cancelled (python manage.py kms cancel-key-deletion suppliers" in capsys.readouterr().out

    call_command("kms", "cancel-key-deletion", "suppliers")
    assert "stays disabled" in capsys.readouterr().out
    suppliers.refresh_from_db()
    assert suppliers.state == KeyEncryptionKey.State.DISABLED and suppliers.deletion_date is None
    actions = list(AuditEvent.objects.order_by("-pk").values_list("action", flat=True)[:2])
    assert actions == ["kek.deletion_cancelled", "kek.deletion_scheduled"]

    call_command("kms", "enable-key", "suppliers")
    suppliers.refresh_from_db()
    assert suppliers.state == KeyEncryptionKey.State.ENABLED


def test_schedule_deletion_refuses_a_waiting_period_out_of_range(keys):
    with pytest.raises(CommandError, match="7-30 days"):
        call_command("kms", "schedule-key-deletion", "default", "--waiting-days", "3")
    assert KeyEncryptionKey.objects.get(name="default").state == KeyEncryptionKey.State.ENABLED

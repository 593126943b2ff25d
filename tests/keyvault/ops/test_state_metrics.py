"""Rotation, managed-secret and audit-chain gauges, read from the database at scrape time.

Given rows as the engine leaves them, when Prometheus scrapes ``/metrics``, then the
gauges the alert rules use (``deploy/prometheus/keyvault-alerts.yml``) say exactly what
the database holds.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from keyvault.audit import Action, Actor, record
from keyvault.keys import services as key_services
from keyvault.models import ManagedSecret
from keyvault.ops.metrics import STATE_METRICS
from rotation import services
from rotation.models import RotationPolicy, RotationRun
from tests.audit_owner import as_table_owner

pytestmark = pytest.mark.django_db
ACTOR = Actor.system("tests")
TOKEN = "state-scrape-5d2c"
S = RotationRun.State


def value(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def kek_with_policy(name: str, *, due_in: timedelta):
    kek = key_services.create_kek(name=name, actor=ACTOR)
    services.update_policy(kek, actor=ACTOR)
    RotationPolicy.objects.filter(kek=kek).update(next_due_at=timezone.now() + due_in)
    return kek


def run(kek, state, **fields):
    return RotationRun.objects.create(kek=kek, state=state, initiator="system:beat", **fields)


def test_an_empty_installation_reports_zeros_and_an_intact_chain():
    assert value("keyvault_state_metrics_up") == 1
    for kind in ("kek", "secret"):
        assert value("keyvault_rotation_runs_failed", target_type=kind) == 0
        assert value("keyvault_rotation_runs_paused", target_type=kind) == 0
        assert value("keyvault_rotations_overdue", target_type=kind) == 0
        assert value("keyvault_rotation_overdue_seconds", target_type=kind) == 0
    assert value("keyvault_audit_chain_ok") == 1
    assert value("keyvault_audit_witness_ok") == 1


def test_a_failed_run_counts_until_a_later_run_of_the_same_key():
    # given a KEK whose latest run failed, and another whose failure was followed by a success
    failing = kek_with_policy("failing", due_in=timedelta(days=30))
    recovered = kek_with_policy("recovered", due_in=timedelta(days=30))
    run(failing, S.COMPLETED)
    run(failing, S.FAILED, last_error="ProviderUnavailable")
    run(recovered, S.FAILED)
    run(recovered, S.COMPLETED)

    # then only the open failure counts
    assert value("keyvault_rotation_runs_failed", target_type="kek") == 1


def test_paused_and_waiting_runs_are_counted():
    kek = kek_with_policy("paused", due_in=timedelta(days=30))
    other = kek_with_policy("waiting", due_in=timedelta(days=30))
    run(kek, S.REWRAPPING, paused_reason="provider unavailable: ProviderUnavailable")
    run(other, S.PENDING_APPROVAL, kind=RotationRun.Kind.EMERGENCY, incident_ref="INC-1")

    assert value("keyvault_rotation_runs_paused", target_type="kek") == 1
    assert value("keyvault_rotation_runs_pending_approval", target_type="kek", kind="emergency") == 1


def test_overdue_counts_enabled_keys_without_a_run_under_way():
    # given one KEK a day overdue, one overdue but rotating, one overdue but disabled, one not due
    kek_with_policy("late", due_in=timedelta(days=-1))
    rotating = kek_with_policy("rotating", due_in=timedelta(days=-3))
    run(rotating, S.REWRAPPING)
    disabled = kek_with_policy("disabled", due_in=timedelta(days=-5))
    key_services.disable_kek(disabled, actor=ACTOR)
    kek_with_policy("fine", due_in=timedelta(days=1))

    # then only "late" is overdue, by about a day
    assert value("keyvault_rotations_overdue", target_type="kek") == 1
    assert 86400 <= value("keyvault_rotation_overdue_seconds", target_type="kek") < 86400 + 300


def test_each_managed_secret_with_an_expiry_has_its_timestamp():
    expires = timezone.now().replace(microsecond=0) + timedelta(days=10)
    ManagedSecret.objects.create(name="api-tls", secret_type="tls_certificate", source="file", path="/tls",
                                 expires_at=expires)
    ManagedSecret.objects.create(name="no-expiry", secret_type="generic", source="file", path="/x")

    assert value("keyvault_managed_secret_expiry_timestamp_seconds", secret="api-tls",
                 type="tls_certificate") == expires.timestamp()
    assert value("keyvault_managed_secret_expiry_timestamp_seconds", secret="no-expiry", type="generic") is None


def test_an_edited_audit_event_shows_as_a_broken_chain():
    # given a few events, one edited behind the application's back (as a database owner could)
    for i in range(3):
        record(Action.OTHER, actor=ACTOR, target=("thing", i), details={"i": i})
    with as_table_owner() as cursor:
        cursor.execute("UPDATE keyvault_auditevent SET actor = 'user:mallory' WHERE sequence = 2")

    # then the scrape reports the chain broken
    assert value("keyvault_audit_chain_ok") == 0
    assert value("keyvault_audit_chain_checked_timestamp_seconds") > 0


def scrape(client, settings) -> set[str]:
    settings.METRICS_TOKEN = TOKEN
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    return {family.name for family in text_string_to_metric_families(response.content.decode())}


def test_the_scrape_serves_every_state_series(client, settings):
    ManagedSecret.objects.create(name="api-tls", secret_type="tls_certificate", source="file", path="/tls",
                                 expires_at=timezone.now() + timedelta(days=1))
    run(kek_with_policy("waiting", due_in=timedelta(days=1)), S.PENDING_APPROVAL)

    assert set(STATE_METRICS) <= scrape(client, settings)

"""The rotation engine end to end, driven in-process: rotate, rewrap, verify, retire."""

from datetime import timedelta

import pytest
from django.utils import timezone

from keyvault import audit
from keyvault.keys import services as key_services
from keyvault.audit import Actor
from keyvault.kms import KeyDisabled, ProviderUnavailable, get_provider
from keyvault.models import AuditEvent, DataKey, KeyVersion
from rotation import services
from rotation.exceptions import InvalidRunTransition, RotationError, RunAlreadyActive
from rotation.models import RotationRun, RunStep
from tests.rotation.conftest import seed_data_keys

pytestmark = pytest.mark.django_db
S = RotationRun.State
ACTOR = Actor.system("tests")


def decrypt_all(kek):
    provider = get_provider(kek.provider)
    versions = set()
    for wrapped, context, version in DataKey.objects.filter(kek=kek).values_list("wrapped_key", "encryption_context", "kek_version"):
        opened = provider.decrypt(bytes(wrapped), encryption_context=context)
        assert opened.key_version == version and len(opened.plaintext) == 32
        versions.add(version)
    return versions


@pytest.mark.slow
def test_twenty_thousand_data_keys_move_to_the_new_version(kek, settings):
    settings.ROTATION_BATCH_SIZE = 2000
    seed_data_keys(kek, 20_000)
    plaintexts_before = {
        pk: get_provider().decrypt(bytes(w), encryption_context=c).plaintext
        for pk, w, c in DataKey.objects.filter(pk__in=DataKey.objects.values("pk")[:50]).values_list("pk", "wrapped_key", "encryption_context")
    }

    run = services.start_run(kek=kek, actor=ACTOR, kind="planned", reason="test")
    run = services.drive(run.pk)

    assert run.state == S.RETIRING and run.target_version == 2 and run.previous_version == 1
    assert (run.total_deks, run.rewrapped, run.failed_deks) == (20_000, 20_000, 0)
    assert key_services.version_coverage(kek) == {2: 20_000}
    assert decrypt_all(kek) == {2}
    for pk, plaintext in plaintexts_before.items():
        row = DataKey.objects.get(pk=pk)
        assert get_provider().decrypt(bytes(row.wrapped_key), encryption_context=row.encryption_context).plaintext == plaintext
    assert KeyVersion.objects.get(kek=kek, number=1).state == KeyVersion.State.ENABLED  # grace period

    run = services.drive(run.pk, now=timezone.now() + timedelta(days=7, minutes=1))

    assert run.state == S.COMPLETED
    assert KeyVersion.objects.get(kek=kek, number=1).state == KeyVersion.State.DISABLED
    assert get_provider().describe_key(kek.provider_key_id).version(1).state == "disabled"
    steps = dict(RunStep.objects.filter(run=run, automatic=True).values_list("key", "status"))
    assert set(steps.values()) == {RunStep.Status.DONE}, steps
    assert audit.verify_chain().ok
    batches = AuditEvent.objects.filter(action="rotation.batch").values_list("details", flat=True)
    assert sum(d["rewrapped"] for d in batches) == 20_000
    assert all(d["rewrapped"] <= 2000 for d in batches)


def test_grace_period_keeps_old_version_until_due(kek):
    seed_data_keys(kek, 10)
    run = services.drive(services.start_run(kek=kek, actor=ACTOR).pk)

    assert services.drive(run.pk, now=timezone.now() + timedelta(days=6)).state == S.RETIRING
    assert services.drive(run.pk, now=timezone.now() + timedelta(days=8)).state == S.COMPLETED


def test_run_with_no_data_keys_completes(kek):
    run = services.drive(services.start_run(kek=kek, actor=ACTOR).pk)
    assert run.state == S.RETIRING
    run = services.drive(run.pk, now=timezone.now() + timedelta(days=8))

    assert run.state == S.COMPLETED and run.total_deks == 0 and run.percent == 100.0


def test_emergency_needs_incident_and_disables_old_version_at_once(kek):
    seed_data_keys(kek, 25)
    with pytest.raises(RotationError, match="incident"):
        services.start_run(kek=kek, actor=ACTOR, kind="emergency")

    run = services.start_run(kek=kek, actor=ACTOR, kind="emergency", incident_ref="INC-7", reason="keyring copied")
    run = services.drive(run.pk)

    assert run.state == S.COMPLETED
    assert KeyVersion.objects.get(kek=kek, number=1).state == KeyVersion.State.DISABLED
    assert decrypt_all(kek) == {2}
    started = AuditEvent.objects.get(action="rotation.started")
    assert started.details["incident_ref"] == "INC-7"


def test_only_one_active_run_per_kek(kek):
    first = services.start_run(kek=kek, actor=ACTOR)

    with pytest.raises(RunAlreadyActive) as caught:
        services.start_run(kek=kek, actor=ACTOR)
    assert caught.value.run == first
    assert RotationRun.objects.count() == 1


def test_rewrap_batch_twice_changes_nothing_the_second_time(kek):
    seed_data_keys(kek, 30)
    run = services.start_run(kek=kek, actor=ACTOR)
    services.execute_run(run.pk)  # rotates and leaves the rewrap to (absent) workers
    run.refresh_from_db()
    assert run.state == S.REWRAPPING

    first, _ = services.rewrap_batch(run, after=0, hi=10**9, batch_size=100)
    snapshot = list(DataKey.objects.order_by("pk").values_list("wrapped_key", "kek_version"))
    second, _ = services.rewrap_batch(run, after=0, hi=10**9, batch_size=100)

    assert (first, second) == (30, 0)
    assert list(DataKey.objects.order_by("pk").values_list("wrapped_key", "kek_version")) == snapshot


def test_data_key_that_cannot_be_opened_fails_the_run_and_keeps_old_version(kek):
    keys = seed_data_keys(kek, 5)
    broken = keys.first()
    DataKey.objects.filter(pk=broken.pk).update(encryption_context={"tampered": "yes"})

    run = services.drive(services.start_run(kek=kek, actor=ACTOR).pk)

    assert run.state == S.FAILED
    assert "1 data key(s) could not be rewrapped" in run.last_error
    assert (run.rewrapped, run.failed_deks) == (4, 1)
    assert KeyVersion.objects.get(kek=kek, number=1).state == KeyVersion.State.ENABLED


def test_rollback_before_retirement_restores_previous_primary(kek):
    seed_data_keys(kek, 10)
    run = services.drive(services.start_run(kek=kek, actor=ACTOR).pk)
    assert run.state == S.RETIRING

    run = services.rollback(run, actor=ACTOR, reason="app errors")

    assert run.state == S.ROLLED_BACK
    assert kek.versions.get(is_primary=True).number == 1
    assert get_provider().describe_key(kek.provider_key_id).primary_version == 1
    assert get_provider().encrypt(kek.provider_key_id, b"x").key_version == 1
    assert decrypt_all(kek) == {2}  # both versions stay enabled
    with pytest.raises(InvalidRunTransition):
        services.rollback(run, actor=ACTOR)


def test_completed_run_cannot_be_rolled_back(kek):
    run = services.drive(services.start_run(kek=kek, actor=ACTOR, kind="emergency", incident_ref="I-1").pk)

    with pytest.raises(InvalidRunTransition):
        services.rollback(run, actor=ACTOR)


def test_provider_outage_pauses_and_the_run_completes_after_recovery(flaky_provider, system_actor):
    kek = key_services.create_kek(name="flaky-kek", actor=system_actor, provider_name="flaky")
    seed_data_keys(kek, 40)
    run = services.start_run(kek=kek, actor=ACTOR)
    services.execute_run(run.pk)
    flaky_provider.touch()  # the provider goes down mid-run

    run.refresh_from_db()
    with pytest.raises(ProviderUnavailable):
        services.rewrap_partition(run.pk, run.partitions.first().pk)
    run.refresh_from_db()
    assert run.state == S.REWRAPPING and run.rewrapped == 0
    assert key_services.version_coverage(kek) == {1: 40}  # nothing half-done

    flaky_provider.unlink()  # recovery
    assert services.drive(run.pk).state == S.RETIRING
    run = services.drive(run.pk, now=timezone.now() + timedelta(days=8))

    assert run.state == S.COMPLETED and run.rewrapped == 40
    assert decrypt_all(kek) == {2}


def test_cancel_only_before_work_starts(kek, settings):
    run = services.start_run(kek=kek, actor=ACTOR)
    services.cancel(run, actor=ACTOR, reason="wrong key")
    run.refresh_from_db()
    assert run.state == S.CANCELLED
    assert kek.versions.count() == 1

    second = services.drive(services.start_run(kek=kek, actor=ACTOR).pk)
    with pytest.raises(InvalidRunTransition):
        services.cancel(second, actor=ACTOR)


def test_migration_moves_every_data_key_to_another_kek(kek, system_actor, flaky_provider):
    destination = key_services.create_kek(name="managed", actor=system_actor, provider_name="flaky")
    seed_data_keys(kek, 15)

    run = services.start_run(kek=kek, actor=ACTOR, kind="migrate", destination=destination)
    run = services.drive(run.pk)

    assert run.state == S.COMPLETED
    assert DataKey.objects.filter(kek=kek).count() == 0
    assert decrypt_all(destination) == {1}
    assert DataKey.objects.filter(kek=destination).count() == 15


def test_disabled_kek_cannot_start_a_run(kek):
    key_services.disable_kek(kek, actor=ACTOR)
    kek.refresh_from_db()

    with pytest.raises(KeyDisabled):
        services.start_run(kek=kek, actor=ACTOR)

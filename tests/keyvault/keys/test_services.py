"""Key lifecycle services: state machine, audit trail, crypto refusal, coverage gating."""

from datetime import timedelta

import pytest
from django.utils import timezone

from keyvault.exceptions import CoverageIncomplete, InvalidStateTransition, KeyNotUsable
from keyvault.keys import services
from keyvault.kms import InvalidCiphertext, get_provider
from keyvault.models import AuditEvent, DataKey, KeyEncryptionKey, KeyVersion

pytestmark = pytest.mark.django_db

KEK = KeyEncryptionKey


@pytest.fixture
def kek(system_actor):
    return services.create_kek(name="payments", actor=system_actor, description="card data")


def actions():
    return list(AuditEvent.objects.order_by("sequence").values_list("action", flat=True))


def test_create_kek_registers_version_one_and_audits(kek):
    assert kek.state == KEK.State.ENABLED
    assert kek.provider == "local"
    assert list(kek.versions.values_list("number", "is_primary")) == [(1, True)]
    assert get_provider("local").describe_key(kek.provider_key_id).primary_version == 1
    assert actions() == ["kek.created"]


def test_duplicate_name_is_refused(kek, system_actor):
    with pytest.raises(InvalidStateTransition):
        services.create_kek(name="payments", actor=system_actor)


def test_rotation_makes_a_new_primary(kek, system_actor):
    version = services.rotate_kek_version(kek, actor=system_actor, reason="scheduled")

    kek.refresh_from_db()
    assert version.number == 2 and version.is_primary
    assert list(kek.versions.order_by("number").values_list("number", "is_primary")) == [(1, False), (2, True)]
    assert kek.last_rotated_at is not None
    event = AuditEvent.objects.get(action="kek.rotated")
    assert event.details == {"new_version": 2, "previous_version": 1, "reason": "scheduled"}


def test_state_machine_follows_aws_transitions(kek, system_actor):
    services.disable_kek(kek, actor=system_actor)
    services.enable_kek(kek, actor=system_actor)
    services.schedule_kek_deletion(kek, actor=system_actor, waiting_days=7)
    with pytest.raises(InvalidStateTransition):
        services.enable_kek(kek, actor=system_actor)  # must cancel first
    kek = services.cancel_kek_deletion(kek, actor=system_actor)

    assert kek.state == KEK.State.DISABLED and kek.deletion_date is None
    assert actions() == [
        "kek.created", "kek.disabled", "kek.enabled", "kek.deletion_scheduled", "kek.deletion_cancelled",
    ]


@pytest.mark.parametrize("days", [0, 6, 31, -1])
def test_deletion_waiting_period_is_7_to_30_days(kek, system_actor, days):
    with pytest.raises(ValueError):
        services.schedule_kek_deletion(kek, actor=system_actor, waiting_days=days)
    kek.refresh_from_db()
    assert kek.state == KEK.State.ENABLED


def test_disabled_and_pending_keys_refuse_crypto_with_a_clear_error(kek, system_actor):
    services.disable_kek(kek, actor=system_actor)
    with pytest.raises(KeyNotUsable, match="disabled"):
        services.create_data_key(kek, actor=system_actor)
    services.schedule_kek_deletion(kek, actor=system_actor)
    kek.refresh_from_db()
    with pytest.raises(KeyNotUsable, match="pending deletion"):
        services.encrypt_with_kek(kek, b"x", actor=system_actor)
    with pytest.raises(KeyNotUsable):
        services.rotate_kek_version(kek, actor=system_actor)


def test_disable_reaches_the_provider(kek, system_actor):
    row, plain = services.create_data_key(kek, actor=system_actor)
    services.disable_kek(kek, actor=system_actor)

    from keyvault.kms import KeyDisabled

    with pytest.raises(KeyDisabled):
        get_provider("local").decrypt(bytes(row.wrapped_key))


def test_destroy_due_keks_only_after_the_waiting_period(kek, system_actor):
    services.schedule_kek_deletion(kek, actor=system_actor, waiting_days=7)

    assert services.destroy_due_keks(now=timezone.now() + timedelta(days=6)) == []
    assert services.destroy_due_keks(now=timezone.now() + timedelta(days=7, minutes=1)) == ["payments"]

    kek.refresh_from_db()
    assert kek.state == KEK.State.DESTROYED
    assert set(kek.versions.values_list("state", flat=True)) == {KeyVersion.State.DESTROYED}
    assert get_provider("local").describe_key(kek.provider_key_id).state == "destroyed"
    assert actions()[-1] == "kek.destroyed"


def test_coverage_of_many_keks_in_one_query_agrees_with_each_keks_coverage(kek, system_actor,
                                                                          django_assert_num_queries):
    # given two KEKs with data keys over versions, and one with none
    other = services.create_kek(name="other", actor=system_actor)
    empty = services.create_kek(name="empty", actor=system_actor)
    for _ in range(2):
        services.create_data_key(kek, actor=system_actor)[1].wipe()
    services.rotate_kek_version(kek, actor=system_actor)
    services.create_data_key(kek, actor=system_actor)[1].wipe()
    services.create_data_key(other, actor=system_actor)[1].wipe()

    # when all three are read at once (from the counters the services keep)
    with django_assert_num_queries(1):
        coverage = services.coverage_by_kek([kek.pk, other.pk, empty.pk])

    # then each agrees with its own exact count, and the empty one is absent
    assert coverage == {kek.pk: {1: 2, 2: 1}, other.pk: {1: 1}}
    assert coverage[kek.pk] == services.version_coverage(kek)
    assert services.coverage_by_kek() == coverage
    assert services.coverage_by_kek([other.pk]) == {other.pk: {1: 1}}


def _counters(*keks):
    return {kek.pk: {number: n for number, n in kek.versions.values_list("number", "data_keys") if n} for kek in keks}


def _exact(*keks):
    return {kek.pk: services.version_coverage(kek) for kek in keks}


def test_the_version_counters_follow_create_rewrap_bulk_rewrap_move_and_destroy(kek, system_actor):
    # given data keys made, rotated and rewrapped one by one
    other = services.create_kek(name="other", actor=system_actor)
    rows = [services.create_data_key(kek, actor=system_actor, owner_ref="app.x") for _ in range(4)]
    for _, plain in rows:
        plain.wipe()
    services.rotate_kek_version(kek, actor=system_actor)
    services.rewrap_data_key(rows[0][0], actor=system_actor)
    assert _counters(kek) == _exact(kek) == {kek.pk: {1: 3, 2: 1}}

    # when the rotation engine's bulk write rewraps two in place and moves one to another KEK
    services.store_rewrapped_batch([(rows[1][0].pk, b"in-place", 2, {}), (rows[2][0].pk, b"in-place-2", 2, {})],
                                   timezone.now(), kek_id=kek.pk, moves=False)
    services.store_rewrapped_batch([(rows[3][0].pk, b"moved", 1, {})], timezone.now(), kek_id=other.pk, moves=True)

    # then the counters moved with the rows
    assert _counters(kek, other) == _exact(kek, other) == {kek.pk: {2: 3}, other.pk: {1: 1}}

    # and destroying a superseded data key counts it out
    replacement, plain = services.create_data_key(kek, actor=system_actor, owner_ref="app.x")
    plain.wipe()
    services.destroy_data_key(rows[0][0], replaced_by=replacement, actor=system_actor, reason="INC-1")
    assert _counters(kek) == _exact(kek) == {kek.pk: {2: 3}}


def test_recount_repairs_counters_after_rows_were_loaded_around_the_services(kek, system_actor):
    row, plain = services.create_data_key(kek, actor=system_actor)
    plain.wipe()
    DataKey.objects.bulk_create([DataKey(kek=kek, kek_version=1, wrapped_key=b"loaded", fingerprint="")])
    assert _counters(kek) == {kek.pk: {1: 1}}

    assert services.recount_data_keys() == 1
    assert _counters(kek) == _exact(kek) == {kek.pk: {1: 2}}
    assert services.recount_data_keys() == 0


def test_data_key_lifecycle(kek, system_actor):
    context = {"tenant": "acme"}
    row, plain = services.create_data_key(kek, actor=system_actor, encryption_context=context, owner_ref="billing.invoice")
    secret = bytes(plain.plaintext)
    plain.wipe()

    assert bytes(row.wrapped_key) != secret and secret not in bytes(row.wrapped_key)
    assert row.kek_version == 1 and row.encryption_context == context
    assert bytes(services.unwrap_data_key(row, actor=system_actor)) == secret

    services.rotate_kek_version(kek, actor=system_actor)
    rewrapped = services.rewrap_data_key(row, actor=system_actor)

    assert rewrapped.pk == row.pk and rewrapped.kek_version == 2
    assert rewrapped.last_rewrapped_at is not None
    assert bytes(services.unwrap_data_key(rewrapped, actor=system_actor)) == secret
    assert services.version_coverage(kek) == {2: 1}
    assert "datakey.rewrapped" in actions()
    # Nothing in the audit log carries the key.
    for details in AuditEvent.objects.values_list("details", flat=True):
        assert secret.hex() not in str(details)


def test_unwrap_failure_is_audited(kek, system_actor):
    row, _ = services.create_data_key(kek, actor=system_actor, encryption_context={"a": "b"})
    DataKey.objects.filter(pk=row.pk).update(encryption_context={"a": "c"})
    row.refresh_from_db()

    with pytest.raises(InvalidCiphertext):
        services.unwrap_data_key(row, actor=system_actor)
    event = AuditEvent.objects.order_by("-sequence").first()
    assert (event.action, event.outcome, event.details) == ("datakey.unwrapped", "failure", {"error": "InvalidCiphertext"})


def test_retiring_a_version_needs_full_coverage(kek, system_actor):
    row, _ = services.create_data_key(kek, actor=system_actor)
    services.rotate_kek_version(kek, actor=system_actor)

    with pytest.raises(InvalidStateTransition):
        services.set_version_state(kek, 2, KeyVersion.State.DISABLED, actor=system_actor)
    with pytest.raises(CoverageIncomplete, match="1 data key"):
        services.set_version_state(kek, 1, KeyVersion.State.DISABLED, actor=system_actor)

    services.rewrap_data_key(row, actor=system_actor)
    services.set_version_state(kek, 1, KeyVersion.State.DISABLED, actor=system_actor)

    assert KeyVersion.objects.get(kek=kek, number=1).state == KeyVersion.State.DISABLED
    assert get_provider("local").describe_key(kek.provider_key_id).version(1).state == "disabled"


def test_forced_retirement_needs_a_reason_and_blocks_unwrap(kek, system_actor):
    row, _ = services.create_data_key(kek, actor=system_actor)
    services.rotate_kek_version(kek, actor=system_actor)

    with pytest.raises(ValueError):
        services.set_version_state(kek, 1, "disabled", actor=system_actor, force=True)
    services.set_version_state(kek, 1, "disabled", actor=system_actor, force=True, reason="INC-42 compromise")

    with pytest.raises(KeyNotUsable):
        services.unwrap_data_key(row, actor=system_actor)
    event = AuditEvent.objects.filter(action="version.state_changed").get()
    assert event.details["forced"] is True and event.details["reason"] == "INC-42 compromise"


def test_destroyed_version_cannot_come_back(kek, system_actor):
    services.rotate_kek_version(kek, actor=system_actor)
    services.set_version_state(kek, 1, "destroyed", actor=system_actor)

    with pytest.raises(InvalidStateTransition):
        services.set_version_state(kek, 1, "enabled", actor=system_actor)


def test_settings_update_changes_description_and_usage_limit(kek, system_actor):
    services.update_kek_settings(kek, actor=system_actor, description="card numbers", max_encryptions_per_version=1000)

    kek.refresh_from_db()
    assert kek.description == "card numbers" and kek.max_encryptions_per_version == 1000
    assert AuditEvent.objects.get(action="kek.updated").details == {
        "description": "card numbers", "max_encryptions_per_version": 1000,
    }


def test_refresh_copies_encrypt_counts(kek, system_actor):
    services.encrypt_with_kek(kek, b"x", actor=system_actor)

    services.refresh_kek(kek)

    assert KeyVersion.objects.get(kek=kek, number=1).encrypt_count >= 1


def test_the_command_recounts_too(kek, system_actor, capsys):
    from django.core.management import call_command

    DataKey.objects.bulk_create([DataKey(kek=kek, kek_version=1, wrapped_key=b"loaded", fingerprint="")])
    call_command("kms", "recount-data-keys")
    assert capsys.readouterr().out.strip() == "data-key counters: 1 KEK version(s) corrected"
    assert _counters(kek) == _exact(kek) == {kek.pk: {1: 1}}


def test_the_migration_counts_existing_data_keys(kek, system_actor):
    import importlib

    from django.apps import apps

    services.create_data_key(kek, actor=system_actor)[1].wipe()
    services.create_data_key(kek, actor=system_actor)[1].wipe()
    KeyVersion.objects.update(data_keys=0)

    importlib.import_module("keyvault.migrations.0021_keyversion_data_keys_counter").count_data_keys(apps, None)

    assert _counters(kek) == _exact(kek) == {kek.pk: {1: 2}}

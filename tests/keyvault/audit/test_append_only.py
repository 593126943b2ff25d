"""The whole audit trail is append-only in the database: events, checkpoints and the chain head.

Issue 12, finding 1 ("Database protection") and finding 12 (the TRUNCATE bypass): before
migration 0008 any session could delete checkpoints, move the head backwards, and
``SET LOCAL keyvault.allow_audit_truncate = 'on'`` to truncate the log. These run as the
test's ordinary connection, with no ``ALTER TABLE``: what a session without ownership of
the tables can do. tests/keyvault/audit/test_roles.py repeats them as a real runtime role.
"""

import pytest
from django.db import DatabaseError, connection, transaction

from keyvault import audit
from keyvault.audit import Action, Actor
from keyvault.exceptions import AuditWriteRefused
from keyvault.models import AuditChainHead, AuditCheckpoint, AuditEvent
from tests.conftest import is_postgres

pytestmark = pytest.mark.django_db

POSTGRES_TRIGGERS = {
    ("keyvault_auditevent", "keyvault_audit_no_update_delete"),
    ("keyvault_auditevent", "keyvault_audit_no_truncate"),
    ("keyvault_auditcheckpoint", "keyvault_auditcheckpoint_no_update_delete"),
    ("keyvault_auditcheckpoint", "keyvault_auditcheckpoint_no_truncate"),
    ("keyvault_auditchainhead", "keyvault_auditchainhead_guard"),
    ("keyvault_auditchainhead", "keyvault_auditchainhead_no_truncate"),
}
SQLITE_TRIGGERS = {
    ("keyvault_auditevent", "keyvault_auditevent_no_update"),
    ("keyvault_auditevent", "keyvault_auditevent_no_delete"),
    ("keyvault_auditcheckpoint", "keyvault_auditcheckpoint_no_update"),
    ("keyvault_auditcheckpoint", "keyvault_auditcheckpoint_no_delete"),
    ("keyvault_auditchainhead", "keyvault_auditchainhead_no_delete"),
    ("keyvault_auditchainhead", "keyvault_auditchainhead_genesis_only"),
    ("keyvault_auditchainhead", "keyvault_auditchainhead_forward_only"),
}


@pytest.fixture
def chain(settings):
    """Six events with a signed checkpoint at #3 and #6."""
    settings.AUDIT_CHECKPOINT_INTERVAL = 3
    actor = Actor.system("tests")
    return [audit.record(Action.OTHER, actor=actor, target=("thing", i)) for i in range(6)]


def refused(sql, params=()):
    """Run ``sql`` in its own transaction; return the database's error (the test fails if there is none)."""
    with pytest.raises(DatabaseError, match="append-only") as error:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, params)
    return error.value


def head():
    return AuditChainHead.objects.values_list("last_sequence", "last_hash").get(pk=1)


# -- the attacks of the issue, as a session that does not own the tables ---------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("table", ["keyvault_auditevent", "keyvault_auditcheckpoint", "keyvault_auditchainhead"])
def test_the_truncate_session_setting_no_longer_lifts_the_block(chain, table):
    # given the setting that used to lift the TRUNCATE block for "the test suite's flush"
    if not is_postgres():
        pytest.fail("postgres-marked tests run only on PostgreSQL")

    # when any session sets it and truncates
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL keyvault.allow_audit_truncate = 'on'")
            cursor.execute(f"TRUNCATE {table}")

    # then nothing is gone
    assert AuditEvent.objects.count() == 6
    assert AuditCheckpoint.objects.count() == 2 and head()[0] == 6


def test_checkpoints_cannot_be_deleted(chain):
    refused("DELETE FROM keyvault_auditcheckpoint")
    refused("DELETE FROM keyvault_auditcheckpoint WHERE sequence = 6")

    assert list(AuditCheckpoint.objects.order_by("sequence").values_list("sequence", flat=True)) == [3, 6]
    assert audit.verify_chain().ok


def test_checkpoints_cannot_be_edited(chain):
    refused("UPDATE keyvault_auditcheckpoint SET signature = %s WHERE sequence = 3", ["00" * 64])
    refused("UPDATE keyvault_auditcheckpoint SET sequence = 2 WHERE sequence = 3")

    assert audit.verify_chain().ok


def test_the_chain_head_cannot_move_backwards(chain):
    # given the head at #6; an attacker who truncated the tail would move it back to #4
    fourth = AuditEvent.objects.get(sequence=4)

    refused("UPDATE keyvault_auditchainhead SET last_sequence = %s, last_hash = %s", [4, fourth.hash])

    assert head() == (6, chain[-1].hash)


def test_the_chain_head_only_names_a_recorded_event(chain):
    refused("UPDATE keyvault_auditchainhead SET last_sequence = 7, last_hash = %s", ["ab" * 32])
    refused("UPDATE keyvault_auditchainhead SET last_hash = %s", ["ab" * 32])
    refused("UPDATE keyvault_auditchainhead SET last_sequence = 7, last_hash = %s", [chain[-1].hash])

    assert head() == (6, chain[-1].hash)


def test_the_chain_head_cannot_be_removed_or_doubled(chain):
    refused("DELETE FROM keyvault_auditchainhead")
    refused("INSERT INTO keyvault_auditchainhead (id, last_sequence, last_hash) VALUES (2, 6, %s)", [chain[-1].hash])
    if is_postgres():
        refused("TRUNCATE keyvault_auditchainhead")
    # a second genesis row for row 1 is a plain duplicate key, as audit._locked_head expects when it races
    with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("INSERT INTO keyvault_auditchainhead (id, last_sequence, last_hash) VALUES (1, 0, %s)",
                       [audit.GENESIS_HASH])

    assert AuditChainHead.objects.count() == 1 and head() == (6, chain[-1].hash)


def test_only_the_genesis_head_may_be_created():
    # given no event yet: a head that skips genesis would let a forged first event through
    refused("INSERT INTO keyvault_auditchainhead (id, last_sequence, last_hash) VALUES (1, 5, %s)", ["ab" * 32])

    # when the application records its first event, it creates the genesis head and moves it forward
    event = audit.record(Action.OTHER, actor=Actor.system("tests"))

    # then the legitimate path works
    assert head() == (1, event.hash)


def test_events_cannot_be_edited_or_deleted_on_either_database(chain):
    refused("UPDATE keyvault_auditevent SET actor = 'user:mallory' WHERE sequence = 2")
    refused("DELETE FROM keyvault_auditevent WHERE sequence >= 5")

    assert AuditEvent.objects.count() == 6 and audit.verify_chain().ok


def test_appending_still_moves_the_head_and_signs_checkpoints(chain):
    more = [audit.record(Action.OTHER, actor=Actor.system("tests")) for _ in range(3)]
    audit.checkpoint(actor=Actor.system("tests"))

    assert head() == (10, AuditEvent.objects.get(sequence=10).hash)
    assert more[-1].sequence == 9
    assert list(AuditCheckpoint.objects.order_by("sequence").values_list("sequence", flat=True)) == [3, 6, 9, 10]
    assert audit.verify_chain().ok


# -- the same refusals in the model layer --------------------------------------------------------


def test_checkpoint_models_refuse_changes(chain):
    checkpoint = AuditCheckpoint.objects.get(sequence=3)

    for change in (
        lambda: AuditCheckpoint.objects.all().delete(),
        lambda: AuditCheckpoint.objects.filter(sequence=3).update(signature="00" * 64),
        lambda: AuditCheckpoint.objects.bulk_update([checkpoint], ["signature"]),
        lambda: checkpoint.save(),
        lambda: checkpoint.delete(),
    ):
        with pytest.raises(AuditWriteRefused):
            change()
    assert AuditCheckpoint.objects.count() == 2


def test_chain_head_model_refuses_all_but_moving_the_position(chain):
    current = AuditChainHead.objects.get(pk=1)

    for change in (
        lambda: AuditChainHead.objects.all().delete(),
        lambda: AuditChainHead.objects.update(last_sequence=0),
        lambda: AuditChainHead.objects.update(id=2, last_sequence=6, last_hash=chain[-1].hash),
        lambda: AuditChainHead.objects.bulk_update([current], ["last_sequence"]),
        lambda: current.save(),
        lambda: current.delete(),
    ):
        with pytest.raises(AuditWriteRefused):
            change()
    assert head() == (6, chain[-1].hash)


# -- the protection is installed, and stays installed ------------------------------------------------


def test_every_append_only_trigger_is_installed_and_enabled():
    # A later migration that rebuilds an audit table (SQLite remakes tables to alter them) would drop them.
    with connection.cursor() as cursor:
        if is_postgres():
            cursor.execute(
                "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " WHERE NOT t.tgisinternal AND t.tgenabled IN ('O', 'A') AND c.relname LIKE 'keyvault_audit%%'"
            )
            expected = POSTGRES_TRIGGERS
        else:
            cursor.execute("SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'")
            expected = SQLITE_TRIGGERS
        installed = set(cursor.fetchall())

    assert expected <= installed, f"missing or disabled: {sorted(expected - installed)} (see migration 0008)"

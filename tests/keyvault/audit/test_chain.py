"""The hash-chained audit log: appends, tamper detection, checkpoints, append-only storage."""

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

import pytest
from django.db import DatabaseError, connection, transaction

from keyvault import audit
from keyvault.audit import walk as audit_walk
from keyvault.keys import services
from keyvault.audit import Action, Actor
from keyvault.exceptions import AuditWriteRefused
from keyvault.models import AuditCheckpoint, AuditEvent, KeyEncryptionKey
from tests.audit_owner import as_table_owner
from tests.conftest import is_postgres

pytestmark = pytest.mark.django_db


def record_events(n, actor=None):
    actor = actor or Actor.system("tests")
    return [audit.record(Action.OTHER, actor=actor, target=("thing", i), details={"i": i}) for i in range(n)]


def tamper(sql, params=()):
    """Change the audit table behind the application's back, as a database owner could."""
    with as_table_owner() as cursor:
        cursor.execute(sql, params)


def test_events_are_chained_and_gapless():
    events = record_events(5)

    assert [e.sequence for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == audit.GENESIS_HASH
    for previous, event in zip(events, events[1:]):
        assert event.prev_hash == previous.hash
    assert audit.verify_chain().ok


def test_hash_covers_canonical_fields():
    event = record_events(1)[0]
    stored = AuditEvent.objects.get(pk=event.pk)

    assert audit.event_hash(stored) == stored.hash == hashlib.sha256(
        audit.canonical_bytes(
            sequence=1, timestamp=stored.timestamp, actor="system:tests", action="other", target_type="thing",
            target_id="0", outcome="success", request_id="", ip_address=None, details={"i": 0},
            prev_hash=audit.GENESIS_HASH,
        )
    ).hexdigest()


def test_verify_reports_intact_chain_with_counts():
    record_events(3)

    result = audit.verify_chain()

    assert result.ok and result.events == 3 and result.last_sequence == 3
    assert str(result).startswith("OK: audit chain intact, 3 events to #3")


def test_edited_event_is_detected():
    record_events(4)
    tamper("UPDATE keyvault_auditevent SET actor = 'user:mallory' WHERE sequence = 2")

    result = audit.verify_chain()

    assert not result.ok
    assert result.broken_at == 2
    assert "edited" in result.reason


def test_edited_details_are_detected():
    record_events(3)
    tamper("UPDATE keyvault_auditevent SET details = %s WHERE sequence = 3", [json.dumps({"i": 99})])

    assert audit.verify_chain().broken_at == 3


def test_deleted_event_is_detected():
    record_events(4)
    tamper("DELETE FROM keyvault_auditevent WHERE sequence = 2")

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 2
    assert "missing" in result.reason


def test_deleting_the_newest_events_is_detected():
    record_events(4)
    tamper("DELETE FROM keyvault_auditevent WHERE sequence >= 3")

    result = audit.verify_chain()

    assert not result.ok
    assert "newest events removed" in result.reason


def test_inserted_event_is_detected():
    events = record_events(3)
    # Shift event 3 to 4 and put a forged event 3 (with a correct-looking hash) before it.
    tamper("UPDATE keyvault_auditevent SET sequence = 4 WHERE sequence = 3")
    forged = dict(
        sequence=3, timestamp=events[2].timestamp, actor="user:mallory", action="other", target_type="", target_id="",
        outcome="success", request_id="", ip_address=None, details={}, prev_hash=events[1].hash,
    )
    digest = hashlib.sha256(audit.canonical_bytes(**forged)).hexdigest()
    tamper(
        "INSERT INTO keyvault_auditevent (sequence, timestamp, actor, action, target_type, target_id, outcome,"
        " request_id, ip_address, details, prev_hash, hash) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
        [3, events[2].timestamp, "user:mallory", "other", "", "", "success", "", None, "{}", events[1].hash, digest],
    )

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 4


def test_reordered_events_are_detected():
    record_events(4)
    tamper("UPDATE keyvault_auditevent SET sequence = 100 WHERE sequence = 2")
    tamper("UPDATE keyvault_auditevent SET sequence = 2 WHERE sequence = 3")
    tamper("UPDATE keyvault_auditevent SET sequence = 3 WHERE sequence = 100")

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 2


def test_model_refuses_changes_and_deletes():
    event = record_events(1)[0]

    event.actor = "user:mallory"
    with pytest.raises(AuditWriteRefused):
        event.save()
    with pytest.raises(AuditWriteRefused):
        event.delete()
    with pytest.raises(AuditWriteRefused):
        AuditEvent.objects.filter(pk=event.pk).update(actor="x")
    with pytest.raises(AuditWriteRefused):
        AuditEvent.objects.all().delete()
    assert AuditEvent.objects.get(pk=event.pk).actor == "system:tests"


@pytest.mark.postgres
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE keyvault_auditevent SET actor = 'x'",
        "DELETE FROM keyvault_auditevent",
        "TRUNCATE keyvault_auditevent",
    ],
)
def test_postgres_trigger_rejects_update_delete_truncate(statement):
    if not is_postgres():
        pytest.fail("postgres-marked tests run only on PostgreSQL (scripts/test.sh deselects them elsewhere)")
    record_events(2)

    with pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(statement)
    assert AuditEvent.objects.count() == 2


def test_details_never_take_bytes_or_floats():
    with pytest.raises(TypeError, match="bytes"):
        audit.record(Action.OTHER, actor=Actor.system("t"), details={"key": b"\x00" * 32})
    with pytest.raises(TypeError, match="float"):
        audit.record(Action.OTHER, actor=Actor.system("t"), details={"nested": [{"x": 1.5}]})
    assert AuditEvent.objects.count() == 0


def test_hmac_value_hides_the_value(settings):
    digest = audit.hmac_value("client-secret-123")

    assert digest.startswith("hmac-sha256:")
    assert "client-secret-123" not in digest
    assert digest == audit.hmac_value("client-secret-123")
    settings.AUDIT_HMAC_KEY = "another key"
    assert digest != audit.hmac_value("client-secret-123")


def test_checkpoints_every_n_events_and_verify(settings):
    settings.AUDIT_CHECKPOINT_INTERVAL = 3
    record_events(7)

    checkpoints = list(AuditCheckpoint.objects.order_by("sequence"))

    assert [c.sequence for c in checkpoints] == [3, 6]
    assert checkpoints[1].prev_signature == checkpoints[0].signature
    result = audit.verify_chain()
    assert result.ok and result.checkpoints == 2


def test_forged_checkpoint_signature_is_detected(settings):
    settings.AUDIT_CHECKPOINT_INTERVAL = 2
    record_events(4)
    tamper("UPDATE keyvault_auditcheckpoint SET signature = %s WHERE sequence = 2", ["00" * 64])

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 2 and "signature" in result.reason


def test_checkpoint_from_untrusted_key_is_detected(settings):
    settings.AUDIT_CHECKPOINT_INTERVAL = 2
    record_events(2)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    import base64

    other = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    settings.AUDIT_SIGNING_KEY = base64.b64encode(other).decode()

    result = audit.verify_chain()

    assert not result.ok and "not trusted" in result.reason


def test_on_demand_checkpoint_signs_the_head():
    record_events(2)

    cp = audit.checkpoint(actor=Actor.system("tests"))

    assert cp.sequence == 3  # the checkpoint's own audit event is covered
    assert AuditEvent.objects.get(sequence=3).action == Action.AUDIT_CHECKPOINT
    assert audit.verify_chain().checkpoints == 1


def test_service_fails_closed_when_audit_cannot_be_written(monkeypatch):
    def refuse(*args, **kwargs):
        raise DatabaseError("audit storage unavailable")

    monkeypatch.setattr(audit, "_locked_head", refuse)  # SQLite's append
    monkeypatch.setattr(audit, "_chain_on_server", refuse)  # PostgreSQL's

    with pytest.raises(DatabaseError):
        services.create_kek(name="never-recorded", actor=Actor.system("tests"))
    assert not KeyEncryptionKey.objects.filter(name="never-recorded").exists()


def test_export_rows_reverify_offline():
    record_events(3)

    rows = list(audit.export_rows())

    previous = audit.GENESIS_HASH
    for row in rows:
        fields = {k: v for k, v in row.items() if k != "hash"}
        from datetime import datetime

        fields["timestamp"] = datetime.fromisoformat(fields["timestamp"].replace("Z", "+00:00"))
        assert fields["prev_hash"] == previous
        assert hashlib.sha256(audit.canonical_bytes(**fields)).hexdigest() == row["hash"]
        previous = row["hash"]


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    sequence=st.integers(min_value=1, max_value=2**62),
    timestamp=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2999, 1, 1), timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))])),
    actor=_TEXT, action=_TEXT, target_type=_TEXT, target_id=_TEXT, outcome=_TEXT, request_id=_TEXT,
    ip_address=st.none() | st.ip_addresses().map(str), details=st.dictionaries(_TEXT, _JSON, max_size=5),
    prev_hash=_TEXT,
)
def test_fast_canonical_bytes_equal_the_definition(**event):
    assert audit_walk.fast_canonical_text(*event.values()).encode() == audit.canonical_bytes(**event)


# -- rewriting the chain as a database owner (issue 12, finding 1) -------------------------------
#
# An attacker who can write the database recomputes every later hash with the project's own
# canonical_bytes, moves the chain head and removes the checkpoints that would give them away.
# Only the signing key (not in the database) and the checkpoint density catch it here; the
# external witness (tests/keyvault/audit/test_witness.py) catches what density cannot.

def owner_sql(*statements):
    """Run statements as the tables' owner would (PostgreSQL: user triggers disabled around them)."""
    with as_table_owner() as cursor:
        for sql, params in statements:
            cursor.execute(sql, params)


def rehash_from(sequence):
    """Recompute hash and prev_hash of every event from ``sequence`` on, and move the head to the last one."""
    previous = AuditEvent.objects.filter(sequence=sequence - 1).values_list("hash", flat=True).first()
    previous = previous or audit.GENESIS_HASH
    statements = []
    for row in AuditEvent.objects.filter(sequence__gte=sequence).order_by("sequence").values_list(*audit_walk.ROW_FIELDS):
        fields = dict(zip(audit_walk.ROW_FIELDS, row[:11]), prev_hash=previous)
        digest = hashlib.sha256(audit.canonical_bytes(**fields)).hexdigest()
        statements.append(("UPDATE keyvault_auditevent SET prev_hash = %s, hash = %s WHERE sequence = %s",
                           [previous, digest, fields["sequence"]]))
        last, previous = fields["sequence"], digest
    statements.append(("UPDATE keyvault_auditchainhead SET last_sequence = %s, last_hash = %s", [last, previous]))
    owner_sql(*statements)


def attack_edit_and_rehash():
    """Edit #2, recompute every later hash, move the head, delete every checkpoint."""
    owner_sql(("UPDATE keyvault_auditevent SET actor = 'user:mallory' WHERE sequence = 2", []))
    rehash_from(2)
    owner_sql(("DELETE FROM keyvault_auditcheckpoint", []))


def attack_delete_and_renumber():
    """Delete #5, renumber the later events down by one, recompute their hashes, delete every checkpoint."""
    last = AuditEvent.objects.order_by("-sequence").values_list("sequence", flat=True).first()
    owner_sql(("DELETE FROM keyvault_auditevent WHERE sequence = 5", []),
              *[("UPDATE keyvault_auditevent SET sequence = %s WHERE sequence = %s", [s - 1, s])
                for s in range(6, last + 1)])
    rehash_from(5)
    owner_sql(("DELETE FROM keyvault_auditcheckpoint", []))


def test_rewriting_the_chain_and_deleting_checkpoints_is_a_missing_checkpoint(settings):
    # given a chain with a checkpoint every 3 events (#3, #6, #9), rewritten from #2 by a database owner
    settings.AUDIT_CHECKPOINT_INTERVAL = 3
    record_events(10)
    attack_edit_and_rehash()

    # when it is verified
    result = audit.verify_chain()

    # then the missing checkpoints give it away (before the fix: "OK ... 0 signed checkpoints verified")
    assert not result.ok, str(result)
    assert result.broken_at == 3 and "missing checkpoint" in result.reason


def test_deleting_an_event_and_renumbering_is_a_missing_checkpoint(settings):
    settings.AUDIT_CHECKPOINT_INTERVAL = 3
    record_events(10)
    attack_delete_and_renumber()

    result = audit.verify_chain()

    assert not result.ok, str(result)
    assert "missing checkpoint" in result.reason


def test_deleting_checkpoints_after_an_edit_beyond_the_last_kept_one_is_a_missing_checkpoint(settings):
    # given checkpoints #3 #6 #9; the owner edits #8 and deletes only #9, which no longer matches
    settings.AUDIT_CHECKPOINT_INTERVAL = 3
    record_events(10)
    owner_sql(("UPDATE keyvault_auditevent SET actor = 'user:mallory' WHERE sequence = 8", []))
    rehash_from(8)
    owner_sql(("DELETE FROM keyvault_auditcheckpoint WHERE sequence = 9", []))

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 9 and "missing checkpoint" in result.reason


def test_density_allows_extra_checkpoints_and_a_short_unsigned_tail(settings):
    # given on-demand checkpoints between the regular ones, and fewer than INTERVAL events after the last
    settings.AUDIT_CHECKPOINT_INTERVAL = 4
    record_events(2)
    audit.checkpoint(actor=Actor.system("tests"))  # #3, on demand
    record_events(4)  # #4 (regular), #5..#7

    result = audit.verify_chain()

    assert result.ok, str(result)
    assert result.checkpoints == 2


def test_density_counts_the_unsigned_tail(settings):
    # given a regular checkpoint at #4 and #8, and #8 removed by the owner: 4 events after #4 unsigned
    settings.AUDIT_CHECKPOINT_INTERVAL = 4
    record_events(9)
    owner_sql(("DELETE FROM keyvault_auditcheckpoint WHERE sequence = 8", []))

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 8 and "missing checkpoint" in result.reason


def test_checkpoint_interval_zero_turns_the_density_check_off(settings):
    settings.AUDIT_CHECKPOINT_INTERVAL = 0
    record_events(10)

    assert audit.verify_chain().ok

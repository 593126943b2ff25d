"""``keyvault_audit_append`` (migration 0023) hashes exactly as :func:`keyvault.audit.canonical_bytes` does.

PostgreSQL chains events inside the server; ``audit verify`` recomputes every hash in Python.
Generated events (any Unicode, nested details with keys named like the top-level ones,
quotes and backslashes) must come out of the server with the hash Python computes.
"""

import hashlib
from datetime import UTC, datetime

import pytest
from django.db import connection, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyvault import audit
from keyvault.models import AuditEvent

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]

# PostgreSQL text cannot hold NUL; everything else in Unicode goes.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
SCALARS = st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | TEXT
# Keys named like the top-level slots the pieces are cut around, to show a nested one is never taken for them.
KEYS = st.sampled_from(["prev_hash", "sequence", "~prev~", 'a"b', "x\\y"]) | TEXT
DETAILS = st.dictionaries(KEYS, st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                                             | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8), max_size=4)


def _fields(actor, target_id, request_id, details, ip_address):
    return dict(timestamp=datetime(2026, 12, 7, 8, 0, 0, 123456, tzinfo=UTC), actor=actor[:150], action="other",
                target_type="bench", target_id=target_id[:255], outcome="success", request_id=request_id[:64],
                ip_address=ip_address, details=details)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actor=TEXT, target_id=TEXT, request_id=TEXT, details=DETAILS,
       ip_address=st.sampled_from([None, "192.0.2.7", "2001:db8::1"]), size=st.integers(1, 3))
def test_the_server_hashes_every_event_as_python_does(actor, target_id, request_id, details, ip_address, size):
    if connection.vendor != "postgresql":
        pytest.fail("postgres-marked tests run only on PostgreSQL")
    pending = [_fields(actor, target_id, request_id, details, ip_address) for _ in range(size)]
    with transaction.atomic():
        events = audit._chain_on_server(pending)
        stored = {event.pk: event for event in AuditEvent.objects.filter(pk__in=[e.pk for e in events])}
        head = audit._locked_head()
        transaction.set_rollback(True)  # keep the chain for the next example as it was

    for event in events:
        recomputed = hashlib.sha256(audit.canonical_bytes(
            sequence=event.sequence, prev_hash=event.prev_hash, **{k: v for k, v in stored[event.pk].__dict__.items()
                                                                   if k in audit._PENDING_FIELDS})).hexdigest()
        assert event.hash == stored[event.pk].hash == recomputed
    assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
    assert (head.last_sequence, head.last_hash) == (events[-1].sequence, events[-1].hash)


def test_the_pieces_put_back_together_are_the_canonical_json():
    fields = _fields('say "hi" \\ ☃', "t", "r", {"prev_hash": "~prev~", "sequence": 9_007_199_254_740_993}, None)
    before_prev, before_sequence, after_sequence = audit._canonical_pieces(fields)
    joined = before_prev + "ab" * 32 + before_sequence + "42" + after_sequence
    assert joined.encode("ascii") == audit.canonical_bytes(**fields, sequence=42, prev_hash="ab" * 32)


def test_try_only_returns_nothing_while_another_appender_holds_the_lock():
    if connection.vendor != "postgresql":
        pytest.fail("postgres-marked tests run only on PostgreSQL")
    import psycopg
    from django.conf import settings as django_settings

    audit.record(audit.Action.OTHER, actor=audit.Actor.system("tests"))  # the head exists
    database = django_settings.DATABASES["default"]
    with psycopg.connect(dbname=database["NAME"], host=database["HOST"] or None, port=database["PORT"] or None,
                         user=database["USER"], autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", [audit.APPEND_LOCK_KEY])
        with transaction.atomic():
            assert audit._chain_on_server([_fields("a", "t", "r", {}, None)], try_only=True) is None
        other.execute("SELECT pg_advisory_unlock(%s)", [audit.APPEND_LOCK_KEY])
    with transaction.atomic():
        assert audit._chain_on_server([_fields("a", "t", "r", {}, None)], try_only=True)

"""Reading the chain for verification: SQL-rendered documents, parallel ranges, one snapshot.

The verdicts themselves (edited, missing, reordered events, checkpoints) are
tested in ``test_chain.py`` on every database. Here: that reading the chain in
ranges on several PostgreSQL connections reaches exactly the verdict of one
walk, that the database's rendering can never pass an edit off as intact, and
that rows Django cannot even load are reported, not crashed on.
"""

import json
import threading
from datetime import UTC, datetime, timedelta, timezone
from itertools import count

import pytest
from django.db import connection, connections, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyvault import audit
from keyvault.audit import Action, Actor
from keyvault.audit import walk as audit_walk
from keyvault.models import AuditEvent
from tests.audit_owner import as_table_owner
from tests.conftest import is_postgres
from tests.keyvault.audit.test_chain import record_events, tamper

# 30 events read by 3 jobs fall into the ranges 1-10, 11-20 and 21-30.
EVENTS, JOBS = 30, 3


def both_walks():
    """Verify in one walk and in JOBS parallel ranges; the verdicts must be identical."""
    single, parallel = audit.verify_chain(jobs=1), audit.verify_chain(jobs=JOBS)
    assert parallel == single
    return parallel


@pytest.fixture
def chain(settings):
    settings.AUDIT_CHECKPOINT_INTERVAL = 4
    return record_events(EVENTS)


def _swap_sequences(a, b):
    tamper("UPDATE keyvault_auditevent SET sequence = 999999 WHERE sequence = %s", [a])
    tamper("UPDATE keyvault_auditevent SET sequence = %s WHERE sequence = %s", [a, b])
    tamper("UPDATE keyvault_auditevent SET sequence = %s WHERE sequence = 999999", [b])


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_ranges_verify_an_intact_chain_with_its_checkpoints(chain):
    result = both_walks()

    assert result.ok and result.events == EVENTS and result.last_sequence == EVENTS
    assert result.checkpoints == EVENTS // 4
    assert result.last_hash == chain[-1].hash


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("tampering", "broken_at", "reason"),
    [
        (lambda: tamper("UPDATE keyvault_auditevent SET actor = 'user:mallory' WHERE sequence = 15"), 15, "edited"),
        (lambda: tamper("UPDATE keyvault_auditevent SET outcome = 'failure' WHERE sequence = 11"), 11, "edited"),
        (lambda: tamper("DELETE FROM keyvault_auditevent WHERE sequence = 11"), 11, "from #10 to #12"),
        (lambda: tamper("DELETE FROM keyvault_auditevent WHERE sequence = 24"), 24, "from #23 to #25"),
        (lambda: _swap_sequences(10, 11), 10, "prev_hash"),
        (lambda: tamper("UPDATE keyvault_auditevent SET prev_hash = hash WHERE sequence = 21"), 21, "prev_hash"),
        (lambda: tamper("UPDATE keyvault_auditevent SET target_id = 'x' WHERE sequence IN (5, 25)"), 5, "edited"),
        (lambda: tamper("DELETE FROM keyvault_auditevent WHERE sequence >= 29"), 29, "newest events removed"),
        (lambda: tamper("UPDATE keyvault_auditevent SET details = '[1]' WHERE sequence = 17"), 17, "edited"),
        (lambda: tamper("UPDATE keyvault_auditevent SET timestamp = 'infinity' WHERE sequence = 22"), 22, "edited"),
    ],
    ids=["edit", "edit-range-start", "delete-at-range-edge", "delete", "reorder-across-edge", "relink",
         "two-edits", "truncate-tail", "details-not-an-object", "timestamp-out-of-range"],
)
def test_ranges_find_the_same_first_break_as_one_walk(chain, tampering, broken_at, reason):
    tampering()

    result = both_walks()

    assert not result.ok
    assert result.broken_at == broken_at, str(result)
    assert reason in result.reason


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_events_the_database_cannot_render_are_checked_in_python(settings):
    settings.AUDIT_CHECKPOINT_INTERVAL = 0
    actor = Actor.system("tests")
    record_events(12)
    unusual = [
        audit.record(Action.OTHER, actor=Actor.system("zürich"), details={"city": "Zürich"}),
        audit.record(Action.OTHER, actor=actor, details={"nested": {"b": 1, "a": [1, {"c": None}]}}),
        audit.record(Action.OTHER, actor=actor, target=("thing", "del\x7f"), details={}),
    ]
    record_events(12)

    with transaction.atomic(), connection.cursor() as cursor, audit_walk._pinned(cursor) as table:
        segment = audit_walk.walk(audit_walk._rendered_rows(cursor, table, -1, None), set())
    assert segment.suspects == [event.sequence for event in unusual]
    assert both_walks().ok

    tamper("UPDATE keyvault_auditevent SET details = '{\"city\": \"Zurich\"}' WHERE sequence = %s",
           [unusual[0].sequence])
    result = both_walks()
    assert result.broken_at == unusual[0].sequence and "edited" in result.reason


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_ranges_read_one_snapshot_while_writers_append(chain, monkeypatch):
    real_walk = audit_walk.walk
    appended, once = [], threading.Lock()

    def append_from_another_connection():
        try:
            appended.append(audit.record(Action.OTHER, actor=Actor.system("concurrent")))
        finally:
            connections.close_all()

    def walk_after_a_concurrent_append(rows, checkpoint_sequences):
        with once:
            if not appended:
                writer = threading.Thread(target=append_from_another_connection)
                writer.start()
                writer.join()
        return real_walk(rows, checkpoint_sequences)

    monkeypatch.setattr(audit_walk, "walk", walk_after_a_concurrent_append)
    result = audit.verify_chain(jobs=JOBS)

    assert [event.sequence for event in appended] == [EVENTS + 1]  # committed while the ranges were read
    assert result.ok, str(result)
    assert result.events == EVENTS  # as of the snapshot: the head agrees with every range
    assert audit.verify_chain(jobs=JOBS).events == EVENTS + 1


@pytest.mark.django_db
def test_an_event_django_cannot_load_is_reported_not_crashed_on():
    record_events(5)
    if is_postgres():
        tamper("UPDATE keyvault_auditevent SET timestamp = '-infinity' WHERE sequence = 3")
    else:
        tamper("UPDATE keyvault_auditevent SET timestamp = '2026-13-45 00:00:00' WHERE sequence = 3")

    result = audit.verify_chain()

    assert not result.ok and result.broken_at == 3 and "edited" in result.reason


# -- the database's rendering against the definition ---------------------------

_sequences = count(10_000)
# Any character PostgreSQL stores (no NUL, no surrogates); ASCII alone; ASCII with JSON's syntax drawn
# often (a rendering that escapes wrongly is only caught when everything else in the event is ASCII).
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=16)
_ASCII = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x7E), max_size=16)
_JSONISH = st.text(alphabet=st.sampled_from('\\"') | st.sampled_from('/:,{}[] \x01\x1f\x7f')
                   | st.characters(min_codepoint=1, max_codepoint=0x7E), max_size=16)


def _scalar(text):
    return st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | text


def _flat(text):
    """Details as the services write them: scalars and lists of scalars."""
    return st.dictionaries(text, _scalar(text) | st.lists(_scalar(text), max_size=4), max_size=5)


def _nested(text):
    json_values = st.recursive(
        _scalar(text), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8,
    )
    return st.dictionaries(text, json_values, max_size=4)

_ZONES = st.sampled_from([UTC, timezone(timedelta(hours=-7))])
# Mostly years the database renders (1000-9999), sometimes any year Python holds.
_TIMESTAMPS = (st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=_ZONES)
               | st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=_ZONES))


def _store(event: dict) -> int:
    """Insert an event as a database owner could (no hash check), return its sequence."""
    sequence = next(_sequences)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO keyvault_auditevent (sequence, timestamp, actor, action, target_type, target_id, outcome,"
            " request_id, ip_address, details, prev_hash, hash) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'')",
            [sequence, event["timestamp"], event["actor"], event["action"], event["target_type"], event["target_id"],
             event["outcome"], event["request_id"], event["ip_address"], json.dumps(event["details"]),
             event["prev_hash"]],
        )
    return sequence


def _rendered_and_canonical(event: dict) -> tuple[str | None, bytes]:
    """Store the event, then read it back rendered by SQL and as Django loads it (in a savepoint per example)."""
    with transaction.atomic():
        return _read_back(_store(event))


def _read_back(sequence: int) -> tuple[str | None, bytes]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {audit_walk.DOCUMENT_SQL} FROM keyvault_auditevent e WHERE e.sequence = %s",
                       [sequence])
        (rendered,) = cursor.fetchone()
    row = AuditEvent.objects.filter(sequence=sequence).values_list(*audit_walk.ROW_FIELDS).get()
    return rendered, audit.canonical_bytes(**dict(zip(audit_walk.ROW_FIELDS, row[:11])))


def _is_a_canonical_document(text: str) -> bool:
    try:
        document = json.loads(text)
    except ValueError:
        return False
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True) == text


def _events(text, details):
    return st.fixed_dictionaries(dict(
        timestamp=_TIMESTAMPS, actor=text, action=text, target_type=text, target_id=text, outcome=text,
        request_id=text, ip_address=st.none() | st.ip_addresses().map(str), details=details, prev_hash=text,
    ))


@pytest.mark.postgres
@pytest.mark.django_db
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=_events(_JSONISH, _flat(_JSONISH)) | _events(_TEXT, _nested(_TEXT)))
def test_the_sql_rendering_is_the_canonical_document_or_no_canonical_document_at_all(event):
    # A rendering that hashes to the stored hash is a canonical document (the stored hash
    # was made from one); this makes it the canonical document of the row as it is now.
    rendered, canonical = _rendered_and_canonical(event)

    assert rendered is None or rendered.encode() == canonical or not _is_a_canonical_document(rendered)


# Text that a wrong escape would turn into another canonical document: escapes spelled
# out, JSON syntax, control characters, DEL, non-ASCII inside and outside the BMP.
_TRICKY = ['\\"', '\\\\', '\\n', '\\u0041', '\\/', '"', '","x":"', '\x01', '\x1f', '\x7f', 'é', '\u2028', '\U0001d11e']
_PLAIN = dict(timestamp=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), actor="a", action="b", target_type="c",
              target_id="d", outcome="e", request_id="f", ip_address="10.1.2.3", details={"k": "v"}, prev_hash="g")
_PLACES = {
    **{name: lambda text, name=name: {name: text} for name in
       ("actor", "action", "target_type", "target_id", "outcome", "request_id", "prev_hash")},
    "details key": lambda text: {"details": {text: 1, "k": "v"}},
    "details value": lambda text: {"details": {"k": text}},
    "details list": lambda text: {"details": {"k": [1, text]}},
}


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.parametrize("place", _PLACES)
def test_no_tricky_text_renders_as_another_canonical_document(place):
    for text in _TRICKY:
        rendered, canonical = _rendered_and_canonical({**_PLAIN, **_PLACES[place](text)})

        assert rendered is None or rendered.encode() == canonical or not _is_a_canonical_document(rendered), text


@pytest.mark.postgres
@pytest.mark.django_db
@settings(max_examples=200, deadline=None)
@given(event=_events(_ASCII, _flat(_ASCII)),
       year=st.integers(min_value=1000, max_value=9999))
def test_the_sql_rendering_is_exact_for_ascii_text_and_flat_details(event, year):
    # The fast path: what the services record is rendered by the database, not re-checked one by one.
    event["timestamp"] = event["timestamp"].replace(year=year, month=6, day=15)
    rendered, canonical = _rendered_and_canonical(event)

    assert rendered is not None and rendered.encode() == canonical



# -- the database formats, it never vouches: not even through functions the owner adds ---------------------


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.parametrize("shadow", [
    # an exact-type overload in public beats pg_catalog's polymorphic to_json(anyelement), whatever search_path says
    "CREATE FUNCTION public.to_json(value text) RETURNS json LANGUAGE sql IMMUTABLE AS "
    "$$ SELECT pg_catalog.to_json(CASE WHEN value = 'user:mallory' THEN 'system:tests' ELSE value END) $$",
    # or an operator of the owner's for text || text, ahead of pg_catalog (ALTER DATABASE … SET search_path)
    "SET search_path = public, pg_catalog; CREATE FUNCTION public.kv_cat(a text, b text) RETURNS text LANGUAGE sql IMMUTABLE AS "
    "$$ SELECT pg_catalog.textcat(a, pg_catalog.replace(b, '\"user:mallory\"', '\"system:tests\"')) $$; "
    "CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = public.kv_cat)",
])
def test_an_owner_shadowing_the_rendering_functions_cannot_hide_an_edit(shadow):
    if not is_postgres():
        pytest.fail("postgres-marked tests run only on PostgreSQL (scripts/test.sh deselects them elsewhere)")

    # given: a chain, then an owner who edits an event in place (hash untouched) and adds a function in public
    # that renders the edited value as the original, so the document the database hands back still hashes right
    record_events(3)
    with as_table_owner() as cursor:
        cursor.execute("UPDATE keyvault_auditevent SET actor = 'user:mallory' WHERE sequence = 2")
        cursor.execute(shadow)

    # when: the chain is verified
    result = audit.verify_chain(use_witness=False)

    # then: the edit is found; the rendering used only the catalogue's own functions and operators
    assert not result.ok and result.broken_at == 2 and "edited" in result.reason

"""``audit.collected``/``record_many``: many events, one append, the guarantees of ``record`` for each.

Serial path on both databases; group commit on PostgreSQL, uncontended (in the caller's
transaction) and contended (one multi-row outbox insert, appended by whoever holds the lock).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from django.db import connection, connections, transaction
from django.utils import timezone

from keyvault import audit
from keyvault.audit import Action, Actor
from keyvault.models import AuditEvent, AuditPendingEvent

ACTOR = Actor.system("collector")


def _calls() -> list[str]:
    return [details.get("call") for details in
            AuditEvent.objects.filter(actor=ACTOR.name).order_by("sequence").values_list("details", flat=True)]


def _record(call: str) -> AuditEvent:
    return audit.record(Action.OTHER, actor=ACTOR, details={"call": call})


@pytest.mark.django_db
def test_collected_events_are_appended_together_in_order_at_the_end(settings):
    settings.AUDIT_CHECKPOINT_INTERVAL = 4  # the one append crosses checkpoint positions
    with audit.collected() as pending:
        returned = [_record(f"c{n}") for n in range(10)]
        assert _calls() == [] and len(pending) == 10  # buffered, not written yet
        assert all(event.sequence is None for event in returned)
    assert _calls() == [f"c{n}" for n in range(10)]
    sequences = list(AuditEvent.objects.filter(actor=ACTOR.name).order_by("sequence").values_list("sequence", flat=True))
    assert sequences == list(range(sequences[0], sequences[0] + 10))  # one run of the chain, nothing between
    assert audit.verify_chain(use_witness=False).ok


@pytest.mark.django_db
def test_leaving_by_an_exception_writes_none_of_the_events():
    with pytest.raises(RuntimeError), audit.collected():
        _record("lost-1")
        _record("lost-2")
        raise RuntimeError("the call failed")
    assert _calls() == []


@pytest.mark.django_db
def test_events_of_a_nested_transaction_and_sequenced_ones_are_appended_at_once():
    with audit.collected():
        _record("buffered")
        with transaction.atomic():  # may roll back: its event must be able to roll back with it
            _record("nested")
        audit.record(Action.OTHER, actor=ACTOR, details={"call": "sequenced"}, sequenced=True)
        assert _calls() == ["nested", "sequenced"]
        with pytest.raises(ValueError), transaction.atomic():
            _record("rolled-back")
            raise ValueError
    assert _calls() == ["nested", "sequenced", "buffered"]


@pytest.mark.django_db
def test_nested_collected_blocks_append_once_with_the_outermost():
    with audit.collected():
        _record("outer")
        with audit.collected():
            _record("inner")
        assert _calls() == []
    assert _calls() == ["outer", "inner"]


@pytest.mark.django_db
def test_record_many_of_nothing_writes_nothing():
    before = audit.chain_position()
    assert audit.record_many([]) == []
    with audit.collected():
        pass
    assert audit.chain_position() == before


def _raw_connection() -> psycopg.Connection:
    db = connection.settings_dict
    return psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, dbname=db["NAME"],
                           user=db["USER"], autocommit=True)


@pytest.fixture
def group_commit(settings):
    if connection.vendor != "postgresql":
        pytest.fail("postgres-marked tests run only on PostgreSQL (scripts/test.sh deselects them elsewhere)")
    settings.AUDIT_GROUP_COMMIT = True
    settings.AUDIT_CHECKPOINT_INTERVAL = 7


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_uncontended_group_commit_appends_in_the_callers_transaction(group_commit, monkeypatch):
    monkeypatch.setattr(audit, "_contended_at", float("-inf"))  # no contention seen lately
    _record("genesis")  # the chain head exists (the first append ever creates it, through the outbox)
    assert audit.group_commit_active()
    with transaction.atomic():
        with audit.collected():
            for n in range(20):
                _record(f"u{n}")
        assert _calls() == ["genesis", *(f"u{n}" for n in range(20))]  # in the chain before the caller commits
        assert not AuditPendingEvent.objects.exists()
    assert audit.verify_chain(use_witness=False).ok


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_process_that_just_saw_contention_goes_straight_to_the_outbox(group_commit, monkeypatch):
    _record("genesis")  # the chain head exists
    # given this process found the appenders busy a moment ago
    monkeypatch.setattr(audit, "_contended_at", time.monotonic())
    with transaction.atomic():
        _record("skipped")
        # then its event went to the outbox without trying the lock (free now)
        assert _calls() == ["genesis"] and AuditPendingEvent.objects.count() == 1
    # and is in the chain once the caller has committed
    assert _calls() == ["genesis", "skipped"] and not AuditPendingEvent.objects.exists()

    # and a second later it tries again, and chains in its own transaction
    monkeypatch.setattr(audit, "_contended_at", time.monotonic() - audit.SKIP_TRIES_SECONDS)
    with transaction.atomic():
        _record("tried")
        assert _calls() == ["genesis", "skipped", "tried"]
    assert audit.verify_chain(use_witness=False).ok


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_contended_group_commit_writes_one_outbox_insert_and_returns_once_all_are_chained(group_commit):
    done = threading.Event()
    errors = []

    def call() -> None:
        try:
            with transaction.atomic(), audit.collected():
                for n in range(30):
                    _record(f"w{n}")
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()
            connections.close_all()

    with _raw_connection() as appender:  # another caller is appending: the events must go to the outbox
        appender.execute("SELECT pg_advisory_lock(%s)", [audit.APPEND_LOCK_KEY])
        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 30
        while AuditPendingEvent.objects.count() < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        # committed together in the outbox, and the caller still waits for them to be chained
        assert AuditPendingEvent.objects.count() == 30 and not done.is_set()
        appender.execute("SELECT pg_advisory_unlock(%s)", [audit.APPEND_LOCK_KEY])
        thread.join(30)

    assert errors == [] and done.is_set()
    assert _calls() == [f"w{n}" for n in range(30)]  # each once, in order
    assert not AuditPendingEvent.objects.exists()
    assert audit.verify_chain(use_witness=False).ok


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_contended_events_that_cannot_be_written_fail_the_call_with_nothing_written(group_commit):
    before = audit.chain_position()
    with _raw_connection() as blocker:
        blocker.execute("BEGIN")
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", [audit.APPEND_LOCK_KEY])
        blocker.execute("LOCK TABLE keyvault_auditpendingevent IN ACCESS EXCLUSIVE MODE")
        try:
            with pytest.raises(Exception, match="lock timeout"), transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL lock_timeout = '300ms'")
                with audit.collected():
                    _record("never-1")
                    _record("never-2")
        finally:
            blocker.execute("ROLLBACK")
    assert audit.chain_position() == before and _calls() == []
    assert not AuditPendingEvent.objects.exists()


def test_the_positionally_built_event_is_the_one_the_keyword_constructor_builds():
    fields = {"timestamp": timezone.now(), "actor": "system:tests", "action": "other", "target_type": "thing",
              "target_id": "7", "outcome": "success", "request_id": "r", "ip_address": "10.0.0.1",
              "details": {"a": 1}}
    built = audit._event_instance(fields, id=3, sequence=2, prev_hash="p" * 64, hash="h" * 64)
    expected = AuditEvent(pk=3, sequence=2, prev_hash="p" * 64, hash="h" * 64, **fields)
    names = [field.attname for field in AuditEvent._meta.concrete_fields]
    assert [getattr(built, name) for name in names] == [getattr(expected, name) for name in names]
    unsaved = audit._event_instance(fields)
    assert (unsaved.pk, unsaved.sequence, unsaved.prev_hash, unsaved.hash) == (None, None, "", "")

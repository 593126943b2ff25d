"""Events recorded outside any transaction (API calls) by concurrent threads of one process, on PostgreSQL.

They are appended in rounds (keyvault/audit/batcher.py): callers that arrive while a round is
appending go together into the next, one statement for all. Real PostgreSQL, real threads; the
chain head is held by another session so that callers demonstrably queue behind a round.
"""

import threading
import time
from collections import Counter

import psycopg
import pytest
from django.db import DatabaseError, connection, connections

from keyvault import audit
from keyvault.audit import Action, Actor
from keyvault.models import AuditEvent

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _postgres():
    if connection.vendor != "postgresql":
        pytest.fail("postgres-marked tests run only on PostgreSQL (scripts/test.sh deselects them elsewhere)")
    audit.record(Action.OTHER, actor=Actor.system("tests"), details={"call": "genesis"})  # the head row exists


def _raw_connection() -> psycopg.Connection:
    db = connection.settings_dict
    return psycopg.connect(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, dbname=db["NAME"], user=db["USER"])


def _record_in_threads(calls: list[str]) -> tuple[dict, dict, list[threading.Thread]]:
    events, errors = {}, {}

    def record(call: str) -> None:
        try:
            events[call] = audit.record(Action.OTHER, actor=Actor.system("tests"), details={"call": call})
        except Exception as exc:  # compared by the test
            errors[call] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=record, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    return events, errors, threads


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _held_head_then(queued: int, calls: list[str]):
    """Start ``calls`` in threads while another session holds the chain head; let go once ``queued`` wait behind the leader."""
    batcher = audit._own_statement_appends
    with _raw_connection() as holder:
        holder.execute("SELECT 1 FROM keyvault_auditchainhead WHERE id = 1 FOR UPDATE")
        events, errors, threads = _record_in_threads(calls)
        _wait_until(lambda: len(batcher._queue) == queued)
        holder.rollback()
    for thread in threads:
        thread.join(timeout=60)
    return events, errors


def test_callers_queued_behind_a_round_are_appended_in_one_statement_each_answered_with_its_event():
    batcher = audit._own_statement_appends
    rounds_before = batcher.rounds
    calls = [f"call-{n}" for n in range(12)]

    # when 12 threads record an event while the first round waits for the head
    events, errors = _held_head_then(11, calls)

    # then every call returned its own event, sequenced, and the chain holds each once
    assert errors == {}
    assert sorted(events) == sorted(calls)
    assert all(event.sequence and event.details == {"call": call} for call, event in events.items())
    in_chain = Counter(AuditEvent.objects.exclude(details__call="genesis").values_list("details__call", flat=True))
    assert in_chain == Counter(calls)
    # and they took two rounds: the leader's event alone, then the eleven others in one statement
    assert batcher.rounds - rounds_before == 2
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(DISTINCT xmin::text) FROM keyvault_auditevent WHERE details->>'call' <> 'genesis'")
        assert cursor.fetchone()[0] == 2
    result = audit.verify_chain(use_witness=False)
    assert result.ok, str(result)


def test_a_round_whose_statement_fails_fails_every_call_in_it_and_writes_none_of_them():
    with connection.cursor() as cursor:
        cursor.execute("CREATE FUNCTION test_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS "
                       "$$ BEGIN IF NEW.details->>'call' = 'poison' THEN RAISE EXCEPTION 'audit storage refused'; "
                       "END IF; RETURN NEW; END $$")
        cursor.execute("CREATE TRIGGER test_refuse_poison BEFORE INSERT ON keyvault_auditevent "
                       "FOR EACH ROW EXECUTE FUNCTION test_refuse_poison()")
    try:
        # given a leader's round held at the head, and three callers queued behind it, one refused by storage
        batcher = audit._own_statement_appends
        with _raw_connection() as holder:
            holder.execute("SELECT 1 FROM keyvault_auditchainhead WHERE id = 1 FOR UPDATE")
            lead, lead_errors, lead_threads = _record_in_threads(["lead"])
            _wait_until(lambda: batcher._leading)
            events, errors, threads = _record_in_threads(["good-1", "poison", "good-2"])
            _wait_until(lambda: len(batcher._queue) == 3)
            holder.rollback()
        for thread in lead_threads + threads:
            thread.join(timeout=60)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP FUNCTION test_refuse_poison() CASCADE")

    # then the leader's call succeeded; the three in the failed round each raised, and none of them is written
    assert not lead_errors and lead["lead"].sequence
    assert events == {} and sorted(errors) == ["good-1", "good-2", "poison"]
    assert all(isinstance(exc, DatabaseError) and "audit storage refused" in str(exc) for exc in errors.values())
    assert sorted(AuditEvent.objects.values_list("details__call", flat=True)) == ["genesis", "lead"]
    assert audit.verify_chain(use_witness=False).ok
    # and the next call appends as usual
    assert audit.record(Action.OTHER, actor=Actor.system("tests"), details={"call": "after"}).sequence

"""A batch unwrap reads its data keys once and appends its events once, with every guarantee of single calls.

The same mixed batch is sent as one call and as one call per item: the chain must get the
same events (action, target, outcome, details) in the same order, and the items the same
answers. Then: events that cannot be written fail the whole call, with no plaintext sent.
"""

from __future__ import annotations

import base64
from contextlib import contextmanager

import pytest
from django.db import connection

from keyvault import audit
from keyvault.api import services
from keyvault.api.views import PROBLEM_BASE
from keyvault.keys import services as key_services
from keyvault.models import AuditEvent, AuditPendingEvent, DataKey, KeyVersion

CTX = {"service": "billing"}
EVENT_FIELDS = ("actor", "action", "target_type", "target_id", "outcome", "details")


@pytest.fixture
def keys(api, system_actor, kek, other_kek):
    """A client of three KEKs (one later disabled, one whose v1 is disabled), a foreign client's data key,
    and a data key whose stored wrapping was damaged (the provider refuses it)."""
    off = key_services.create_kek(name="off-kek", actor=system_actor)
    spare = key_services.create_kek(name="spare-kek", actor=system_actor)
    _, token = services.create_client(name="billing", actor=system_actor, keks=["billing-kek", "off-kek", "spare-kek"],
                                      operations=["generate", "unwrap"], context_constraints={"service": ["billing"]})
    _, hr_token = services.create_client(name="hr", actor=system_actor, keks=["hr-kek"], operations=["generate"])

    def made(kek_name, tok=token, context=CTX):
        response = api.post(f"keks/{kek_name}/data-keys", {"context": context}, token=tok)
        assert response.status_code == 201, response.content
        return response.json()

    good, other_good, damaged = made("billing-kek"), made("billing-kek"), made("billing-kek")
    on_off, on_v1 = made("off-kek"), made("spare-kek")
    foreign = made("hr-kek", hr_token, {"service": "billing"})
    DataKey.objects.filter(pk=damaged["id"]).update(wrapped_key=b"\x01" * 60)
    key_services.disable_kek(off, actor=system_actor)
    key_services.rotate_kek_version(spare, actor=system_actor)
    key_services.set_version_state(spare, 1, KeyVersion.State.DISABLED, actor=system_actor, force=True, reason="test")
    items = [
        {"id": good["id"], "context": CTX},                       # ok
        {"id": 10**9, "context": CTX},                            # unknown: not-found (refusal event)
        {"id": foreign["id"], "context": CTX},                    # foreign: the same not-found
        {"id": good["id"], "context": {"service": "billing", "x": "y"}},  # wrong context: decryption-failed
        {"id": good["id"], "context": {"service": "hr"}},         # context the client may not use: 403
        {"id": damaged["id"], "context": CTX},                    # the provider refuses it: decryption-failed
        {"id": on_off["id"], "context": CTX},                     # disabled KEK: key-not-usable
        {"id": on_v1["id"], "context": CTX},                      # disabled version: key-not-usable
        {"id": 0, "context": CTX},                                # out of range: not-found
        {"id": other_good["id"], "context": CTX},                 # ok
    ]
    return token, items, {"good": good, "other_good": other_good}


def _events_after(sequence: int) -> list[tuple]:
    return list(AuditEvent.objects.filter(sequence__gt=sequence).order_by("sequence").values_list(*EVENT_FIELDS))


def _last_sequence() -> int:
    return audit.chain_position()[0]


def _single(api, token, item) -> dict:
    response = api.post(f"data-keys/{item['id']}/unwrap", {"context": item["context"]}, token=token)
    if response.status_code == 200:
        return {"id": item["id"], **response.json()}
    return {"error": response.json()}


def _same_events_and_answers(api, token, items, made) -> None:
    before = _last_sequence()
    batch = api.post("data-keys/unwrap", {"batch": items}, token=token)
    assert batch.status_code == 200, batch.content
    batch_events = _events_after(before)

    middle = _last_sequence()
    singles = [_single(api, token, item) for item in items]
    single_events = [event for event in _events_after(middle) if event[2:4] != ("api", "unwrap_data_key")]
    refusals = [event for event in _events_after(middle) if event[2:4] == ("api", "unwrap_data_key")]

    answers = batch.json()["batch"]
    assert [answer.get("error", {}).get("type", "ok").removeprefix(PROBLEM_BASE) for answer in answers] == [
        "ok", "not-found", "not-found", "decryption-failed", "forbidden-context", "decryption-failed",
        "key-not-usable", "key-not-usable", "not-found", "ok"]
    assert answers[0]["plaintext"] == made["good"]["plaintext"]
    assert answers[-1]["plaintext"] == made["other_good"]["plaintext"]
    assert [answer.get("plaintext") for answer in answers] == [answer.get("plaintext") for answer in singles]
    assert [answer.get("error") for answer in answers] == [answer.get("error") for answer in singles]
    # the same events, in item order: the refusals name the batch operation, the rest are identical
    assert [e for e in batch_events if e[2:4] != ("api", "unwrap_data_keys")] == single_events
    assert [(*e[:3], e[4], {**e[5], "operation": None}) for e in batch_events if e[2:4] == ("api", "unwrap_data_keys")] == [
        (*e[:3], e[4], {**e[5], "operation": None}) for e in refusals]
    # one event per item but the two key-not-usable ones (no event on the single path either)
    assert len(batch_events) == len(items) - 2
    assert [e[1] for e in batch_events] == [
        "datakey.unwrapped", "api.denied", "api.denied", "datakey.unwrapped", "api.denied", "datakey.unwrapped",
        "api.denied", "datakey.unwrapped"]
    assert audit.verify_chain(use_witness=False).ok


@pytest.mark.django_db
def test_a_mixed_batch_yields_the_answers_and_events_single_calls_do(api, keys):
    token, items, made = keys
    _same_events_and_answers(api, token, items, made)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_under_group_commit_a_mixed_batch_yields_the_events_single_calls_do(api, keys, settings):
    settings.AUDIT_GROUP_COMMIT = True
    assert audit.group_commit_active()
    token, items, made = keys
    _same_events_and_answers(api, token, items, made)
    assert not AuditPendingEvent.objects.exists()


@pytest.mark.django_db
def test_a_batch_reads_its_data_keys_and_their_version_states_in_one_query_whatever_its_size(api, keys, django_assert_max_num_queries):
    token, items, _ = keys
    queries = []
    for size in (1, 10):
        with django_assert_max_num_queries(100) as captured:
            assert api.post("data-keys/unwrap", {"batch": [items[0]] * size}, token=token).status_code == 200
        queries.append([q["sql"] for q in captured.captured_queries
                        if "keyvault_datakey" in q["sql"] or "keyvault_keyversion" in q["sql"]])
    assert len(queries[0]) == len(queries[1]) == 1
    assert "keyvault_keyversion" in queries[1][0]  # the version state, read in the same query


@contextmanager
def _audit_inserts_refused():
    """The chain cannot be written: a trigger refuses every new event (a full disk, a revoked grant)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("CREATE FUNCTION test_refuse_audit() RETURNS trigger LANGUAGE plpgsql AS "
                           "$$ BEGIN RAISE EXCEPTION 'audit storage refused'; END $$")
            cursor.execute("CREATE TRIGGER test_refuse_audit BEFORE INSERT ON keyvault_auditevent "
                           "FOR EACH ROW EXECUTE FUNCTION test_refuse_audit()")
            cursor.execute("CREATE TRIGGER test_refuse_audit BEFORE INSERT ON keyvault_auditpendingevent "
                           "FOR EACH ROW EXECUTE FUNCTION test_refuse_audit()")
        else:
            for table in ("keyvault_auditevent", "keyvault_auditpendingevent"):
                cursor.execute(f"CREATE TRIGGER test_refuse_{table} BEFORE INSERT ON {table} "
                               "BEGIN SELECT RAISE(ABORT, 'audit storage refused'); END")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("DROP FUNCTION test_refuse_audit() CASCADE")
            else:
                for table in ("keyvault_auditevent", "keyvault_auditpendingevent"):
                    cursor.execute(f"DROP TRIGGER test_refuse_{table}")


def _batch_fails_without_plaintext(api, token, items) -> None:
    before = _last_sequence()
    with _audit_inserts_refused(), pytest.raises(Exception, match="audit storage refused"):
        api.post("data-keys/unwrap", {"batch": [items[0], items[1], items[-1]]}, token=token)
    assert _last_sequence() == before and _events_after(before) == []
    assert not AuditPendingEvent.objects.exists()
    assert audit.verify_chain(use_witness=False).ok


@pytest.mark.django_db
def test_a_batch_whose_events_cannot_be_written_fails_whole(api, keys):
    token, items, _ = keys
    _batch_fails_without_plaintext(api, token, items)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_under_group_commit_a_batch_whose_events_cannot_be_written_fails_whole(api, keys, settings):
    settings.AUDIT_GROUP_COMMIT = True
    token, items, _ = keys
    _batch_fails_without_plaintext(api, token, items)


@pytest.mark.django_db
def test_plaintext_is_wiped_after_each_item(monkeypatch, api, keys):
    token, items, _ = keys
    handed_out = []
    unwrap = services.key_services.unwrap_data_key

    def keep(*args, **kwargs):
        plaintext = unwrap(*args, **kwargs)
        handed_out.append(plaintext)
        return plaintext

    monkeypatch.setattr(services.key_services, "unwrap_data_key", keep)
    answers = api.post("data-keys/unwrap", {"batch": [items[0], items[-1]]}, token=token).json()["batch"]
    assert [base64.b64decode(a["plaintext"]) != bytes(32) for a in answers] == [True, True]
    assert len(handed_out) == 2 and all(buffer == bytearray(len(buffer)) for buffer in handed_out)


GENERATE_ITEMS = [
    {"context": CTX, "owner_ref": "a"},
    {"context": {"service": "hr"}},           # a context the client may not use: 403 (refusal event)
    {"context": {"service": "billing", "n": "1"}, "purpose": "p" * 200, "owner_ref": "b"},
    {"context": {"service": "billing", "bad": "\ud800"}},  # not valid Unicode: 400, no event
    {"context": CTX, "owner_ref": "c"},
]


def _created_fields(events) -> list[tuple]:
    """A created event without what differs between two data keys made alike (the id)."""
    return [(e[0], e[1], e[2], e[4], e[5]) for e in events]


@pytest.mark.django_db
def test_a_generate_batch_registers_together_with_the_events_single_calls_record(api, billing):
    _, token = billing
    before = _last_sequence()
    answers = api.post("keks/billing-kek/data-keys", {"batch": GENERATE_ITEMS}, token=token).json()["batch"]
    batch_events = _events_after(before)
    middle = _last_sequence()
    singles = [api.post("keks/billing-kek/data-keys", item, token=token) for item in GENERATE_ITEMS]
    single_events = _events_after(middle)

    assert [a.get("error", {}).get("status") for a in answers] == [None, 403, None, 400, None]
    assert [s.status_code for s in singles] == [201, 403, 201, 400, 201]
    for answer, single in zip(answers, singles, strict=True):
        if "id" in answer:
            row, single_row = DataKey.objects.get(pk=answer["id"]), DataKey.objects.get(pk=single.json()["id"])
            assert bytes(row.wrapped_key) == base64.b64decode(answer["ciphertext"])
            assert (row.owner_ref, row.purpose, row.encryption_context) == (
                single_row.owner_ref, single_row.purpose, single_row.encryption_context)
            opened = api.post(f"data-keys/{answer['id']}/unwrap", {"context": row.encryption_context}, token=token)
            assert opened.json()["plaintext"] == answer["plaintext"]
    assert KeyVersion.objects.get(kek__name="billing-kek", number=1).data_keys == 6
    created = [e for e in batch_events if e[1] == "datakey.created"]
    assert [int(e[3]) for e in created] == [answers[0]["id"], answers[2]["id"], answers[4]["id"]]
    # the same events as the single calls: the created ones in item order, then the refusal
    assert _created_fields(created) == _created_fields([e for e in single_events if e[1] == "datakey.created"])
    assert [{**e[5], "operation": None} for e in batch_events if e[1] == "api.denied"] == [
        {**e[5], "operation": None} for e in single_events if e[1] == "api.denied"]
    assert [e[1] for e in batch_events] == ["datakey.created"] * 3 + ["api.denied"]
    assert [e[5]["reason"] for e in batch_events if e[1] == "api.denied"] == ["context"]
    assert audit.verify_chain(use_witness=False).ok


@pytest.mark.django_db
def test_a_generate_batch_on_a_disabled_kek_fails_every_item_and_registers_nothing(api, billing, kek, system_actor):
    _, token = billing
    key_services.disable_kek(kek, actor=system_actor)
    answers = api.post("keks/billing-kek/data-keys", {"batch": GENERATE_ITEMS[:1] * 3}, token=token).json()["batch"]
    assert [a["error"]["type"].removeprefix(PROBLEM_BASE) for a in answers] == ["key-not-usable"] * 3
    assert not DataKey.objects.exists()


@pytest.mark.django_db
def test_a_generate_batch_whose_events_cannot_be_written_registers_nothing(api, billing):
    _, token = billing
    before = _last_sequence()
    with _audit_inserts_refused(), pytest.raises(Exception, match="audit storage refused"):
        api.post("keks/billing-kek/data-keys", {"batch": GENERATE_ITEMS}, token=token)
    assert not DataKey.objects.exists()
    assert _last_sequence() == before and not AuditPendingEvent.objects.exists()
    assert KeyVersion.objects.get(kek__name="billing-kek", number=1).data_keys == 0

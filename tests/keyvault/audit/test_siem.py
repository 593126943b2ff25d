"""The SIEM pull endpoint: bearer tokens, the sequence cursor, bounded pages, re-verifiable events."""

from __future__ import annotations

import hashlib
from datetime import datetime

import pytest
from django.core.cache import cache
from django.urls import reverse

from keyvault import audit
from keyvault.audit import Actor, siem
from keyvault.models import AuditEvent, SiemConsumer
from tests.keyvault import make_role_user

pytestmark = pytest.mark.django_db
URL = "/siem/events"


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()


@pytest.fixture
def consumer():
    return siem.create_consumer(name="splunk", actor=Actor.system("tests"))


@pytest.fixture
def events():
    actor = Actor.system("tests")
    for i in range(6):
        audit.record(audit.Action.OTHER, actor=actor, target=("thing", str(i)), details={"i": i})


def get(client, token, **params):
    return client.get(URL, params, HTTP_AUTHORIZATION=f"Bearer {token}")


def test_only_the_token_hash_is_stored(consumer):
    record, token = consumer
    assert token.startswith("kvsiem_") and len(token) > 40
    assert record.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(SiemConsumer.objects.filter(pk=record.pk).values().get())
    event = AuditEvent.objects.filter(target_type="siemconsumer").get()
    assert event.action == audit.Action.SIEM_CONSUMER_CREATED and event.target_id == "splunk"
    assert event.details["before"] is None and event.details["after"]["active"] is True
    assert token not in str(event.details) and record.token_hash not in str(event.details)


def test_pages_follow_the_cursor_to_the_head(client, consumer, events):
    record, token = consumer
    head, head_hash = audit.chain_position()  # 1 consumer event + 6

    first = get(client, token, after=0, limit=3).json()
    assert [e["sequence"] for e in first["events"]] == [1, 2, 3]
    assert first["next_after"] == 3 and first["has_more"] is True
    assert first["chain_head"] == {"sequence": head, "hash": head_hash}

    second = get(client, token, after=first["next_after"], limit=3).json()
    assert [e["sequence"] for e in second["events"]] == [4, 5, 6]

    response = get(client, token, after=second["next_after"], limit=3)
    last = response.json()
    assert [e["sequence"] for e in last["events"]] == [7] and last["has_more"] is False
    assert response["Retry-After"] == str(siem.CAUGHT_UP_RETRY_SECONDS)

    empty = get(client, token, after=7).json()
    assert empty == {"events": [], "next_after": 7, "has_more": False, "chain_head": {"sequence": 7, "hash": head_hash},
                     "checkpoints": []}
    record.refresh_from_db()
    assert record.last_sequence == 7 and record.last_used_at is not None


def test_pages_carry_the_checkpoints_in_their_range(client, consumer, settings):
    # given checkpoints at #2, #4 and #6 (issue 12: the SIEM keeps its own copy of how far the chain got)
    from keyvault.audit.witness import WitnessEntry
    from keyvault.models import AuditCheckpoint

    settings.AUDIT_CHECKPOINT_INTERVAL = 2
    record, token = consumer
    for i in range(6):
        audit.record(audit.Action.OTHER, actor=Actor.system("tests"), details={"i": i})

    first = get(client, token, after=0, limit=3).json()
    second = get(client, token, after=3, limit=3).json()

    # then each page holds the checkpoints of exactly its events, in the witness file's format
    witnessed = {cp.sequence: WitnessEntry.of(cp).as_dict() for cp in AuditCheckpoint.objects.all()}
    assert first["checkpoints"] == [witnessed[2]]
    assert second["checkpoints"] == [witnessed[4], witnessed[6]]


def test_collector_can_reverify_the_chain_from_the_events(client, consumer, events):
    _, token = consumer

    page = get(client, token, limit=1000).json()["events"]

    prev = audit.GENESIS_HASH
    for event in page:
        fields = {k: v for k, v in event.items() if k != "hash"}
        fields["timestamp"] = datetime.strptime(event["timestamp"], "%Y-%m-%dT%H:%M:%S.%f%z")
        assert event["prev_hash"] == prev
        assert hashlib.sha256(audit.canonical_bytes(**fields)).hexdigest() == event["hash"]
        prev = event["hash"]


def test_limit_is_bounded_and_defaults():
    assert siem.parse_cursor({}) == (0, siem.DEFAULT_LIMIT)
    assert siem.parse_cursor({"after": "12", "limit": "5000"}) == (12, siem.MAX_LIMIT)


@pytest.mark.parametrize("params", [{"after": "-1"}, {"after": "abc"}, {"limit": "0"}, {"limit": "1e3"},
                                    {"after": "9" * 30}])
def test_bad_cursor_is_a_400(client, consumer, params):
    _, token = consumer

    response = get(client, token, **params)

    assert response.status_code == 400 and response.json()["error"] == "bad_request"


def test_missing_wrong_and_deactivated_tokens_get_401(client, consumer):
    record, token = consumer

    missing = client.get(URL)
    assert missing.status_code == 401 and missing["WWW-Authenticate"].startswith("Bearer")
    assert client.get(URL, HTTP_AUTHORIZATION=f"Basic {token}").status_code == 401
    assert get(client, token + "x").status_code == 401
    assert get(client, token).status_code == 200

    siem.set_active(record, active=False, actor=Actor.system("tests"))

    assert get(client, token).status_code == 401
    changed = AuditEvent.objects.get(action=audit.Action.SIEM_CONSUMER_CHANGED)
    assert (changed.details["before"], changed.details["after"]) == ({"active": True}, {"active": False})


def test_a_console_session_is_not_a_token(client, consumer):
    client.force_login(make_role_user("administrator"))
    assert client.get(URL).status_code == 401


def test_only_get_is_allowed(client, consumer):
    _, token = consumer
    assert client.post(URL, HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 405


def test_polling_too_fast_is_told_when_to_come_back(client, consumer, settings):
    settings.SIEM_RATE_LIMIT_PER_MINUTE = 2
    _, token = consumer

    assert get(client, token).status_code == 200
    assert get(client, token).status_code == 200
    response = get(client, token)

    assert response.status_code == 429 and 1 <= int(response["Retry-After"]) <= 60


def test_pulls_are_not_written_to_the_audit_log(client, consumer, events):
    _, token = consumer
    before = audit.chain_position()

    get(client, token)

    assert audit.chain_position() == before


# -- console management ----------------------------------------------------------------------------


def test_administrator_creates_a_consumer_and_sees_the_token_once(client):
    client.force_login(make_role_user("administrator"))

    response = client.post(reverse("admin:keyvault_siemconsumer_add"), {"name": "elastic"})

    assert response.status_code == 200
    record = SiemConsumer.objects.get(name="elastic")
    token = response.context["token"]
    assert token in response.content.decode()
    assert record.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert response["Cache-Control"].count("no-store") == 1 or "no-cache" in response["Cache-Control"]
    page = client.get(reverse("admin:keyvault_siemconsumer_change", args=[record.pk])).content.decode()
    assert token not in page and record.token_hash[:12] in page
    assert get(client, token).status_code == 200


def test_duplicate_consumer_name_is_a_form_error(client, consumer):
    client.force_login(make_role_user("administrator"))

    response = client.post(reverse("admin:keyvault_siemconsumer_add"), {"name": "splunk"})

    assert response.status_code == 200 and "already exists" in response.content.decode()
    assert SiemConsumer.objects.count() == 1


def test_administrator_deactivates_a_consumer_through_the_service(client, consumer):
    record, token = consumer
    client.force_login(make_role_user("administrator"))

    response = client.post(reverse("admin:keyvault_siemconsumer_change", args=[record.pk]), {})

    assert response.status_code == 302
    record.refresh_from_db()
    assert record.active is False
    assert AuditEvent.objects.filter(action=audit.Action.SIEM_CONSUMER_CHANGED, actor="user:administrator",
                                     details__after={"active": False}).exists()
    assert get(client, token).status_code == 401


def test_auditors_cannot_manage_consumers(client, consumer):
    record, _ = consumer
    client.force_login(make_role_user("auditor"))

    assert client.get(reverse("admin:keyvault_siemconsumer_changelist")).status_code == 200
    assert client.get(reverse("admin:keyvault_siemconsumer_add")).status_code == 403
    assert client.post(reverse("admin:keyvault_siemconsumer_change", args=[record.pk]), {}).status_code == 403

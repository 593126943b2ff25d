"""A batch under audit group commit is one transaction: every item's event in the chain, once, before the answer."""

import pytest
from django.db import connection

from keyvault import audit
from keyvault.models import AuditEvent, AuditPendingEvent

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

CTX = {"service": "billing"}


@pytest.fixture(autouse=True)
def _group_commit(settings):
    if connection.vendor != "postgresql":
        pytest.fail("postgres-marked tests run only on PostgreSQL (scripts/test.sh deselects them elsewhere)")
    settings.AUDIT_GROUP_COMMIT = True


def test_a_batch_unwrap_chains_one_event_per_item_before_answering(api, billing):
    _, token = billing
    made = api.post("keks/billing-kek/data-keys", {"batch": [{"context": CTX}] * 20}, token=token).json()["batch"]
    ids = [item["id"] for item in made]
    before = AuditEvent.objects.filter(action="datakey.unwrapped").count()

    answer = api.post("data-keys/unwrap", {"batch": [{"id": i, "context": CTX} for i in ids] + [
        {"id": 10**9, "context": CTX}]}, token=token)

    assert answer.status_code == 200
    items = answer.json()["batch"]
    assert [item["plaintext"] for item in items[:-1]] == [item["plaintext"] for item in made]
    assert items[-1]["error"]["status"] == 404
    # in the chain (not only the outbox) by the time the answer came back
    unwrapped = AuditEvent.objects.filter(action="datakey.unwrapped", actor="api:billing")
    assert unwrapped.count() - before == len(ids)
    assert sorted(int(e.target_id) for e in unwrapped) == sorted(ids)
    assert AuditEvent.objects.filter(action="api.denied", actor="api:billing").count() == 1
    assert AuditPendingEvent.objects.count() == 0
    assert audit.group_commit_active()

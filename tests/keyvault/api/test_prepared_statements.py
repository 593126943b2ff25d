"""The API's two statements per call are prepared on PostgreSQL (keyvault/models/prepared.py)."""

import pytest
from django.db import connection

from keyvault.api import services

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
CTX = {"service": "billing"}


def test_the_apis_data_key_read_and_audit_append_are_prepared_after_a_few_unwraps(api, system_actor, kek, served_in_process):
    _, token = services.create_client(name="billing", actor=system_actor, keks=[kek.name], operations=["generate", "unwrap"],
                                      context_constraints={"service": ["billing"]})
    made = api.post(f"keks/{kek.name}/data-keys", {"context": CTX}, token=token).json()
    for _ in range(7):
        answer = api.post(f"data-keys/{made['id']}/unwrap", {"context": CTX}, token=token)
        assert answer.status_code == 200 and answer.json()["plaintext"] == made["plaintext"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        statements = [statement for (statement,) in cursor.fetchall()]
    assert any('FROM "keyvault_datakey" d' in statement and "ANY($2::bigint[])" in statement for statement in statements)
    assert any("keyvault_audit_append($1::boolean" in statement for statement in statements)

"""Schemathesis against the live OpenAPI schema: no 500s, and every answer conforms to the schema.

The application is called in process (WSGI) with a real client token, so generated requests reach
the endpoints behind authentication, not only the 401 in front of them. (Schemathesis' own pytest
integration does not run under this pytest, so each operation's strategy is driven by Hypothesis here.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from keyvault.api import services
from keyvault.audit import Actor
from keyvault.wsgi import application

pytestmark = pytest.mark.django_db

EXAMPLES_PER_OPERATION = 30
#: No 500s, and every status, content type, header and body is one the schema declares. (Not the
#: "schema-valid data is accepted" checks: a context the client may not use is schema-valid and 403.)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture
def api_schema(served_in_process):
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", application)


@pytest.fixture
def a_data_key(billing):
    client, _ = billing
    row, plaintext = services.generate_data_key(client, "billing-kek", actor=Actor.system("tests"),
                                                context={"service": "billing"})
    plaintext[:] = bytes(len(plaintext))
    return row


def test_every_operation_conforms_to_the_schema(api_schema, billing, a_data_key):
    _, token = billing
    headers = {"Authorization": f"Bearer {token}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 8
    checked = []

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def conforms(case):
            case.call_and_validate(headers=headers, checks=CHECKS)

        conforms()
        checked.append(operation.label)

    assert len(checked) == len(operations)

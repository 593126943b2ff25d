"""docs/ops/secrets.md shows each managed-secret type's configuration exactly as its schema defines it."""

from __future__ import annotations

import re

import pytest

from rotation.executors import EXECUTORS, executor_for
from tests.docs.examples import ROOT

SECRETS_DOC = ROOT / "docs" / "ops" / "secrets.md"


def _shown_table(secret_type: str) -> str:
    text = SECRETS_DOC.read_text()
    match = re.search(rf"^<!-- schema:{secret_type} -->\n((?:\|.*\n)+)", text, re.MULTILINE)
    assert match, f"secrets.md has no table after <!-- schema:{secret_type} -->"
    return match.group(1).rstrip("\n")


@pytest.mark.parametrize("secret_type", sorted(EXECUTORS))
def test_the_table_in_the_doc_is_the_schema(secret_type):
    # given the table the operator reads, and the schema the form, the CLI and the executor use
    # then they are the same (regenerate with: python manage.py secret schema TYPE)
    assert _shown_table(secret_type) == executor_for(secret_type).schema.markdown_table()


#: The application secret types this part of secrets.md walks through (Keyvault's own, such as its Vault
#: secret_id, have their runbooks in keyvault-secrets.md; their schema table is still required above).
WALKED_THROUGH = ("generic", "cookie_signing", "tls_certificate", "oauth_client_secret", "database_credential")


def test_every_application_type_has_a_walkthrough_a_fallback_and_an_emergency_in_the_doc():
    text = SECRETS_DOC.read_text()
    section = text[text.index("## Managed secret types"):text.index("## Envelope encryption")]
    for secret_type in WALKED_THROUGH:
        part = section[section.index(f"<!-- schema:{secret_type} -->"):]
        part = part[: part.find("\n### ")] if "\n### " in part else part
        assert "rotation start --secret" in part, secret_type
        assert "**Emergency" in part or "emergency run" in part, secret_type
        assert "**By hand" in part, secret_type

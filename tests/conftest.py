"""Suite-wide fixtures. Backend harnesses for the KMS contract suite load as plugins."""

import pytest

from tests.kms.backends import BACKEND_MODULES

pytest_plugins = BACKEND_MODULES


def pytest_configure(config):
    _permit_audit_truncate_in_test_flush()


def _permit_audit_truncate_in_test_flush() -> None:
    """Let the test runner's database flush empty the append-only audit table.

    On PostgreSQL a trigger refuses TRUNCATE of the audit table unless the session
    sets ``keyvault.allow_audit_truncate`` (migration 0002). Transactional tests
    flush every table between tests; only that flush gets the setting.
    """
    from django.db.backends.postgresql.operations import DatabaseOperations

    original = DatabaseOperations.execute_sql_flush
    if getattr(original, "keyvault_permits_audit_truncate", False):
        return

    def execute_sql_flush(self, sql_list):
        return original(self, ["SET LOCAL keyvault.allow_audit_truncate = 'on'", *sql_list])

    execute_sql_flush.keyvault_permits_audit_truncate = True
    DatabaseOperations.execute_sql_flush = execute_sql_flush


@pytest.fixture
def system_actor():
    from keyvault.audit import Actor

    return Actor.system("tests")


def is_postgres() -> bool:
    from django.db import connection

    return connection.vendor == "postgresql"

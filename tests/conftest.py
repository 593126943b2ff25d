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


@pytest.fixture(autouse=True)
def _fresh_local_keyring(request, tmp_path_factory):
    """Each test gets its own local KMS keyring, as its database is rolled back too."""
    if "settings" not in request.fixturenames and not _uses_django(request):
        yield
        return
    from django.conf import settings as django_settings
    from django.test import override_settings

    kms = {**django_settings.KMS, "providers": {**django_settings.KMS["providers"]}}
    if "local" in kms["providers"]:
        keyring = tmp_path_factory.mktemp("keyring") / "local-kms.keyring"
        kms["providers"]["local"] = {**kms["providers"]["local"], "keyring_path": str(keyring)}
    with override_settings(KMS=kms, LOCAL_KMS_KEYRING=kms["providers"].get("local", {}).get("keyring_path")):
        yield


def _uses_django(request) -> bool:
    return request.node.get_closest_marker("django_db") is not None or any(
        name in request.fixturenames for name in ("db", "transactional_db", "live_server", "client", "admin_client")
    )


@pytest.fixture
def system_actor():
    from keyvault.audit import Actor

    return Actor.system("tests")


def is_postgres() -> bool:
    from django.db import connection

    return connection.vendor == "postgresql"

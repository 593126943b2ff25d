"""Suite-wide fixtures. Backend harnesses for the KMS contract suite load as plugins."""

import pytest

from tests.keyvault.kms.backends import BACKEND_MODULES

pytest_plugins = BACKEND_MODULES


def pytest_configure(config):
    from tests.audit_owner import install_flush_as_owner

    # Transactional tests flush every table between tests; the audit tables refuse that to
    # everyone but their owner, so the flush acts as the owner (see tests/audit_owner.py).
    install_flush_as_owner()


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

"""GCP Secret Manager source against the local emulator of the documented REST API."""

from __future__ import annotations

import json
import urllib.request

import pytest

from keyvault.secrets import SecretAccessDenied, SecretNotFound, SecretSourceUnavailable
from keyvault.secrets.gcp_sm import GCPSecretManagerSource
from tests.keyvault.secrets.conftest import unique
from tests.servers.gcp_secretmanager import SecretManagerEmulator, crc32c


def _get(emulator, name: str) -> dict:
    with urllib.request.urlopen(f"{emulator.url}/v1/{name}", timeout=5) as response:
        return json.loads(response.read())


def test_crc32c_known_answer():
    # RFC 3720 B.4: CRC-32C of 32 zero bytes.
    assert crc32c(bytes(32)) == 0x8A9136AA


def test_versions_are_added_with_a_client_checksum(gcp_secret_source, secretmanager_emulator):
    secret_id = unique("kvtest-")

    written = gcp_secret_source.write(secret_id, "payload")

    version = _get(secretmanager_emulator, f"projects/kv-test/secrets/{secret_id}/versions/{written.version}")
    assert version["clientSpecifiedPayloadChecksum"] is True and version["state"] == "ENABLED"


def test_payload_damaged_in_transit_is_refused(gcp_secret_source, secretmanager_emulator):
    secret_id = unique("kvtest-")
    gcp_secret_source.write(secret_id, "intact value")
    secretmanager_emulator.corrupt_next_payload()

    with pytest.raises(SecretSourceUnavailable, match="CRC32C"):
        gcp_secret_source.read(secret_id)
    assert gcp_secret_source.read(secret_id).value == "intact value"


def test_destroyed_version_is_listed_and_unreadable(gcp_secret_source):
    secret_id = unique("kvtest-")
    gcp_secret_source.write(secret_id, "one")
    gcp_secret_source.write(secret_id, "two")

    gcp_secret_source.delete_version(secret_id, "1")

    assert [(v.version, v.state, v.current) for v in gcp_secret_source.list_versions(secret_id)] == [
        ("1", "destroyed", False),
        ("2", "enabled", True),
    ]
    with pytest.raises(SecretNotFound):
        gcp_secret_source.read(secret_id, version="1")


def test_json_field_and_full_names(gcp_secret_source):
    secret_id = unique("kvtest-")
    gcp_secret_source.write(secret_id + "#username", "app")
    gcp_secret_source.write(f"projects/kv-test/secrets/{secret_id}#password", "pw")

    assert gcp_secret_source.read(secret_id + "#username").value == "app"
    assert json.loads(gcp_secret_source.read(secret_id).value) == {"username": "app", "password": "pw"}


def test_permission_denied_is_access_denied(gcp_secret_source, secretmanager_emulator):
    secretmanager_emulator.fail_next("PERMISSION_DENIED")

    with pytest.raises(SecretAccessDenied):
        gcp_secret_source.read(unique("kvtest-"))


def test_outage_is_unavailable_and_unhealthy():
    emulator = SecretManagerEmulator().start()
    source = GCPSecretManagerSource("kv-test", endpoint=emulator.url, anonymous_credentials=True, timeout=2)
    emulator.stop()

    with pytest.raises(SecretSourceUnavailable):
        source.read("anything")
    assert source.health_check()[0] is False

"""Vault KV v2 source on a real OpenBao dev server: fields, CAS, destroyed versions, policies."""

from __future__ import annotations

import pytest

from keyvault.secrets import (
    SecretAccessDenied,
    SecretConflict,
    SecretNotFound,
    SecretSourceConfigurationError,
    SecretSourceUnavailable,
)
from keyvault.secrets.vault_kv import VaultKVSource
from tests.keyvault.secrets.conftest import unique
from tests.servers.moto import free_port


def test_fields_of_one_kv_secret_share_versions(vault_secret_source, openbao_server):
    path = unique("kvtest/")
    vault_secret_source.write(f"{path}#username", "app")

    written = vault_secret_source.write(f"{path}#password", "pw-1")

    assert written.version == "2"
    stored = openbao_server.request("GET", f"secret/data/{path}")["data"]["data"]
    assert stored == {"username": "app", "password": "pw-1"}
    assert vault_secret_source.read(path + "#username").value == "app"
    with pytest.raises(SecretNotFound):
        vault_secret_source.read(path + "#nope")


def test_destroyed_version_is_listed_as_destroyed_and_unreadable(vault_secret_source, openbao_server):
    path = unique("kvtest/")
    vault_secret_source.write(path, "one")
    vault_secret_source.write(path, "two")

    vault_secret_source.delete_version(path, "1")

    metadata = openbao_server.request("GET", f"secret/metadata/{path}")["data"]
    assert metadata["versions"]["1"]["destroyed"] is True  # destroyed, not soft-deleted
    assert [(v.version, v.state, v.current) for v in vault_secret_source.list_versions(path)] == [
        ("1", "destroyed", False),
        ("2", "enabled", True),
    ]
    with pytest.raises(SecretNotFound):
        vault_secret_source.read(path, version="1")


def test_concurrent_change_is_a_conflict_not_a_lost_update(vault_secret_source, openbao_server):
    # given a writer that read version 1, then someone else wrote version 2
    path = unique("kvtest/")
    vault_secret_source.write(path + "#a", "1")

    class SlowWriter(VaultKVSource):
        def _request(self, method, api_path, payload=None, *, what):
            result = super()._request(method, api_path, payload, what=what)
            if method == "GET" and "/data/" in api_path:
                openbao_server.request("POST", f"secret/data/{path}", {"data": {"a": "1", "b": "theirs"}})
            return result

    slow = SlowWriter(openbao_server.addr, vault_secret_source.auth)

    # when it writes, then the CAS check refuses and their change survives
    with pytest.raises(SecretConflict):
        slow.write(path + "#a", "mine")
    assert vault_secret_source.read(path + "#b").value == "theirs"


def test_token_without_policy_is_access_denied(openbao_server):
    path = unique("kvtest/")
    openbao_server.write_policy("kv-read-nothing", 'path "secret/data/elsewhere/*" { capabilities = ["read"] }')
    token = openbao_server.create_token(["kv-read-nothing"])
    source = VaultKVSource.from_config({"addr": openbao_server.addr, "token": token})

    with pytest.raises(SecretAccessDenied):
        source.read(path)


def test_unreachable_vault_is_unavailable_and_unhealthy():
    source = VaultKVSource.from_config({"addr": f"http://127.0.0.1:{free_port()}", "token": "t", "timeout": 2})

    with pytest.raises(SecretSourceUnavailable):
        source.read("anything")
    assert source.health_check()[0] is False


def test_missing_auth_is_a_configuration_error():
    with pytest.raises(SecretSourceConfigurationError, match="HMD_VAULT_TOKEN"):
        VaultKVSource.from_config({"addr": "http://127.0.0.1:8200"})


def test_token_never_in_repr(vault_secret_source, openbao_server):
    assert openbao_server.root_token not in repr(vault_secret_source)

"""A Vault Transit KEK whose OpenBao is down: the API answers 503 with Retry-After, the client waits it out, then raises Unavailable."""

from __future__ import annotations

import time

import pytest

from keyvault_client import KeyvaultClient, Unavailable
from tests.keyvault_client.conftest import BILLING
from tests.servers.keyvault import running_keyvault
from tests.servers.openbao import running_openbao

pytestmark = pytest.mark.slow


def test_a_provider_outage_is_retried_then_raised_as_unavailable(tmp_path):
    with running_openbao() as bao:
        bao.enable_secrets_engine("transit", "transit")
        with running_keyvault(tmp_path / "instance", HMD_VAULT_ADDR=bao.addr, HMD_VAULT_TOKEN=bao.root_token,
                              HMD_VAULT_TIMEOUT="2") as live:
            live.manage("kms", "create-key", "vault-kek", "--provider", "vault")
            token = live.create_client("app", "vault-kek", context_require=("service=billing",), rate_limit=0)
            client = KeyvaultClient(live.url, token, retries=1, deadline=30)
            key = client.generate_data_key("vault-kek", BILLING)
            assert client.unwrap(key.id, BILLING) == key.plaintext
            # when OpenBao goes away
            bao.stop()
            started = time.monotonic()
            with pytest.raises(Unavailable) as unavailable:
                client.unwrap(key.id, BILLING)
            # then the 503 was retried once, no sooner than its Retry-After, and then raised
            error = unavailable.value
            assert (error.status, error.code) == (503, "provider-unavailable")
            assert error.retry_after >= 1 and client.retried == 1
            assert time.monotonic() - started >= error.retry_after

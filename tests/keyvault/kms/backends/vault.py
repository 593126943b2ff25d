"""The Vault Transit provider against a real OpenBao dev server.

The provider holds a token with nothing but the documented policy
(:func:`keyvault.kms.vault.policy_hcl`), so passing the contract suite also
proves that policy is sufficient. ``broken_provider`` points at a closed port.
"""

import pytest

from keyvault.kms.vault import TokenAuth, VaultTransitProvider, policy_hcl
from tests.keyvault.kms.harness import Harness, vault_version

pytest_plugins = ["tests.servers.openbao"]

NAME = "vault"
POLICY_NAME = "keyvault-transit"


def closed_port_provider() -> VaultTransitProvider:
    """A provider whose Vault address has nothing listening: connection refused at once."""
    from tests.servers.openbao import free_port_pair  # imported late: pytest loads the module as a plugin first

    return VaultTransitProvider(f"http://127.0.0.1:{free_port_pair()}", TokenAuth("s.unused"), timeout=2)


@pytest.fixture(scope="session")
def vault_policy_token(openbao_server) -> str:
    """A token on the shared OpenBao server holding only the documented Transit policy."""
    openbao_server.write_policy(POLICY_NAME, policy_hcl("transit"))
    return openbao_server.create_token([POLICY_NAME], ttl="4h")


@pytest.fixture(scope="session")
def vault_harness(openbao_server, vault_policy_token):
    provider = VaultTransitProvider(openbao_server.addr, TokenAuth(vault_policy_token), timeout=5)
    yield Harness(provider=provider, broken_provider=closed_port_provider, name_version=vault_version)

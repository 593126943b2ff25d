"""The PKCS#11 provider, through python-pkcs11, against a throwaway SoftHSM2 token."""

import pytest

from keyvault.kms.pkcs11 import PKCS11Provider
from tests.keyvault.kms.harness import Harness, version_after_key_id

pytest_plugins = ["tests.servers.softhsm"]

NAME = "pkcs11"


@pytest.fixture(scope="session")
def pkcs11_harness(softhsm):
    token = softhsm.token()
    provider = PKCS11Provider(softhsm.library, token.label, token.pin)

    def broken() -> PKCS11Provider:
        # The real module, but no token by that label: like an HSM partition that is gone.
        return PKCS11Provider(softhsm.library, "keyvault-no-such-token", token.pin)

    yield Harness(provider=provider, broken_provider=broken, name_version=version_after_key_id, broken_is_down=False)

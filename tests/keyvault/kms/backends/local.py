"""The local AES-256-GCM provider, on a keyring file in a temporary folder."""

import pytest

from keyvault.kms.local import LocalKMSProvider, generate_master_key
from tests.keyvault.kms.harness import Harness, version_after_key_id

NAME = "local"


@pytest.fixture(scope="session")
def local_harness(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local-kms")
    master_key = generate_master_key()
    provider = LocalKMSProvider(folder / "keyring", master_key)

    def broken() -> LocalKMSProvider:
        # A keyring that exists but is a directory: unreadable, like a bad mount.
        unreadable = folder / "unreadable"
        unreadable.mkdir(exist_ok=True)
        return LocalKMSProvider(unreadable, master_key)

    yield Harness(provider=provider, broken_provider=broken, name_version=version_after_key_id, broken_is_down=False)

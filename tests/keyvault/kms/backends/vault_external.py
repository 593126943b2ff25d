"""The Vault Transit provider against a real Vault of yours, when one is configured.

Set ``HMD_TEST_VAULT_ADDR`` and ``HMD_TEST_VAULT_TOKEN`` (a token holding at
least :func:`keyvault.kms.vault.policy_hcl`, plus ``list`` on
``<mount>/keys`` for the clean-up) and the whole contract suite runs against
that server as the ``vault_external`` backend. Optional:
``HMD_TEST_VAULT_MOUNT`` (default ``transit``; the engine must be mounted),
``HMD_TEST_VAULT_NAMESPACE``, ``HMD_TEST_VAULT_CACERT``. Keys are named
``contract-<random>-<n>`` and destroyed when the session ends.

Without ``HMD_TEST_VAULT_ADDR`` the module sets ``AVAILABLE = False`` and the
contract suite generates no tests for it (see ``tests/keyvault/kms/backends/__init__.py``),
so an unconfigured optional backend shows up as neither a skip nor a failure.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request

import pytest

from keyvault.kms.vault import VaultTransitProvider
from tests.keyvault.kms.harness import Harness, vault_version

NAME = "vault_external"
ADDR = os.environ.get("HMD_TEST_VAULT_ADDR", "")
AVAILABLE = bool(ADDR)


def _options() -> dict:
    token = os.environ.get("HMD_TEST_VAULT_TOKEN", "")
    if not token:
        raise RuntimeError("HMD_TEST_VAULT_ADDR is set but HMD_TEST_VAULT_TOKEN is not")
    return {
        "addr": ADDR,
        "token": token,
        "mount": os.environ.get("HMD_TEST_VAULT_MOUNT", "transit"),
        "namespace": os.environ.get("HMD_TEST_VAULT_NAMESPACE", ""),
        "ca_cert": os.environ.get("HMD_TEST_VAULT_CACERT", ""),
        "timeout": 10.0,
    }


def _list_keys(options: dict) -> list[str]:
    """LIST ``<mount>/keys`` with plain urllib (the provider has no listing call)."""
    request = urllib.request.Request(f"{options['addr'].rstrip('/')}/v1/{options['mount']}/keys", method="LIST")
    request.add_header("X-Vault-Token", options["token"])
    if options["namespace"]:
        request.add_header("X-Vault-Namespace", options["namespace"])
    context = ssl.create_default_context(cafile=options["ca_cert"] or None)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return json.loads(response.read())["data"]["keys"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # no keys at all
            return []
        raise


@pytest.fixture(scope="session")
def vault_external_harness():
    from tests.keyvault.kms.backends.vault import closed_port_provider  # imported late: loaded as a plugin first

    options = _options()
    harness = Harness(provider=VaultTransitProvider.from_config(options), broken_provider=closed_port_provider,
                      name_version=vault_version)
    yield harness
    for name in _list_keys(options):
        if name.startswith(harness.key_prefix + "-"):
            harness.provider.destroy_key(name)

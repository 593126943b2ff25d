"""A live Keyvault (gunicorn on a scratch instance) shared by this folder's tests, with two KEKs."""

from __future__ import annotations

import httpx
import pytest

from tests.servers.keyvault import running_keyvault

BILLING = {"service": "billing"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with running_keyvault(tmp_path_factory.mktemp("keyvault") / "instance") as keyvault:
        keyvault.manage("kms", "create-key", "billing-kek")
        keyvault.manage("kms", "create-key", "hr-kek")
        yield keyvault


@pytest.fixture(scope="module")
def token(live):
    """A client of billing-kek for every operation, in contexts whose service is billing."""
    return live.create_client("billing", "billing-kek", context_require=("service=billing",), rate_limit=0)


class CountingTransport(httpx.HTTPTransport):
    """The real HTTP transport, counting the requests that reach the server."""

    def __init__(self):
        super().__init__()
        self.requests = 0

    def handle_request(self, request):
        self.requests += 1
        return super().handle_request(request)

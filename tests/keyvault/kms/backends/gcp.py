"""Google Cloud KMS, through the real google-cloud-kms client (REST transport).

The server is ``tests.servers.gcp_kms``: an emulator of the documented Cloud KMS
v1 REST API, written from Google's public REST reference, listening on a free
127.0.0.1 port for the session.
"""

import socket
import uuid

import pytest

from keyvault.kms.gcp import GCPKMSProvider
from tests.keyvault.kms.harness import Harness, version_after_key_id
from tests.servers.gcp_kms import CloudKMSEmulator

NAME = "gcp"


@pytest.fixture(scope="session")
def gcp_emulator():
    emulator = CloudKMSEmulator().start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def gcp_harness(gcp_emulator):
    provider = GCPKMSProvider(
        project="keyvault-test",
        location="global",
        key_ring=f"contract-{uuid.uuid4().hex[:8]}",
        endpoint=gcp_emulator.url,
        anonymous_credentials=True,
        timeout=5.0,
    )
    # A port that is bound but never listens: connections are refused at once,
    # and nothing else can take the port while the session runs.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]

    def broken() -> GCPKMSProvider:
        return GCPKMSProvider(
            project="keyvault-test",
            key_ring="unreachable",
            endpoint=f"http://127.0.0.1:{closed_port}",
            anonymous_credentials=True,
            timeout=0.5,
        )

    try:
        yield Harness(provider=provider, broken_provider=broken, name_version=version_after_key_id)
    finally:
        closed.close()

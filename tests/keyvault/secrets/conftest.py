"""Harnesses for the secret-source contract suite: one fixture per backend.

Each ``<name>_secret_harness`` fixture yields a :class:`SecretHarness` around
a real source talking to a real server (OpenBao, moto) or a local server
(Cloud Secret Manager emulator, Kubernetes API server) on 127.0.0.1.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from keyvault.secrets import SecretSource
from keyvault.secrets.env import EnvSource
from keyvault.secrets.files import FileSource

# openbao_server and moto_server come from tests.servers.*, loaded as plugins by the root conftest.


@dataclass
class SecretHarness:
    source: SecretSource
    #: Returns a path nobody used yet in this source.
    new_path: Callable[[], str]
    #: Puts a value in place from outside the source (for read-only sources).
    seed: Callable[[str, str], None] | None = None
    extra: dict = field(default_factory=dict)

    def put(self, path: str, value: str) -> None:
        if self.seed is not None:
            self.seed(path, value)
        else:
            self.source.write(path, value)


def unique(prefix: str = "s") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.fixture
def env_secret_harness(monkeypatch):
    source = EnvSource()
    return SecretHarness(
        source=source,
        new_path=lambda: unique("TEST_").upper(),
        seed=lambda path, value: monkeypatch.setenv(source.variable(path), value),
    )


@pytest.fixture
def file_secret_harness(tmp_path):
    return SecretHarness(source=FileSource(tmp_path / "secrets"), new_path=lambda: unique("app/"))


@pytest.fixture(scope="session")
def vault_secret_source(openbao_server):
    from keyvault.secrets.vault_kv import VaultKVSource

    return VaultKVSource.from_config({"addr": openbao_server.addr, "token": openbao_server.root_token})


@pytest.fixture
def vault_secret_harness(vault_secret_source):
    return SecretHarness(source=vault_secret_source, new_path=lambda: unique("kvtest/") + "#password")


@pytest.fixture(scope="session")
def aws_secret_source(moto_server):
    from keyvault.secrets.aws_sm import AWSSecretsManagerSource

    return AWSSecretsManagerSource(region=moto_server.region, endpoint_url=moto_server.endpoint_url)


@pytest.fixture
def aws_secret_harness(aws_secret_source):
    return SecretHarness(source=aws_secret_source, new_path=lambda: unique("kvtest/"))


@pytest.fixture(scope="session")
def secretmanager_emulator():
    from tests.servers.gcp_secretmanager import SecretManagerEmulator

    with SecretManagerEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def gcp_secret_source(secretmanager_emulator):
    from keyvault.secrets.gcp_sm import GCPSecretManagerSource

    return GCPSecretManagerSource(
        "kv-test", endpoint=secretmanager_emulator.url, anonymous_credentials=True, timeout=5
    )


@pytest.fixture
def gcp_secret_harness(gcp_secret_source):
    return SecretHarness(source=gcp_secret_source, new_path=lambda: unique("kvtest-"))


@pytest.fixture(scope="session")
def k8s_api():
    from tests.servers.k8s_api import K8sAPIServer

    with K8sAPIServer() as server:
        yield server


@pytest.fixture
def k8s_token_file(k8s_api, tmp_path):
    path = tmp_path / "serviceaccount-token"
    path.write_text(k8s_api.add_token({"keyvault", "other"}) + "\n")
    return path


@pytest.fixture
def k8s_secret_source(k8s_api, k8s_token_file):
    from keyvault.secrets.kubernetes import KubernetesSecretSource

    return KubernetesSecretSource(k8s_api.url, namespace="keyvault", token_path=str(k8s_token_file), timeout=5)


@pytest.fixture
def k8s_secret_harness(k8s_secret_source):
    return SecretHarness(source=k8s_secret_source, new_path=lambda: unique("kvtest-") + "#password")

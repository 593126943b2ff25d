"""Kubernetes Secrets through the API (local API server): resourceVersion, 409, 401/403, token rotation."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request

import pytest

from keyvault.secrets import (
    CurrentVersionError,
    SecretAccessDenied,
    SecretConflict,
    SecretNotFound,
    SecretSourceUnavailable,
)
from keyvault.secrets.kubernetes import KubernetesSecretSource
from tests.keyvault.secrets.conftest import unique
from tests.servers.moto import free_port


def test_write_keeps_other_keys_and_bumps_resource_version(k8s_secret_source, k8s_api):
    name = unique("db-")
    before = k8s_api.put_secret("keyvault", name, {"username": "app", "password": "old"})

    written = k8s_secret_source.write(f"{name}#password", "new")

    stored = k8s_api.secret("keyvault", name)
    assert {k: base64.b64decode(v).decode() for k, v in stored["data"].items()} == {"username": "app", "password": "new"}
    assert int(written.version) > int(before["metadata"]["resourceVersion"])
    assert stored["metadata"]["uid"] == before["metadata"]["uid"]
    assert [v.version for v in k8s_secret_source.list_versions(f"{name}#password")] == [written.version]


def test_change_between_read_and_write_is_a_409_conflict(k8s_secret_source, k8s_api):
    # given a writer that read the Secret, then someone ran kubectl apply
    name = unique("db-")
    k8s_api.put_secret("keyvault", name, {"password": "v1"})

    class Interrupted(KubernetesSecretSource):
        def _get(self, namespace, secret_name):
            secret = super()._get(namespace, secret_name)
            k8s_api.put_secret("keyvault", name, {"password": "from-kubectl"})
            return secret

    racer = Interrupted(k8s_secret_source.api_url, namespace="keyvault", token_path=k8s_secret_source.token_path)

    # when it writes, then the API answers 409 and the operator's value stays
    with pytest.raises(SecretConflict):
        racer.write(f"{name}#password", "mine")
    assert k8s_secret_source.read(f"{name}#password").value == "from-kubectl"


def test_server_answers_status_objects(k8s_api, k8s_token_file):
    token = k8s_token_file.read_text().strip()
    request = urllib.request.Request(
        f"{k8s_api.url}/api/v1/namespaces/keyvault/secrets/missing", headers={"Authorization": f"Bearer {token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)

    status = json.loads(error.value.read())
    assert error.value.code == 404
    assert status == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'secrets "missing" not found',
        "reason": "NotFound",
        "details": {"name": "missing", "kind": "secrets"},
        "code": 404,
    }


def test_other_namespace_is_forbidden_and_bad_token_unauthorized(k8s_secret_source, k8s_api, tmp_path):
    with pytest.raises(SecretAccessDenied, match="forbidden"):
        k8s_secret_source.read("kube-system/anything#key")

    bad = tmp_path / "bad-token"
    bad.write_text("not-a-token")
    source = KubernetesSecretSource(k8s_api.url, namespace="keyvault", token_path=str(bad))
    with pytest.raises(SecretAccessDenied, match="Unauthorized"):
        source.read("anything")


def test_rotated_service_account_token_is_used_without_restart(k8s_api, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("expired-token")
    source = KubernetesSecretSource(k8s_api.url, namespace="keyvault", token_path=str(token_file))
    with pytest.raises(SecretAccessDenied):
        source.write(unique("s-"), "x")

    replacement = tmp_path / "token.new"
    replacement.write_text(k8s_api.add_token("keyvault"))
    os.replace(replacement, token_file)

    assert source.write(unique("s-"), "x").value == "x"


def test_only_the_current_version_exists(k8s_secret_source):
    path = unique("app-") + "#token"
    first = k8s_secret_source.write(path, "one")
    second = k8s_secret_source.write(path, "two")

    with pytest.raises(SecretNotFound):
        k8s_secret_source.read(path, version=first.version)
    with pytest.raises(SecretNotFound):
        k8s_secret_source.delete_version(path, first.version)
    with pytest.raises(CurrentVersionError):
        k8s_secret_source.delete_version(path, second.version)


def test_unreachable_api_is_unavailable(k8s_token_file):
    source = KubernetesSecretSource(f"http://127.0.0.1:{free_port()}", namespace="keyvault", token_path=str(k8s_token_file))

    with pytest.raises(SecretSourceUnavailable):
        source.read("x")
    assert source.health_check()[0] is False

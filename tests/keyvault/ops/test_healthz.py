"""``/healthz`` answers whatever ``Host`` a probe sends, and nothing else does.

A Kubernetes probe sends the pod's address as ``Host`` (``10.1.2.3:8000``), never a
name in ``HMD_ALLOWED_HOSTS``; before :class:`~keyvault.ops.healthz.HealthzMiddleware`
Django's host validation answered it 400 and no pod ever became Ready.
"""

from __future__ import annotations

import pytest
from django.test import Client

from keyvault.ops.healthz import HealthzMiddleware

pytestmark = pytest.mark.django_db

PROBE_HOSTS = ["10.1.2.3:8000", "evil.example", "[fd00::7]:8000"]


@pytest.fixture
def production_hosts(settings):
    """Host validation as in production: one allowed name, HTTPS redirect on."""
    settings.ALLOWED_HOSTS = ["keyvault.example.com"]
    settings.SECURE_SSL_REDIRECT = True
    return settings


@pytest.mark.parametrize("host", PROBE_HOSTS)
def test_healthz_answers_a_probe_with_any_host(production_hosts, host):
    # when a probe asks over plain HTTP with a Host that is not allowed
    response = Client().get("/healthz", HTTP_HOST=host)

    # then the health answer, not 400 and not a redirect
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "ok"
    assert host.encode() not in response.content  # the host is never echoed


def test_healthz_answers_without_a_host_header(production_hosts):
    # a WSGI environ without HTTP_HOST: Django would fall back to SERVER_NAME (testserver, not allowed)
    response = Client().get("/healthz")
    assert response.status_code == 200, response.content


@pytest.mark.parametrize("path", ["/healthz/", "/healthz/x", "/healthzz", "/login/", "/metrics"])
def test_every_other_path_still_validates_the_host(production_hosts, path):
    # given an unknown Host, when any path other than exactly /healthz is asked
    response = Client().get(path, HTTP_HOST="evil.example")

    # then Django's host validation refuses it, as before
    assert response.status_code == 400


def test_an_allowed_host_still_reaches_other_pages(production_hosts):
    response = Client().get("/login/", HTTP_HOST="keyvault.example.com", secure=True)
    assert response.status_code == 200


def test_healthz_is_get_only_whatever_the_host(production_hosts):
    assert Client().post("/healthz", HTTP_HOST="10.1.2.3:8000").status_code == 405


def test_the_middleware_runs_before_host_validation(settings):
    # CommonMiddleware calls request.get_host(); the health middleware must come first
    names = list(settings.MIDDLEWARE)
    ours = f"{HealthzMiddleware.__module__}.{HealthzMiddleware.__name__}"
    assert names.index(ours) < names.index("django.middleware.common.CommonMiddleware")
    assert names.index(ours) < names.index("django.middleware.csrf.CsrfViewMiddleware")


def test_each_probe_sets_the_provider_health_gauge(client, settings, tmp_path):
    # the KeyvaultKMSProviderUnhealthy alert reads this gauge; probes keep it fresh
    from prometheus_client import REGISTRY

    def gauge():
        return REGISTRY.get_sample_value("keyvault_kms_provider_healthy", {"provider": "local"})

    assert client.get("/healthz").status_code == 200
    assert gauge() == 1

    # when the local keyring cannot be read, the next probe turns it to 0
    unreadable = tmp_path / "not-a-keyring"
    unreadable.mkdir()
    kms = {**settings.KMS, "providers": {**settings.KMS["providers"]}}
    kms["providers"]["local"] = {**kms["providers"]["local"], "keyring_path": str(unreadable)}
    settings.KMS = kms
    assert client.get("/healthz").status_code == 503
    assert gauge() == 0

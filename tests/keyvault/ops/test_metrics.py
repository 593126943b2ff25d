"""Provider metrics and ``/metrics``.

Given providers from the registry (so metered by ``InstrumentedProvider``), when
they are used, then operation counts, error counts by class and latency
histograms move by exactly what was done; ``/metrics`` serves them to a bearer
token or a console user allowed to view KEKs, and to nobody else.
"""

from __future__ import annotations

import copy
import socket

import pytest
from django.core.cache import cache
from django.urls import reverse
from prometheus_client import REGISTRY

from keyvault.kms import (
    InvalidCiphertext,
    KeyNotFound,
    KMSProvider,
    ProviderUnavailable,
    get_provider,
)
from keyvault.kms.context import BoundContext
from keyvault.kms.envelope import EnvelopeEncryptor
from keyvault.kms.local import LocalKMSProvider, generate_master_key
from keyvault.kms.metrics import InstrumentedProvider, instrument
from tests.keyvault import make_role_user, use_temp_keyring

pytestmark = pytest.mark.django_db

TOKEN = "scrape-me-7c1f0a9e4b2d"


@pytest.fixture(autouse=True)
def _isolated(settings, tmp_path):
    use_temp_keyring(settings, tmp_path)
    cache.clear()


def calls(provider: str, operation: str) -> float:
    return REGISTRY.get_sample_value("keyvault_kms_operations_total", {"provider": provider, "operation": operation}) or 0


def errors(provider: str, operation: str, error: str) -> float:
    labels = {"provider": provider, "operation": operation, "error": error}
    return REGISTRY.get_sample_value("keyvault_kms_errors_total", labels) or 0


def timings(provider: str, operation: str) -> float:
    labels = {"provider": provider, "operation": operation}
    return REGISTRY.get_sample_value("keyvault_kms_operation_duration_seconds_count", labels) or 0


# -- the meter ---------------------------------------------------------------------


def test_registry_providers_are_metered_and_still_providers():
    provider = get_provider("local")

    assert isinstance(provider, InstrumentedProvider)
    assert isinstance(provider, KMSProvider)
    assert isinstance(provider.wrapped, LocalKMSProvider)
    assert provider.name == "local"
    assert provider.capabilities == provider.wrapped.capabilities
    assert get_provider("local") is provider
    assert instrument(provider) is provider


def test_operations_are_counted_and_timed():
    # given the local provider with a key
    provider = get_provider("local")
    provider.create_key("metered")
    before = {op: (calls("local", op), timings("local", op)) for op in ("encrypt", "decrypt", "generate_data_key")}

    # when it encrypts three times, decrypts twice and makes one data key
    sealed = [provider.encrypt("metered", b"secret", encryption_context={"t": "1"}) for _ in range(3)]
    for result in sealed[:2]:
        provider.decrypt(result.ciphertext, encryption_context={"t": "1"})
    provider.generate_data_key("metered").wipe()

    # then each operation's counter and histogram moved by exactly that much
    for op, expected in (("encrypt", 3), ("decrypt", 2), ("generate_data_key", 1)):
        assert calls("local", op) - before[op][0] == expected
        assert timings("local", op) - before[op][1] == expected


def test_a_providers_calls_to_itself_are_not_counted_twice():
    # given a ciphertext
    provider = get_provider("local")
    provider.create_key("selfcall")
    sealed = provider.encrypt("selfcall", b"secret")
    before = calls("local", "rewrap"), calls("local", "decrypt"), calls("local", "encrypt")

    # when it is rewrapped (the local provider decrypts and encrypts inside)
    provider.rewrap(sealed.ciphertext)

    # then one rewrap is counted, and no decrypt or encrypt
    after = calls("local", "rewrap"), calls("local", "decrypt"), calls("local", "encrypt")
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (1, 0, 0)


def test_an_envelope_over_the_registry_provider_keeps_the_fast_path_and_every_call_is_counted():
    # given an uncached envelope over the registry's (metered) local provider
    provider = get_provider("local")
    provider.create_key("enveloped")
    encryptor = EnvelopeEncryptor(provider, "enveloped")
    context = BoundContext({"tenant": "acme", "table": "invoices"})
    before = {op: (calls("local", op), timings("local", op)) for op in ("decrypt", "generate_data_key")}
    failed_before = errors("local", "decrypt", "InvalidCiphertext")

    # when it seals five values, opens four and is handed one blob under the wrong context
    blobs = [encryptor.encrypt(b"value %d" % n, encryption_context=context) for n in range(5)]
    opened = [encryptor.decrypt(blob, encryption_context=context) for blob in blobs[:4]]
    with pytest.raises(InvalidCiphertext):
        encryptor.decrypt(blobs[4], encryption_context={"tenant": "acme"})

    # then it used the provider's tuple fast paths (through the meter), and each call was counted and timed
    assert encryptor._decrypt_parts is not None and encryptor._generate_parts is not None
    assert opened == [b"value %d" % n for n in range(4)]
    for op, expected in (("generate_data_key", 5), ("decrypt", 5)):
        assert calls("local", op) - before[op][0] == expected
        assert timings("local", op) - before[op][1] == expected
    assert errors("local", "decrypt", "InvalidCiphertext") - failed_before == 1


def test_a_provider_overriding_its_public_methods_is_metered_through_them(tmp_path):
    class PublicOnly(LocalKMSProvider):
        def decrypt(self, ciphertext, *, encryption_context=None):
            return super().decrypt(ciphertext, encryption_context=encryption_context)

    metered = instrument(PublicOnly(tmp_path / "keyring", generate_master_key()), label="public-only")
    metered.create_key("k")
    encryptor = EnvelopeEncryptor(metered, "k")
    before = calls("public-only", "decrypt")

    encryptor.decrypt(encryptor.encrypt(b"x"))

    assert encryptor._decrypt_parts is None and encryptor._generate_parts is not None
    assert calls("public-only", "decrypt") - before == 1


def test_errors_are_counted_by_class():
    provider = get_provider("local")
    provider.create_key("errors")
    before = errors("local", "decrypt", "InvalidCiphertext"), errors("local", "encrypt", "KeyNotFound")
    decrypts_before = calls("local", "decrypt")

    # when a garbage ciphertext is opened twice and an unknown key encrypts once
    for _ in range(2):
        with pytest.raises(InvalidCiphertext):
            provider.decrypt(b"not a ciphertext at all")
    with pytest.raises(KeyNotFound):
        provider.encrypt("no-such-key", b"x")

    # then each error is counted under its class, and the failed calls still count as calls
    assert errors("local", "decrypt", "InvalidCiphertext") - before[0] == 2
    assert errors("local", "encrypt", "KeyNotFound") - before[1] == 1
    assert calls("local", "decrypt") - decrypts_before == 2


def test_an_unreachable_backend_counts_provider_unavailable(settings):
    # given the real Vault provider pointed at a port nothing listens on
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        kms = copy.deepcopy(settings.KMS)
        kms["providers"]["vault"] = {"addr": f"http://127.0.0.1:{closed.getsockname()[1]}", "token": "s.x", "timeout": 1}
        settings.KMS = kms
        provider = get_provider("vault")
        before = errors("vault", "encrypt", "ProviderUnavailable"), errors("vault", "health_check", "Unhealthy")

        # when it is used and health-checked
        with pytest.raises(ProviderUnavailable):
            provider.encrypt("k", b"x")
        assert not provider.health_check().healthy

    # then the outage is counted by class, and the failed health check as "Unhealthy"
    assert errors("vault", "encrypt", "ProviderUnavailable") - before[0] == 1
    assert errors("vault", "health_check", "Unhealthy") - before[1] == 1


def test_attributes_of_the_backend_read_and_write_through_the_meter():
    provider = get_provider("local")

    provider.bench_marker = "set through the proxy"

    assert provider.wrapped.bench_marker == "set through the proxy"
    assert provider.bench_marker == "set through the proxy"
    assert "InstrumentedProvider(" in repr(provider)


# -- /metrics ------------------------------------------------------------------------


@pytest.fixture
def metrics_token(settings):
    settings.METRICS_TOKEN = TOKEN
    return TOKEN


def test_metrics_need_credentials(client, metrics_token):
    response = client.get("/metrics")

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"keyvault_kms" not in response.content


def test_a_wrong_token_is_refused(client, metrics_token):
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer " + TOKEN[:-1] + "x")

    assert response.status_code == 401


def test_no_token_is_accepted_when_none_is_configured(client, settings):
    settings.METRICS_TOKEN = ""

    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer anything").status_code == 401


def test_the_token_reads_the_provider_series(client, metrics_token):
    # given some provider traffic
    provider = get_provider("local")
    provider.create_key("scraped")
    provider.encrypt("scraped", b"x")

    # when Prometheus scrapes with the token
    response = client.get(reverse("metrics"), HTTP_AUTHORIZATION=f"Bearer {TOKEN}")

    # then it gets the exposition format with the per-provider series
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    text = response.content.decode()
    assert 'keyvault_kms_operations_total{operation="encrypt",provider="local"}' in text
    assert 'keyvault_kms_operation_duration_seconds_bucket{le="0.001",operation="encrypt",provider="local"}' in text
    assert "no-store" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


@pytest.mark.parametrize("role", ["auditor", "operator", "administrator"])
def test_console_roles_may_read_metrics(client, role):
    client.force_login(make_role_user(role))

    assert client.get("/metrics").status_code == 200


def test_users_without_the_permission_get_403(client, django_user_model):
    staff_without_role = django_user_model.objects.create_user("intern", is_staff=True)
    client.force_login(staff_without_role)

    assert client.get("/metrics").status_code == 403


def test_a_non_staff_user_with_the_permission_gets_403(client):
    user = make_role_user("auditor")
    user.is_staff = False
    user.save()
    client.force_login(user)

    assert client.get("/metrics").status_code == 403


def test_metrics_is_read_only(client, metrics_token):
    assert client.post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405

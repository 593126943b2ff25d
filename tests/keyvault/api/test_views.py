"""Contract tests of ``/api/v1/``: every endpoint, batches, problem details, limits, metrics (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import copy
import json
import socket
from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client import REGISTRY

from keyvault.api import services
from keyvault.api.views import MAX_BATCH, MAX_BODY_BYTES, PROBLEM_BASE
from keyvault.keys import envelopes
from keyvault.keys import services as key_services
from keyvault.kms.envelope import read_header
from keyvault.models import ApiClient, ApiToken, AuditEvent, DataKey, KeyEncryptionKey, KeyVersion

pytestmark = pytest.mark.django_db

CTX = {"service": "billing"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def problem(response, code: str, status: int) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == PROBLEM_BASE + code and body["status"] == status and body["title"]
    return body


@pytest.fixture
def token(billing):
    return billing[1]


@pytest.fixture
def data_key(api, token):
    response = api.post("keks/billing-kek/data-keys", {"context": CTX, "purpose": "rows", "owner_ref": "db:1"},
                        token=token)
    assert response.status_code == 201, response.content
    return response.json()


def test_generate_registers_the_data_key_and_audits_the_client(data_key):
    assert len(base64.b64decode(data_key["plaintext"])) == 32
    assert data_key["kek"] == "billing-kek" and data_key["kek_version"] == 1
    row = DataKey.objects.get(pk=data_key["id"])
    assert bytes(row.wrapped_key) == base64.b64decode(data_key["ciphertext"])
    assert row.encryption_context == CTX and row.purpose == "rows" and row.owner_ref == "db:1"
    event = AuditEvent.objects.get(action="datakey.created")
    assert event.actor == "api:billing" and event.target_id == str(row.pk)
    assert event.details["context_keys"] == ["service"] and "rows" not in str(event.details)  # no context values


def test_unwrap_by_id_is_rotation_transparent(api, token, data_key, kek, system_actor):
    first = api.post(f"data-keys/{data_key['id']}/unwrap", {"context": CTX}, token=token)
    assert first.status_code == 200 and first.json() == {"plaintext": data_key["plaintext"], "kek_version": 1}

    key_services.rotate_kek_version(kek, actor=system_actor)
    key_services.rewrap_data_key(DataKey.objects.get(pk=data_key["id"]), actor=system_actor)
    key_services.set_version_state(kek, 1, KeyVersion.State.DISABLED, actor=system_actor)

    after = api.post(f"data-keys/{data_key['id']}/unwrap", {"context": CTX}, token=token)
    assert after.status_code == 200 and after.json() == {"plaintext": data_key["plaintext"], "kek_version": 2}
    unwraps = AuditEvent.objects.filter(action="datakey.unwrapped", actor="api:billing")
    assert unwraps.count() == 2


def test_unwrap_with_another_context_is_the_opaque_decryption_error(api, token, data_key):
    response = api.post(f"data-keys/{data_key['id']}/unwrap", {"context": {**CTX, "extra": "x"}}, token=token)
    body = problem(response, "decryption-failed", 400)
    assert "detail" not in body
    assert AuditEvent.objects.filter(action="datakey.unwrapped", outcome="failure").count() == 1


def test_describe_gives_metadata_never_key_material(api, token, data_key):
    response = api.get(f"data-keys/{data_key['id']}", token=token)
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == data_key["id"] and body["kek"] == "billing-kek" and body["context_keys"] == ["service"]
    assert not {"plaintext", "ciphertext", "wrapped_key", "context"} & set(body)
    assert data_key["ciphertext"] not in response.content.decode()
    read = AuditEvent.objects.get(action="api.read")
    assert read.actor == "api:billing" and read.details == {"operation": "describe", "kek": "billing-kek",
                                                            "data_key": data_key["id"]}


def test_encrypt_decrypt_rewrap_round_trip(api, token, kek, system_actor):
    sealed = api.post("keks/billing-kek/encrypt", {"plaintext": b64(b"card 4111"), "context": CTX}, token=token)
    assert sealed.status_code == 200
    blob = sealed.json()["ciphertext"]
    assert read_header(base64.b64decode(blob)).kek_version == 1

    key_services.rotate_kek_version(kek, actor=system_actor)
    moved = api.post("rewrap", {"ciphertext": blob, "context": CTX}, token=token)
    assert moved.status_code == 200 and read_header(base64.b64decode(moved.json()["ciphertext"])).kek_version == 2

    for ciphertext in (blob, moved.json()["ciphertext"]):
        opened = api.post("decrypt", {"ciphertext": ciphertext, "context": CTX}, token=token)
        assert opened.status_code == 200 and base64.b64decode(opened.json()["plaintext"]) == b"card 4111"
    assert set(AuditEvent.objects.filter(actor="api:billing").values_list("action", flat=True)) == {
        "crypto.encrypt", "crypto.decrypt", "datakey.rewrapped"}


def test_every_decryption_failure_is_one_opaque_problem(api, token, other_kek, system_actor):
    sealed = api.post("keks/billing-kek/encrypt", {"plaintext": b64(b"x"), "context": CTX}, token=token).json()
    raw = bytearray(base64.b64decode(sealed["ciphertext"]))
    raw[-1] ^= 1
    foreign_blob = envelopes.seal(other_kek.name, b"x", encryption_context=CTX)
    bodies = []
    for ciphertext, context in ((b64(bytes(raw)), CTX), (sealed["ciphertext"], {"service": "billing", "k": "v"}),
                                (b64(b"garbage" * 10), CTX), (b64(foreign_blob), CTX)):
        bodies.append(problem(api.post("decrypt", {"ciphertext": ciphertext, "context": context}, token=token),
                              "decryption-failed", 400))
    assert all(body == bodies[0] for body in bodies)


def test_list_keks_shows_only_the_clients(api, token, other_kek):
    response = api.get("keks", token=token)
    assert response.json() == {"keks": [{"name": "billing-kek", "state": "enabled", "primary_version": 1,
                                         "provider": "local"}]}
    assert AuditEvent.objects.filter(action="api.read", actor="api:billing", details__operation="list_keks").exists()


def test_batches_align_and_one_bad_item_fails_alone(api, token, data_key):
    generated = api.post("keks/billing-kek/data-keys",
                         {"batch": [{"context": CTX}, {"context": {"service": "hr"}}, {"context": CTX}]}, token=token)
    assert generated.status_code == 200
    items = generated.json()["batch"]
    assert [("id" in item, "error" in item) for item in items] == [(True, False), (False, True), (True, False)]
    assert items[1]["error"]["type"] == PROBLEM_BASE + "forbidden-context"

    unwrapped = api.post("data-keys/unwrap", {"batch": [
        {"id": data_key["id"], "context": CTX}, {"id": 10**9, "context": CTX}, {"id": items[0]["id"], "context": CTX},
    ]}, token=token).json()["batch"]
    assert unwrapped[0]["plaintext"] == data_key["plaintext"] and unwrapped[2]["plaintext"] == items[0]["plaintext"]
    assert unwrapped[1]["error"]["type"] == PROBLEM_BASE + "not-found"

    sealed = api.post("keks/billing-kek/encrypt", {"batch": [
        {"plaintext": b64(b"a"), "context": CTX}, {"plaintext": "not base64!", "context": CTX},
        {"plaintext": b64(b"x" * 4097), "context": CTX}]}, token=token).json()["batch"]
    assert [item.get("error", {}).get("status") for item in sealed] == [None, 400, 413]
    opened = api.post("decrypt", {"batch": [{"ciphertext": sealed[0]["ciphertext"], "context": CTX},
                                            {"ciphertext": "%%%", "context": CTX}]}, token=token).json()["batch"]
    assert base64.b64decode(opened[0]["plaintext"]) == b"a"
    assert opened[1]["error"]["type"] == PROBLEM_BASE + "invalid-base64"


def test_huge_batches_and_malformed_bodies_are_400(api, token):
    too_many = {"batch": [{"context": CTX}] * (MAX_BATCH + 1)}
    problem(api.post("keks/billing-kek/data-keys", too_many, token=token), "invalid-request", 400)
    problem(api.post("keks/billing-kek/data-keys", {"batch": []}, token=token), "invalid-request", 400)
    problem(api.post("keks/billing-kek/data-keys", None, raw="{not json", token=token), "invalid-request", 400)
    problem(api.post("keks/billing-kek/data-keys", {"context": {"service": 1}}, token=token), "invalid-request", 400)
    problem(api.post("keks/billing-kek/data-keys", {"contxt": CTX}, token=token), "invalid-request", 400)
    assert not DataKey.objects.exists()


def test_a_full_batch_of_small_encrypts_is_accepted(api, token):
    body = {"batch": [{"plaintext": b64(b"p" * 64), "context": CTX}] * MAX_BATCH}
    response = api.post("keks/billing-kek/encrypt", body, token=token)
    assert response.status_code == 200 and len(response.json()["batch"]) == MAX_BATCH
    assert not any("error" in item for item in response.json()["batch"])


def test_oversized_plaintext_and_bodies_are_413(api, token):
    problem(api.post("keks/billing-kek/encrypt", {"plaintext": b64(b"x" * 4097), "context": CTX}, token=token),
            "payload-too-large", 413)
    huge = json.dumps({"plaintext": "A" * (MAX_BODY_BYTES + 10), "context": CTX})
    problem(api.post("keks/billing-kek/encrypt", None, raw=huge, token=token), "payload-too-large", 413)


def test_bad_base64_is_400(api, token):
    for text in ("@@@@", "YQ", "yes, really", "é"):
        problem(api.post("keks/billing-kek/encrypt", {"plaintext": text, "context": CTX}, token=token),
                "invalid-base64", 400)


def test_unicode_contexts_round_trip(api, token):
    context = {"service": "billing", "名前": "ü🔑\u200b", "emoji 🔐": "\U0010ffff"}
    created = api.post("keks/billing-kek/data-keys", {"context": context}, token=token)
    assert created.status_code == 201
    opened = api.post(f"data-keys/{created.json()['id']}/unwrap", {"context": context}, token=token)
    assert opened.json()["plaintext"] == created.json()["plaintext"]
    problem(api.post("keks/billing-kek/data-keys", None,
                     raw='{"context": {"service": "billing", "x": "\\ud800"}}', token=token), "invalid-context", 400)


def test_rate_limit_answers_429_with_retry_after(api, token, billing):
    client, _ = billing
    ApiClient.objects.filter(pk=client.pk).update(rate_limit_per_second=2)
    statuses = [api.get("keks", token=token) for _ in range(4)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited and limited[0]["Retry-After"] == "1"
    problem(limited[0], "rate-limited", 429)


def test_a_provider_outage_is_503_with_retry_after(api, settings, system_actor):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        kms = copy.deepcopy(settings.KMS)
        kms["providers"]["vault"] = {"addr": f"http://127.0.0.1:{closed.getsockname()[1]}", "token": "s.x",
                                     "timeout": 1}
        settings.KMS = kms
        # a KEK registered at a Vault that has gone away (its rows as create_kek left them)
        down = KeyEncryptionKey.objects.create(name="vault-kek", provider="vault", provider_key_id="vault-kek")
        KeyVersion.objects.create(kek=down, number=1, is_primary=True, provider_version_ref="1")
        _, token = services.create_client(name="v", actor=system_actor, keks=["vault-kek"], operations=["generate"])
        response = api.post("keks/vault-kek/data-keys", {"context": {}}, token=token)
    problem(response, "provider-unavailable", 503)
    assert int(response["Retry-After"]) > 0


def _sample(name: str, labels: dict) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_calls_per_client_and_operation(api, token, data_key):
    labels = {"client": "billing", "operation": "unwrap_data_key", "status": "200"}
    before = _sample("keyvault_api_requests_total", labels)
    latency_before = _sample("keyvault_api_request_seconds_count", {"client": "billing", "operation": "unwrap_data_key"})
    api.post(f"data-keys/{data_key['id']}/unwrap", {"context": CTX}, token=token)
    api.post(f"data-keys/{data_key['id']}/unwrap", {"context": CTX}, token=token)
    assert _sample("keyvault_api_requests_total", labels) - before == 2
    assert _sample("keyvault_api_request_seconds_count",
                   {"client": "billing", "operation": "unwrap_data_key"}) - latency_before == 2


def test_no_session_or_csrf_is_needed_or_honoured(api, token, admin_client):
    # a signed-in console session is no API credential
    assert admin_client.get("/api/v1/keks").status_code == 401
    # and a bearer call needs no CSRF token (the caller enforces CSRF checks)
    assert api.post("keks/billing-kek/data-keys", {"context": CTX}, token=token).status_code == 201


def test_openapi_schema_is_3_1_and_names_every_endpoint(api):
    response = api.get("openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.1")
    assert set(schema["paths"]) == {
        "/api/v1/keks/{name}/data-keys", "/api/v1/data-keys/{data_key_id}/unwrap", "/api/v1/data-keys/unwrap",
        "/api/v1/data-keys/{data_key_id}", "/api/v1/keks/{name}/encrypt", "/api/v1/decrypt", "/api/v1/rewrap",
        "/api/v1/keks"}
    assert schema["components"]["securitySchemes"]["Bearer"]["scheme"] == "bearer"


def test_a_rotated_token_overlaps_then_the_old_one_is_refused(api, billing, system_actor):
    _, old = billing
    new = services.rotate_token("billing", actor=system_actor, overlap=timedelta(hours=1))
    assert api.get("keks", token=old).status_code == 200
    assert api.get("keks", token=new).status_code == 200

    # when the overlap has passed
    ApiToken.objects.exclude(expires_at=None).update(expires_at=timezone.now() - timedelta(seconds=1))
    services.forget_tokens()  # an edit behind the services' back is seen once the token cache expires

    problem(api.get("keks", token=old), "unauthorized", 401)
    assert api.get("keks", token=new).status_code == 200
    services.revoke_client("billing", actor=system_actor)
    problem(api.get("keks", token=new), "unauthorized", 401)

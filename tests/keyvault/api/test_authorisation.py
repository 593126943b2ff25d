"""The API's authorisation matrix: every endpoint × every way of being refused, and what each answers.

Nothing tells a client whether a KEK or data key it may not use exists: a foreign one answers
exactly as one that does not exist (404, or for a ciphertext the one opaque decryption error).
"""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from django.utils import timezone

from keyvault.api import services
from keyvault.api.views import PROBLEM_BASE
from keyvault.keys import envelopes
from keyvault.keys import services as key_services
from keyvault.models import AuditEvent

pytestmark = pytest.mark.django_db

CTX = {"service": "billing"}
BAD_CTX = {"service": "hr"}
GOOD_ADDRESS, BAD_ADDRESS = "127.0.0.1", "192.0.2.7"
CASES = ("no_token", "revoked", "expired", "wrong_kek", "wrong_operation", "wrong_context", "wrong_address", "valid")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class World:
    """Two KEKs, a data key and a blob under each, and clients in every state."""

    def __init__(self, actor):
        self.kek = key_services.create_kek(name="billing-kek", actor=actor)
        self.foreign_kek = key_services.create_kek(name="hr-kek", actor=actor)
        self.data_key = self._data_key(self.kek, CTX, actor)
        self.foreign_data_key = self._data_key(self.foreign_kek, CTX, actor)
        self.other_context_key = self._data_key(self.kek, BAD_CTX, actor)
        self.blob = b64(envelopes.seal(self.kek.name, b"secret", encryption_context=CTX))
        self.foreign_blob = b64(envelopes.seal(self.foreign_kek.name, b"secret", encryption_context=CTX))
        ops = ["generate", "unwrap", "describe", "encrypt", "decrypt", "rewrap"]
        common = {"keks": [self.kek.name], "context_constraints": {"service": ["billing"]},
                  "allowed_networks": ["127.0.0.0/8"]}
        _, self.valid = services.create_client(name="valid", actor=actor, operations=ops, **common)
        _, self.revoked = services.create_client(name="revoked", actor=actor, operations=ops, **common)
        services.revoke_client("revoked", actor=actor)
        _, self.expired = services.create_client(name="expired", actor=actor, operations=ops,
                                                 expires_at=timezone.now() - timedelta(seconds=1), **common)

    @staticmethod
    def _data_key(kek, context, actor):
        row, plain = key_services.create_data_key(kek, actor=actor, encryption_context=context)
        plain.wipe()
        return row

    def client_without(self, operation: str, actor) -> str:
        ops = [op for op in ("generate", "unwrap", "describe", "encrypt", "decrypt", "rewrap") if op != operation]
        _, token = services.create_client(name=f"no-{operation}", actor=actor, operations=ops, keks=[self.kek.name],
                                          context_constraints={"service": ["billing"]})
        return token


@pytest.fixture
def world(system_actor):
    return World(system_actor)


# endpoint: (operation, method, request builder (world, case) -> (path, body))
def _generate(w, case):
    kek = "hr-kek" if case == "wrong_kek" else "billing-kek"
    return f"keks/{kek}/data-keys", {"context": BAD_CTX if case == "wrong_context" else CTX}


def _unwrap(w, case):
    key = w.foreign_data_key if case == "wrong_kek" else w.data_key
    return f"data-keys/{key.pk}/unwrap", {"context": BAD_CTX if case == "wrong_context" else CTX}


def _unwrap_batch(w, case):
    key = w.foreign_data_key if case == "wrong_kek" else w.data_key
    return "data-keys/unwrap", {"batch": [{"id": key.pk, "context": BAD_CTX if case == "wrong_context" else CTX}]}


def _describe(w, case):
    key = {"wrong_kek": w.foreign_data_key, "wrong_context": w.other_context_key}.get(case, w.data_key)
    return f"data-keys/{key.pk}", None


def _encrypt(w, case):
    kek = "hr-kek" if case == "wrong_kek" else "billing-kek"
    return f"keks/{kek}/encrypt", {"plaintext": b64(b"x"), "context": BAD_CTX if case == "wrong_context" else CTX}


def _blob(path):
    def build(w, case):
        blob = w.foreign_blob if case == "wrong_kek" else w.blob
        return path, {"ciphertext": blob, "context": BAD_CTX if case == "wrong_context" else CTX}

    return build


def _keks(w, case):
    return "keks", None


ENDPOINTS = {
    "generate": ("generate", _generate),
    "unwrap": ("unwrap", _unwrap),
    "unwrap-batch": ("unwrap", _unwrap_batch),
    "describe": ("describe", _describe),
    "encrypt": ("encrypt", _encrypt),
    "decrypt": ("decrypt", _blob("decrypt")),
    "rewrap": ("rewrap", _blob("rewrap")),
    "keks": (None, _keks),
}

DENIED_CALL = {"no_token": 401, "revoked": 401, "expired": 401, "wrong_operation": 403, "wrong_address": 403}
#: endpoint -> (wrong KEK, wrong context, valid): a status, or ("item", status) for a batch item's error.
SCOPED = {
    "generate": (404, 403, 201),
    "unwrap": (404, 403, 200),
    "unwrap-batch": (("item", 404), ("item", 403), 200),
    "describe": (404, 404, 200),
    "encrypt": (404, 403, 200),
    "decrypt": (400, 403, 200),
    "rewrap": (400, 403, 200),
    "keks": (200, 200, 200),  # the list is the client's own: no KEK or context to get wrong
}


def expected(endpoint: str, case: str):
    if case == "wrong_operation" and endpoint == "keks":
        return 200  # listing its own KEKs needs no operation
    if case in DENIED_CALL:
        return DENIED_CALL[case]
    return dict(zip(("wrong_kek", "wrong_context", "valid"), SCOPED[endpoint]))[case]


def call(api, world, endpoint: str, case: str, system_actor):
    operation, build = ENDPOINTS[endpoint]
    path, body = build(world, case)
    token = {"no_token": None, "revoked": world.revoked, "expired": world.expired}.get(case, world.valid)
    if case == "wrong_operation" and operation:
        token = world.client_without(operation, system_actor)
    address = BAD_ADDRESS if case == "wrong_address" else GOOD_ADDRESS
    if body is None:
        return api.get(path, token=token, address=address)
    return api.post(path, body, token=token, address=address)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_matrix(api, world, endpoint, case, system_actor):
    response = call(api, world, endpoint, case, system_actor)
    want = expected(endpoint, case)
    if isinstance(want, tuple):
        assert response.status_code == 200, response.content
        assert response.json()["batch"][0]["error"]["status"] == want[1]
    else:
        assert response.status_code == want, (endpoint, case, response.content)
    if response.status_code >= 400:
        assert response["Content-Type"] == "application/problem+json"
    if endpoint == "keks" and response.status_code == 200:
        assert [k["name"] for k in response.json()["keks"]] == ["billing-kek"]
    if endpoint in ("decrypt", "rewrap") and response.status_code == 400:
        assert response.json()["type"] == PROBLEM_BASE + "decryption-failed"


@pytest.mark.parametrize("endpoint", ["generate", "encrypt"])
def test_a_foreign_kek_answers_exactly_as_a_missing_one(api, world, endpoint):
    path = "data-keys" if endpoint == "generate" else "encrypt"
    body = {"context": CTX} if endpoint == "generate" else {"plaintext": b64(b"x"), "context": CTX}
    foreign = api.post(f"keks/hr-kek/{path}", body, token=world.valid, address=GOOD_ADDRESS)
    missing = api.post(f"keks/no-such-kek/{path}", body, token=world.valid, address=GOOD_ADDRESS)
    assert (foreign.status_code, foreign.content) == (missing.status_code, missing.content)


def test_a_foreign_data_key_answers_exactly_as_a_missing_one(api, world):
    missing_id = world.other_context_key.pk + 1000
    for template, body in (("data-keys/{}/unwrap", {"context": CTX}), ("data-keys/{}", None)):
        answers = []
        for data_key_id in (world.foreign_data_key.pk, missing_id, 0, 2**70):
            path = template.format(data_key_id)
            response = (api.get(path, token=world.valid, address=GOOD_ADDRESS) if body is None
                        else api.post(path, body, token=world.valid, address=GOOD_ADDRESS))
            answers.append((response.status_code, response.content))
        assert answers[0][0] == 404 and all(answer == answers[0] for answer in answers), answers


def test_refusals_of_a_known_client_are_audited_without_context_values(api, world):
    api.post(f"data-keys/{world.foreign_data_key.pk}/unwrap", {"context": CTX}, token=world.valid,
             address=GOOD_ADDRESS)
    api.post("keks/billing-kek/data-keys", {"context": BAD_CTX}, token=world.valid, address=GOOD_ADDRESS)
    api.get("keks", token=world.valid, address=BAD_ADDRESS)
    api.get("keks", token=world.revoked, address=GOOD_ADDRESS)  # not a known client any more: anonymous
    refused = AuditEvent.objects.filter(action="api.denied").order_by("sequence")
    assert [(e.actor, e.details["reason"]) for e in refused] == [
        ("api:valid", "not_found"), ("api:valid", "context"), ("api:valid", "address"),
        ("anonymous", "unauthenticated")]
    assert refused[2].ip_address == BAD_ADDRESS and refused[3].ip_address == GOOD_ADDRESS
    assert all(e.outcome == "denied" and "hr" not in str(e.details) for e in refused)

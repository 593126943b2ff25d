"""``/api/v1/``: the application API (JSON, bearer token only, no session or CSRF).

Every call: authenticate (401), source address (403), rate limit (429), operation (403),
then each item: scope (a KEK or data key that is not the client's answers 404 exactly as
one that does not exist), context (403), the key service (which audits the call with the
client as actor). Refusals before a client is known (401) and over its rate limit (429) are
audited aggregated per source and minute (:func:`services.unauthenticated_call`). Errors are RFC 9457 problem details whose ``type`` is a stable URN
(:data:`PROBLEMS`); every failure to open a ciphertext is the one ``decryption-failed``.

A body ``{"batch": [...]}`` of up to :data:`MAX_BATCH` items answers 200 with results aligned
with the input: each item either its result or its own ``error`` problem; one bad item never
fails the others.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Callable
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI, Status
from django.http import Http404
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field

from keyvault import audit
from keyvault.api import services
from keyvault.exceptions import (
    ApiAuthenticationFailed,
    ApiBadRequest,
    ApiForbidden,
    ApiNotFound,
    ApiRateLimited,
    KeyNotUsable,
    PayloadTooLarge,
)
from keyvault.keys.services import DataKeyRequest
from keyvault.kms import InvalidCiphertext
from keyvault.kms.errors import KeyDisabled, KeyNotFound, ProviderUnavailable
from keyvault.models import ApiClient
from keyvault.web.request_meta import client_ip, request_id

MAX_BATCH = 1000
#: The largest request body taken (a full batch of 4 KiB encrypts fits).
MAX_BODY_BYTES = 8 * 1024 * 1024
PROVIDER_RETRY_AFTER = 5
PROBLEM_BASE = "urn:keyvault:api:problem:"

#: Stable problem codes: code -> (status, title).
PROBLEMS: dict[str, tuple[int, str]] = {
    "unauthorized": (401, "A valid bearer token is required"),
    "forbidden-address": (403, "Source address not allowed for this client"),
    "forbidden-operation": (403, "Operation not allowed for this client"),
    "forbidden-context": (403, "Encryption context not allowed for this client"),
    "not-found": (404, "No such resource"),
    "invalid-request": (400, "The request is not valid"),
    "invalid-base64": (400, "A field is not valid base64"),
    "invalid-context": (400, "The encryption context is not a valid string map"),
    "decryption-failed": (400, "The ciphertext could not be decrypted"),
    "key-not-usable": (409, "The KEK is not usable"),
    "payload-too-large": (413, "The request or an item of it is too large"),
    "rate-limited": (429, "Too many requests"),
    "provider-unavailable": (503, "The key provider is unavailable"),
}

API_REQUESTS = Counter("keyvault_api_requests", "Application API calls, by client, operation and status.",
                       ["client", "operation", "status"])
API_ERRORS = Counter("keyvault_api_item_errors", "Application API failed items (single or in a batch), by code.",
                     ["client", "operation", "code"])
API_LATENCY = Histogram("keyvault_api_request_seconds", "Application API call latency, by client and operation.",
                        ["client", "operation"],
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))


class ApiProblem(Exception):
    """A problem to answer, with its stable code."""

    def __init__(self, code: str, detail: str = "", *, retry_after: int | None = None):
        super().__init__(detail)
        self.code, self.detail, self.retry_after = code, detail, retry_after


def problem_for(exc: Exception) -> ApiProblem:
    """The problem an exception from the services answers as (anything unknown propagates)."""
    match exc:
        case ApiProblem():
            return exc
        case ApiAuthenticationFailed():
            return ApiProblem("unauthorized")
        case ApiForbidden():
            return ApiProblem(f"forbidden-{exc.code}", str(exc))
        case ApiNotFound():
            return ApiProblem("not-found")
        case ApiRateLimited():
            return ApiProblem("rate-limited", retry_after=exc.retry_after)
        case PayloadTooLarge():
            return ApiProblem("payload-too-large", str(exc))
        case InvalidCiphertext() | KeyNotFound():
            return ApiProblem("decryption-failed")
        case KeyNotUsable() | KeyDisabled():
            return ApiProblem("key-not-usable", str(exc))
        case ProviderUnavailable():
            retry = getattr(exc, "retry_after", None)
            return ApiProblem("provider-unavailable", retry_after=max(1, math.ceil(retry or PROVIDER_RETRY_AFTER)))
        case ApiBadRequest():
            return ApiProblem(exc.code, str(exc)[:200])
    raise exc


def problem_body(problem: ApiProblem) -> dict[str, Any]:
    status, title = PROBLEMS[problem.code]
    body: dict[str, Any] = {"type": PROBLEM_BASE + problem.code, "title": title, "status": status}
    if problem.detail:
        body["detail"] = problem.detail
    return body


class Bearer(HttpBearer):
    """``Authorization: Bearer <token>``, then the address allowlist and the shared rate limit."""

    def __call__(self, request: HttpRequest) -> ApiClient:
        request._api_started = time.perf_counter()
        length = request.META.get("CONTENT_LENGTH") or "0"
        try:
            client = services.authenticate(request.headers.get("Authorization"))
        except ApiAuthenticationFailed:
            services.unauthenticated_call(operation=_operation(request), ip_address=client_ip(request),
                                          request_id=request_id(request))
            raise
        request._api_client = client.name
        request._api_actor = services.actor_for(client, ip_address=client_ip(request), request_id=request_id(request))
        services.check_address(client, client_ip(request))
        try:
            services.throttle(client)
        except ApiRateLimited:
            services.rate_limited_call(client, actor=request._api_actor, operation=_operation(request))
            raise
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"bodies larger than {MAX_BODY_BYTES} bytes are refused")
        if request.method == "POST" and not hasattr(request, "_body"):
            # The API's own limit replaces DATA_UPLOAD_MAX_MEMORY_SIZE (the console's): read it here.
            request._body = request.read(MAX_BODY_BYTES + 1)
            if len(request._body) > MAX_BODY_BYTES:
                raise PayloadTooLarge(f"bodies larger than {MAX_BODY_BYTES} bytes are refused")
        return client

    def authenticate(self, request, token):  # pragma: no cover - __call__ does it all
        raise NotImplementedError


class KeyvaultApi(NinjaAPI):
    """A NinjaAPI that counts every answer per client and operation."""

    def get_openapi_schema(self, *args, **kwargs):
        """The schema, with error responses as ``application/problem+json`` (what they are sent as)."""
        schema = super().get_openapi_schema(*args, **kwargs)
        for operations in schema["paths"].values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if int(status) >= 400 and "application/json" in content:
                        content["application/problem+json"] = content.pop("application/json")
        return schema

    def create_response(self, request, data, *, status=200, temporal_response=None):
        response = super().create_response(request, data, status=status, temporal_response=temporal_response)
        _observe(request, response.status_code)
        return response


def _operation(request: HttpRequest) -> str:
    match = getattr(request, "resolver_match", None)
    return (match.url_name if match and match.url_name else "unknown")[:40]


def _observe(request: HttpRequest, status: int) -> None:
    client = getattr(request, "_api_client", "-")
    operation = _operation(request)
    API_REQUESTS.labels(client, operation, str(status)).inc()
    started = getattr(request, "_api_started", None)
    if started is not None:
        API_LATENCY.labels(client, operation).observe(time.perf_counter() - started)


api = KeyvaultApi(
    title="Keyvault application API", version="1", urls_namespace="api-v1", auth=Bearer(),
    docs_url=None, openapi_url="/openapi.json",
    description="Data keys by reference, envelope encryption and rewrap for application clients. "
                "Errors are RFC 9457 problem details (application/problem+json).",
)


def _problem_response(request: HttpRequest, problem: ApiProblem) -> HttpResponse:
    body = problem_body(problem)
    response = api.create_response(request, body, status=body["status"])
    response["Content-Type"] = "application/problem+json"
    if problem.retry_after is not None:
        response["Retry-After"] = str(problem.retry_after)
    if body["status"] == 401:
        response["WWW-Authenticate"] = 'Bearer realm="keyvault"'
    return response


def _on_service_error(request, exc):
    if isinstance(exc, ApiForbidden | ApiNotFound) and hasattr(request, "_api_actor"):
        services.refused(request._api_actor, operation=_operation(request),
                         reason=exc.code if isinstance(exc, ApiForbidden) else "not_found")
    return _problem_response(request, problem_for(exc))


for _error in (ApiProblem, ApiAuthenticationFailed, ApiBadRequest, ApiForbidden, ApiNotFound, ApiRateLimited, PayloadTooLarge,
               InvalidCiphertext, KeyNotFound, KeyDisabled, ProviderUnavailable):
    api.add_exception_handler(_error, _on_service_error)
api.add_exception_handler(AuthenticationError, lambda request, exc: _problem_response(request, ApiProblem("unauthorized")))
api.add_exception_handler(ValidationError, lambda request, exc: _problem_response(
    request, ApiProblem("invalid-request", "; ".join(_describe(e) for e in exc.errors[:5]))))
api.add_exception_handler(HttpError, lambda request, exc: _problem_response(
    request, ApiProblem("invalid-request", str(exc)[:200]) if exc.status_code == 400 else ApiProblem("unauthorized")
    if exc.status_code == 401 else ApiProblem("not-found")))
api.add_exception_handler(Http404, lambda request, exc: _problem_response(request, ApiProblem("not-found")))
api.add_exception_handler(RequestDataTooBig, lambda request, exc: _problem_response(
    request, ApiProblem("payload-too-large")))


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "payload"))
    return f"{where}: {error.get('msg', 'invalid')}"[:200]


# -- schemas --------------------------------------------------------------------------------------

Context = dict[str, str]
#: A base64 field: documented as such; decoded per item, so one bad item fails alone in a batch.
BASE64 = {"contentEncoding": "base64", "pattern": r"^[A-Za-z0-9+/]*={0,2}$"}


class Schema(BaseModel):
    """The API's schemas are plain pydantic models: every body is a dict, never a Django object, so
    Ninja's ``Schema`` (whose per-object validator reads Django models) only cost time: 6 of the
    28 ms of a batch of 100 unwraps (``bench/api_profile.py``)."""


class Problem(Schema):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str | None = None


class _Strict(Schema):
    model_config = ConfigDict(extra="forbid")


class GenerateIn(_Strict):
    context: Context = Field(default_factory=dict)
    purpose: str = Field("", max_length=200)
    owner_ref: str = Field("", max_length=200)


class GenerateBatchIn(_Strict):
    batch: list[GenerateIn] = Field(min_length=1, max_length=MAX_BATCH)


class DataKeyOut(Schema):
    id: int
    plaintext: str
    ciphertext: str
    kek: str
    kek_version: int


class UnwrapIn(_Strict):
    context: Context = Field(default_factory=dict)


class UnwrapItem(_Strict):
    id: int
    context: Context = Field(default_factory=dict)


class UnwrapBatchIn(_Strict):
    batch: list[UnwrapItem] = Field(min_length=1, max_length=MAX_BATCH)


class PlaintextKeyOut(Schema):
    plaintext: str
    kek_version: int


class DataKeyMetadata(Schema):
    id: int
    kek: str
    kek_version: int
    key_spec: str
    purpose: str
    owner_ref: str
    context_keys: list[str]
    created_at: str
    last_rewrapped_at: str | None = None


class EncryptIn(_Strict):
    plaintext: str = Field(json_schema_extra=BASE64)
    context: Context = Field(default_factory=dict)


class EncryptBatchIn(_Strict):
    batch: list[EncryptIn] = Field(min_length=1, max_length=MAX_BATCH)


class CiphertextIn(_Strict):
    ciphertext: str = Field(json_schema_extra=BASE64)
    context: Context = Field(default_factory=dict)


class CiphertextBatchIn(_Strict):
    batch: list[CiphertextIn] = Field(min_length=1, max_length=MAX_BATCH)


class CiphertextOut(Schema):
    ciphertext: str


class PlaintextOut(Schema):
    plaintext: str


class BatchItem(Schema):
    """One result of a batch: its fields, or ``error`` (a problem), never both."""

    id: int | None = None
    plaintext: str | None = None
    ciphertext: str | None = None
    kek: str | None = None
    kek_version: int | None = None
    error: Problem | None = None


class BatchOut(Schema):
    batch: list[BatchItem]


class KekOut(Schema):
    name: str
    state: str
    primary_version: int | None = None
    provider: str


class KeksOut(Schema):
    keks: list[KekOut]


ERRORS = {400: Problem, 401: Problem, 403: Problem, 404: Problem, 409: Problem, 413: Problem, 429: Problem,
          503: Problem}


# -- helpers --------------------------------------------------------------------------------------


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ApiProblem("invalid-base64", "not valid base64") from None


def _start(request: HttpRequest, operation: str) -> tuple[ApiClient, Any]:
    services.check_operation(request.auth, operation)
    return request.auth, request._api_actor


def _batch(request: HttpRequest, items: list, one: Callable[[Any], dict]) -> dict:
    """Every item's result or problem.

    The items' events are collected (:func:`keyvault.audit.collected`) and appended together,
    in item order, in one append when the last item is done, before any answer is sent (events
    that cannot be written fail the whole call, and no item's result is sent). The batch is no
    transaction: its events are appended in one statement of their own (the chain head held
    only inside the server), and an event a key service records inside its own transaction
    holds the head only for that append, not for the whole batch.
    """
    results = []
    with audit.collected():
        for item in items:
            try:
                results.append(one(item))
            except Exception as exc:  # noqa: BLE001 - mapped to a per-item problem; unknown errors re-raise
                problem = problem_for(exc)
                if isinstance(exc, ApiForbidden | ApiNotFound):
                    services.refused(request._api_actor, operation=_operation(request),
                                     reason=exc.code if isinstance(exc, ApiForbidden) else "not_found")
                API_ERRORS.labels(request._api_client, _operation(request), problem.code).inc()
                results.append({"error": problem_body(problem)})
    return {"batch": results}


# -- endpoints ------------------------------------------------------------------------------------


@api.post("/keks/{name}/data-keys", response={201: DataKeyOut, 200: BatchOut, **ERRORS},
          url_name="generate_data_key", exclude_none=True, summary="Generate a data key (registered in the inventory)")
def generate_data_key(request, name: str, payload: GenerateIn | GenerateBatchIn):
    client, actor = _start(request, ApiClient.Operation.GENERATE)

    if isinstance(payload, GenerateBatchIn):
        services.kek_for(client, name)  # a foreign KEK is 404 for the whole call, as for one item
        return Status(200, _generate_batch(request, client, actor, name, payload.batch))
    made = services.generate_data_key(client, name, actor=actor, context=payload.context, purpose=payload.purpose,
                                      owner_ref=payload.owner_ref)
    return Status(201, _generated(made, name))


def _generated(made: tuple | Exception, kek_name: str) -> dict:
    """One generated data key's answer (its plaintext wiped once encoded), or the exception it met, raised."""
    if isinstance(made, Exception):
        raise made
    row, plaintext = made
    try:
        return {"id": row.pk, "plaintext": _b64(plaintext), "ciphertext": _b64(row.wrapped_key),
                "kek": kek_name, "kek_version": row.kek_version}
    finally:
        plaintext[:] = bytes(len(plaintext))


def _generate_batch(request, client, actor, name: str, items: list[GenerateIn]) -> dict:
    """A batch's data keys registered together (one insert, one audit append), then answered item by item."""
    requests = [DataKeyRequest(encryption_context=item.context, purpose=item.purpose, owner_ref=item.owner_ref)
                for item in items]
    outcomes = services.generate_data_keys(client, name, requests, actor=actor)
    try:
        pending = iter(outcomes)
        return _batch(request, items, lambda item: _generated(next(pending), name))
    finally:
        for outcome in outcomes:  # those not answered (the call failed) are wiped too
            if not isinstance(outcome, Exception):
                outcome[1][:] = bytes(len(outcome[1]))


def _unwrap_one(request, client, actor, data_key_id: int, context: Context,
                batch: services.DataKeyBatch | None = None) -> dict:
    if not 0 < data_key_id < 2**63:
        raise ApiNotFound("no such data key")
    row, plaintext = services.unwrap_data_key(client, data_key_id, actor=actor, context=context, batch=batch)
    try:
        return {"id": row.pk, "plaintext": _b64(plaintext), "kek_version": row.kek_version}
    finally:
        plaintext[:] = bytes(len(plaintext))


@api.post("/data-keys/{data_key_id}/unwrap", response={200: PlaintextKeyOut, **ERRORS}, url_name="unwrap_data_key",
          summary="Unwrap a data key by id (always its current wrapping)")
def unwrap_data_key(request, data_key_id: int, payload: UnwrapIn):
    client, actor = _start(request, ApiClient.Operation.UNWRAP)
    result = _unwrap_one(request, client, actor, data_key_id, payload.context)
    return Status(200, {"plaintext": result["plaintext"], "kek_version": result["kek_version"]})


@api.post("/data-keys/unwrap", response={200: BatchOut, **ERRORS}, url_name="unwrap_data_keys", exclude_none=True,
          summary="Unwrap many data keys by id")
def unwrap_data_keys(request, payload: UnwrapBatchIn):
    client, actor = _start(request, ApiClient.Operation.UNWRAP)
    rows = services.DataKeyBatch(client, [item.id for item in payload.batch])
    return Status(200, _batch(request, payload.batch,
                              lambda item: _unwrap_one(request, client, actor, item.id, item.context, rows)))


@api.get("/data-keys/{data_key_id}", response={200: DataKeyMetadata, **ERRORS}, url_name="describe_data_key",
         summary="A data key's metadata (never key material)")
def describe_data_key(request, data_key_id: int):
    client, actor = _start(request, ApiClient.Operation.DESCRIBE)
    if not 0 < data_key_id < 2**63:
        raise ApiNotFound("no such data key")
    row = services.describe_data_key(client, data_key_id, actor=actor)
    return Status(200, {
        "id": row.pk, "kek": row.kek.name, "kek_version": row.kek_version, "key_spec": row.key_spec,
        "purpose": row.purpose, "owner_ref": row.owner_ref, "context_keys": sorted(row.encryption_context),
        "created_at": row.created_at.isoformat(),
        "last_rewrapped_at": row.last_rewrapped_at.isoformat() if row.last_rewrapped_at else None,
    })


@api.post("/keks/{name}/encrypt", response={200: CiphertextOut | BatchOut, **ERRORS}, url_name="encrypt",
          exclude_none=True, summary="Envelope-encrypt up to 4 KiB under a KEK")
def encrypt(request, name: str, payload: EncryptIn | EncryptBatchIn):
    client, actor = _start(request, ApiClient.Operation.ENCRYPT)

    def one(item: EncryptIn) -> dict:
        plaintext = _unb64(item.plaintext)
        return {"ciphertext": _b64(services.encrypt(client, name, plaintext, actor=actor, context=item.context))}

    if isinstance(payload, EncryptBatchIn):
        services.kek_for(client, name)
        return Status(200, _batch(request, payload.batch, one))
    return Status(200, one(payload))


def _blob_operation(operation: str, call: Callable, field: str):
    def view(request, payload: CiphertextIn | CiphertextBatchIn):
        client, actor = _start(request, operation)

        def one(item: CiphertextIn) -> dict:
            return {field: _b64(call(client, _unb64(item.ciphertext), actor=actor, context=item.context))}

        if isinstance(payload, CiphertextBatchIn):
            return Status(200, _batch(request, payload.batch, one))
        return Status(200, one(payload))

    return view


api.post("/decrypt", response={200: PlaintextOut | BatchOut, **ERRORS}, url_name="decrypt", exclude_none=True, operation_id="decrypt",
         summary="Open an envelope blob (the KEK comes from its header)")(
    _blob_operation(ApiClient.Operation.DECRYPT, services.decrypt, "plaintext"))
api.post("/rewrap", response={200: CiphertextOut | BatchOut, **ERRORS}, url_name="rewrap", exclude_none=True, operation_id="rewrap",
         summary="Move an envelope blob to its KEK's primary version")(
    _blob_operation(ApiClient.Operation.REWRAP, services.rewrap, "ciphertext"))


@api.get("/keks", response={200: KeksOut, **ERRORS}, url_name="list_keks", summary="The KEKs this client may use")
def list_keks(request):
    keks = []
    for kek in services.usable_keks(request.auth, actor=request._api_actor):
        primary = next((v.number for v in kek.versions.all() if v.is_primary), None)
        keks.append({"name": kek.name, "state": kek.state, "primary_version": primary, "provider": kek.provider})
    return Status(200, {"keks": keks})

"""AWS-specific behaviour of the AWS KMS provider, against moto's real HTTP server.

moto emulates the KMS API but never refuses cryptography on a disabled key or a
key pending deletion. Every test below that expects ``KeyDisabled`` therefore
tests the provider's *own* state check (DescribeKey before crypto, cached for
``state_ttl``), which is exactly the code that must work.

Faults moto cannot produce (throttling, 5xx, rejected credentials, AWS's
different ``AccessDeniedException`` wordings) come from a tiny HTTP server on
127.0.0.1 that answers the KMS JSON protocol with canned replies, so boto3's
real parsing and retry machinery runs end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from struct import pack

import boto3
import pytest

from keyvault.kms import (
    AccessDenied,
    Capability,
    ConfigurationError,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    KeyState,
    ProviderUnavailable,
    RewrapItem,
    Throttled,
    UnsupportedOperation,
    VersionState,
)
from keyvault.kms.aws import AWSKMSProvider, _Header
from tests.keyvault.kms.backends.aws import moto_provider
from tests.servers.http_proxy import HTTPProxy, aws_throttling
from tests.servers.moto import free_port, running_moto_server

CONTEXT = {"tenant": "acme"}


class FakeClock:
    """A monotonic clock the test moves by hand (for the state cache)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def new_name() -> str:
    return f"aws-test-{uuid.uuid4().hex[:12]}"


def header_bytes(*, reference: str, arn: str, version: int, payload: int = 0) -> bytes:
    """The documented wrapper header, built by hand (a known-answer check of the format)."""
    ref, key_arn = reference.encode(), arn.encode()
    return bytes((1, payload)) + pack(">H", len(ref)) + ref + pack(">H", len(key_arn)) + key_arn + pack(">I", version)


def header_context(*, reference: str, arn: str, version: int, payload: str = "raw") -> dict[str, str]:
    return {"kv:format": "1", "kv:payload": payload, "kv:key": reference, "kv:key-arn": arn, "kv:version": str(version)}


@pytest.fixture
def provider(moto_server):
    return moto_provider(moto_server)


@pytest.fixture
def kms(moto_server):
    """A plain boto3 client on the same server: 'someone else' acting on the keys."""
    return boto3.client("kms", region_name=moto_server.region, endpoint_url=moto_server.endpoint_url)


@pytest.fixture
def key(provider):
    name = new_name()
    provider.create_key(name, description="aws tests")
    return name


@pytest.fixture(scope="module")
def untouched_key(moto_server):
    """One key for the tests that must leave it unchanged (moto spends ~0.1 s per CreateKey)."""
    name = new_name()
    moto_provider(moto_server).create_key(name)
    return name


def arn_of(kms, name: str) -> str:
    return kms.describe_key(KeyId=f"alias/{name}")["KeyMetadata"]["Arn"]


def key_id_of(kms, name: str) -> str:
    """The bare key id (moto's DisableKey and friends refuse ARNs; AWS takes both)."""
    return kms.describe_key(KeyId=f"alias/{name}")["KeyMetadata"]["KeyId"]


# -- references --------------------------------------------------------------


def test_name_alias_id_and_arns_all_reach_the_key_and_are_reported_as_given(provider, kms, key):
    metadata = kms.describe_key(KeyId=f"alias/{key}")["KeyMetadata"]
    alias_arn = metadata["Arn"].replace(f":key/{metadata['KeyId']}", f":alias/{key}")
    references = [key, f"alias/{key}", metadata["KeyId"], metadata["Arn"], alias_arn]

    for reference in references:
        info = provider.describe_key(reference)
        sealed = provider.encrypt(reference, b"payload", encryption_context=CONTEXT)
        opened = provider.decrypt(sealed.ciphertext, encryption_context=CONTEXT)

        assert info.key_id == sealed.key_id == opened.key_id == reference
        assert opened.plaintext == b"payload"
        assert provider.encrypt(opened.key_id, b"round-trips").key_id == reference
        # The wrapper names the reference as given and the one key ARN behind all of them.
        assert sealed.ciphertext.startswith(header_bytes(reference=reference, arn=metadata["Arn"], version=1))


def test_create_key_makes_the_alias_and_tags_the_key(provider, kms):
    name = new_name()

    info = provider.create_key(name, description="orders")

    metadata = kms.describe_key(KeyId=f"alias/{name}")["KeyMetadata"]
    tags = kms.list_resource_tags(KeyId=metadata["KeyId"])["Tags"]
    assert (info.key_id, info.description, info.state) == (name, "orders", KeyState.ENABLED)
    assert metadata["KeySpec"] == "SYMMETRIC_DEFAULT" and metadata["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert {"TagKey": "keyvault:name", "TagValue": name} in tags


@pytest.mark.parametrize(
    "bad_name",
    ["", "has space", "aws/reserved", "alias/x", "arn:aws:kms:x", "1234abcd-12ab-34cd-56ef-1234567890ab", "x" * 251, 4],
)
def test_create_key_refuses_names_that_are_not_keyvault_names(provider, bad_name):
    with pytest.raises(ConfigurationError):
        provider.create_key(bad_name)


@pytest.mark.parametrize("bad_reference", ["has space", "aws/x", "", "alias/does-not-exist-" + uuid.uuid4().hex])
def test_unusable_references_are_key_not_found(provider, bad_reference):
    with pytest.raises(KeyNotFound):
        provider.describe_key(bad_reference)


# -- versions ----------------------------------------------------------------


def test_versions_are_one_plus_the_listed_rotations(provider, kms, key):
    arn = arn_of(kms, key)
    created = provider.describe_key(key).created_at

    # Rotations made outside Keyvault (console, automatic) count the same.
    kms.rotate_key_on_demand(KeyId=arn)
    kms.rotate_key_on_demand(KeyId=arn)
    info = provider.describe_key(key)

    rotations = sorted(r["RotationDate"] for r in kms.list_key_rotations(KeyId=arn)["Rotations"])
    assert [v.version for v in info.versions] == [1, 2, 3]
    assert info.primary_version == 3
    assert [v.created_at for v in info.versions] == [created, *rotations]
    assert all(v.state is VersionState.ENABLED and v.encrypt_count is None for v in info.versions)
    assert provider.rotate_key(key).version == 4


def test_recorded_version_is_a_lower_bound_until_the_cache_expires(moto_server, kms, key):
    clock = FakeClock()
    cached = moto_provider(moto_server, state_ttl=30, clock=clock)
    assert cached.encrypt(key, b"x").key_version == 1

    kms.rotate_key_on_demand(KeyId=arn_of(kms, key))
    stale = cached.encrypt(key, b"sealed with new material, recorded as v1")
    clock.now += 31
    fresh = cached.encrypt(key, b"y")

    assert stale.key_version == 1, "within state_ttl the older version is recorded (never a newer one)"
    assert cached.decrypt(stale.ciphertext).plaintext == b"sealed with new material, recorded as v1"
    assert fresh.key_version == 2


def test_a_ciphertext_from_a_newer_version_refreshes_the_cached_listing(moto_server, key):
    clock = FakeClock()
    reader = moto_provider(moto_server, state_ttl=300, clock=clock)
    writer = moto_provider(moto_server)
    # Caches the key (by ARN, as decrypt looks it up) with one version.
    assert reader.decrypt(reader.encrypt(key, b"v1 data").ciphertext).key_version == 1

    writer.rotate_key(key)
    newer = writer.encrypt(key, b"v2 data")

    assert reader.decrypt(newer.ciphertext).key_version == 2


def test_rotate_key_refuses_a_disabled_key(provider, kms, key):
    provider.set_key_state(key, KeyState.DISABLED)

    with pytest.raises(KeyDisabled):
        provider.rotate_key(key)
    assert kms.list_key_rotations(KeyId=arn_of(kms, key))["Rotations"] == []


@pytest.mark.parametrize("state", list(VersionState))
def test_no_per_version_state_at_aws(provider, untouched_key, state):
    key = untouched_key
    assert not provider.supports(Capability.DISABLE_VERSION)
    assert not provider.supports(Capability.DESTROY_VERSION)
    with pytest.raises(UnsupportedOperation):
        provider.set_key_version_state(key, 1, state)


# -- the wrapper -------------------------------------------------------------


def test_wrapper_format_known_answer_and_binding_to_the_aws_ciphertext(provider, kms, key):
    arn = arn_of(kms, key)
    header = header_bytes(reference=key, arn=arn, version=1)

    sealed = provider.encrypt(key, b"bound", encryption_context=CONTEXT).ciphertext
    blob = sealed[len(header) :]

    assert sealed.startswith(header)
    # The header fields are part of the encryption context AWS authenticated:
    bound = {**CONTEXT, **header_context(reference=key, arn=arn, version=1)}
    assert kms.decrypt(CiphertextBlob=blob, KeyId=arn, EncryptionContext=bound)["Plaintext"] == b"bound"
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=blob, KeyId=arn, EncryptionContext=CONTEXT)


def test_header_known_answer():
    arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    wrapped = bytes.fromhex("0100" "0005") + b"k-e-y" + bytes.fromhex("004b") + arn.encode() + bytes.fromhex("00000102")

    header, blob = _Header.unpack(wrapped + b"AWS")

    assert (header.payload, header.reference, header.key_arn, header.version, blob) == (0, "k-e-y", arn, 258, b"AWS")
    assert header.pack() == wrapped
    assert header.context() == header_context(reference="k-e-y", arn=arn, version=258)


@pytest.mark.parametrize(
    "malformed",
    [b"", b"\x01", b"\x02\x00", b"\x01\x02", bytes.fromhex("0100 0000 0000 00000001") + b"blob"],
    ids=["empty", "short", "format-2", "payload-2", "empty-fields"],
)
def test_malformed_headers_are_invalid_ciphertext(malformed):
    with pytest.raises(InvalidCiphertext):
        _Header.unpack(malformed)


def test_empty_plaintext_is_a_filler_marked_in_the_header(provider, kms, key):
    arn = arn_of(kms, key)
    sealed = provider.encrypt(key, b"").ciphertext
    header = header_bytes(reference=key, arn=arn, version=1, payload=1)
    raw_header = header_bytes(reference=key, arn=arn, version=1, payload=0)

    assert sealed.startswith(header)
    assert provider.decrypt(sealed).plaintext == b""
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(raw_header + sealed[len(header) :])


@pytest.mark.parametrize("field", ["version", "reference"])
def test_a_rewritten_header_is_invalid_ciphertext(provider, kms, key, field):
    arn = arn_of(kms, key)
    provider.rotate_key(key)
    other = new_name()
    provider.create_key(other)
    sealed = provider.encrypt(key, b"data").ciphertext
    blob = sealed[len(header_bytes(reference=key, arn=arn, version=2)) :]

    forged = {
        "version": dict(reference=key, arn=arn, version=1),
        "reference": dict(reference=other, arn=arn, version=2),
    }

    with pytest.raises(InvalidCiphertext):
        provider.decrypt(header_bytes(**forged[field]) + blob)


def test_a_wrapper_naming_a_missing_key_is_invalid_ciphertext(provider, kms, key):
    arn = arn_of(kms, key)
    sealed = provider.encrypt(key, b"data").ciphertext
    blob = sealed[len(header_bytes(reference=key, arn=arn, version=1)) :]
    missing = arn.rsplit("/", 1)[0] + f"/{uuid.uuid4()}"

    with pytest.raises(InvalidCiphertext):
        provider.decrypt(header_bytes(reference=key, arn=missing, version=1) + blob)
    with pytest.raises(InvalidCiphertext):
        provider.rewrap(header_bytes(reference=key, arn=missing, version=1) + blob)


def test_an_authentic_wrapper_naming_an_unlisted_version_is_invalid_ciphertext(provider, kms, key):
    # Someone with kms:Encrypt seals a blob whose (authenticated) header claims version 9.
    arn = arn_of(kms, key)
    blob = kms.encrypt(KeyId=arn, Plaintext=b"x", EncryptionContext=header_context(reference=key, arn=arn, version=9))[
        "CiphertextBlob"
    ]

    with pytest.raises(InvalidCiphertext):
        provider.decrypt(header_bytes(reference=key, arn=arn, version=9) + blob)


def test_reserved_context_keys_are_refused(provider, untouched_key):
    key = untouched_key
    sealed = provider.encrypt(key, b"data").ciphertext

    with pytest.raises(ConfigurationError):
        provider.encrypt(key, b"data", encryption_context={"KV:version": "1"})
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(sealed, encryption_context={"kv:version": "1"})


def test_plaintext_limits(provider, untouched_key):
    key = untouched_key
    assert provider.decrypt(provider.encrypt(key, bytes(4096)).ciphertext).plaintext == bytes(4096)
    with pytest.raises(UnsupportedOperation):
        provider.encrypt(key, bytes(4097))
    with pytest.raises(ConfigurationError):
        provider.encrypt(key, "text")


def test_rewrap_keeps_an_empty_plaintext_and_reports_the_target_reference(provider, kms, key):
    other = new_name()
    provider.create_key(other)
    sealed = provider.encrypt(key, b"", encryption_context=CONTEXT)

    moved = provider.rewrap(sealed.ciphertext, encryption_context=CONTEXT, key_id=f"alias/{other}")

    assert (moved.key_id, moved.key_version) == (f"alias/{other}", 1)
    expected = header_bytes(reference=f"alias/{other}", arn=arn_of(kms, other), version=1, payload=1)
    assert moved.ciphertext.startswith(expected)
    assert provider.decrypt(moved.ciphertext, encryption_context=CONTEXT).plaintext == b""


def test_rewrap_refuses_a_disabled_source_or_target(provider, key):
    target = new_name()
    provider.create_key(target)
    sealed = provider.encrypt(key, b"data").ciphertext

    provider.set_key_state(target, KeyState.DISABLED)
    with pytest.raises(KeyDisabled):
        provider.rewrap(sealed, key_id=target)
    provider.set_key_state(key, KeyState.DISABLED)
    with pytest.raises(KeyDisabled):
        provider.rewrap(sealed)


# -- key state checks (ours: moto does not refuse) ----------------------------


def test_a_key_disabled_elsewhere_is_refused_at_once_without_cache(moto_server, kms, key):
    uncached = moto_provider(moto_server, state_ttl=0)
    sealed = uncached.encrypt(key, b"data").ciphertext

    kms.disable_key(KeyId=key_id_of(kms, key))

    with pytest.raises(KeyDisabled):
        uncached.encrypt(key, b"more")
    with pytest.raises(KeyDisabled):
        uncached.decrypt(sealed)
    with pytest.raises(KeyDisabled):
        uncached.generate_data_key(key)


def test_a_key_disabled_elsewhere_is_refused_once_the_cached_state_expires(moto_server, kms, key):
    clock = FakeClock()
    cached = moto_provider(moto_server, state_ttl=10, clock=clock)
    cached.encrypt(key, b"warm")

    kms.disable_key(KeyId=key_id_of(kms, key))
    # Within state_ttl the cached state is used (real AWS would refuse by itself; moto does not).
    cached.encrypt(key, b"still within the ttl")
    clock.now += 10

    with pytest.raises(KeyDisabled):
        cached.encrypt(key, b"after the ttl")


def test_set_key_state_is_idempotent_and_reports_versions_disabled(provider, key):
    provider.rotate_key(key)

    first = provider.set_key_state(key, KeyState.DISABLED)
    second = provider.set_key_state(key, KeyState.DISABLED)

    assert first == second
    assert first.state is KeyState.DISABLED
    assert {v.state for v in first.versions} == {VersionState.DISABLED}
    with pytest.raises(UnsupportedOperation):
        provider.set_key_state(key, KeyState.PENDING_DELETION)
    with pytest.raises(UnsupportedOperation):
        provider.set_key_state(key, KeyState.DESTROYED)
    assert provider.set_key_state(key, "enabled").state is KeyState.ENABLED


# -- deletion ----------------------------------------------------------------


def test_schedule_and_cancel_deletion(provider, kms, key):
    sealed = provider.encrypt(key, b"data").ciphertext
    before = datetime.now(UTC)

    deletion = provider.schedule_key_deletion(key, pending_days=7)

    info = provider.describe_key(key)
    assert before + timedelta(days=7) - timedelta(minutes=1) <= deletion <= datetime.now(UTC) + timedelta(days=7)
    assert info.state is KeyState.PENDING_DELETION
    assert {v.state for v in info.versions} == {VersionState.DESTROY_SCHEDULED}
    assert kms.describe_key(KeyId=arn_of(kms, key))["KeyMetadata"]["KeyState"] == "PendingDeletion"
    for refused in (
        lambda: provider.encrypt(key, b"more"),
        lambda: provider.decrypt(sealed),
        lambda: provider.generate_data_key(key),
        lambda: provider.rewrap(sealed),
        lambda: provider.rotate_key(key),
        lambda: provider.schedule_key_deletion(key),
        lambda: provider.set_key_state(key, KeyState.ENABLED),
        lambda: provider.enable_automatic_rotation(key),
    ):
        with pytest.raises(KeyDisabled):
            refused()

    restored = provider.cancel_key_deletion(key)

    assert restored.state is KeyState.DISABLED, "AWS brings a cancelled key back disabled"
    with pytest.raises(KeyDisabled):
        provider.decrypt(sealed)
    provider.set_key_state(key, KeyState.ENABLED)
    assert provider.decrypt(sealed).plaintext == b"data"


def test_cancel_needs_a_pending_deletion(provider, untouched_key):
    key = untouched_key
    with pytest.raises(KeyDisabled):
        provider.cancel_key_deletion(key)


@pytest.mark.parametrize("days", [6, 31, 0, -7, 7.0, "7", True, None])
def test_deletion_window_is_validated(provider, untouched_key, days):
    key = untouched_key
    with pytest.raises(ConfigurationError):
        provider.schedule_key_deletion(key, pending_days=days)
    assert provider.describe_key(key).state is KeyState.ENABLED


def test_destroy_key_schedules_the_minimum_window(provider, kms, key):
    before = datetime.now(UTC)

    provider.destroy_key(key)

    metadata = kms.describe_key(KeyId=arn_of(kms, key))["KeyMetadata"]
    assert metadata["KeyState"] == "PendingDeletion"
    assert metadata["DeletionDate"] < before + timedelta(days=8)
    # The name stays taken while the key is pending deletion.
    with pytest.raises(ConfigurationError):
        provider.create_key(key)


# -- automatic rotation ------------------------------------------------------


@pytest.mark.parametrize("days", [90, 2560])
def test_automatic_rotation_accepts_the_aws_range(provider, key, days):
    assert provider.automatic_rotation(key).enabled is False

    assert provider.enable_automatic_rotation(key, period_days=days).enabled is True
    assert provider.disable_automatic_rotation(key).enabled is False


@pytest.mark.parametrize("days", [89, 2561, 0, 365.0, "365", True, None])
def test_automatic_rotation_period_is_validated(provider, untouched_key, days):
    key = untouched_key
    with pytest.raises(ConfigurationError):
        provider.enable_automatic_rotation(key, period_days=days)
    assert provider.automatic_rotation(key).enabled is False


def test_automatic_rotation_needs_an_enabled_key(provider, key):
    provider.set_key_state(key, KeyState.DISABLED)

    with pytest.raises(KeyDisabled):
        provider.enable_automatic_rotation(key, period_days=365)


# -- errors from a real (moto) server -----------------------------------------


def test_stopping_the_server_mid_test_is_provider_unavailable(aws_credentials):
    with running_moto_server() as private:
        provider = moto_provider(private, connect_timeout=0.5, read_timeout=0.5, max_attempts=1)
        name = new_name()
        provider.create_key(name)
        sealed = provider.encrypt(name, b"data").ciphertext
        assert provider.health_check().healthy

        private.stop()

        # The key state is cached, so these reach Encrypt/Decrypt themselves.
        with pytest.raises(ProviderUnavailable) as raised:
            provider.encrypt(name, b"more")
        assert raised.value.retryable
        with pytest.raises(ProviderUnavailable):
            provider.decrypt(sealed)
        with pytest.raises(ProviderUnavailable):
            provider.describe_key(name)
        status = provider.health_check()
        assert not status.healthy
        assert "ProviderUnavailable" in status.detail


def test_key_policy_denial_is_access_denied(moto_server, kms, key):
    uncached = moto_provider(moto_server, state_ttl=0)
    sealed = uncached.encrypt(key, b"data").ciphertext
    deny = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": {"AWS": "*"}, "Action": "kms:DescribeKey", "Resource": "*"}],
    }
    kms.put_key_policy(KeyId=arn_of(kms, key), PolicyName="default", Policy=json.dumps(deny))

    with pytest.raises(AccessDenied):
        uncached.describe_key(key)
    with pytest.raises(AccessDenied):
        uncached.encrypt(key, b"more")
    with pytest.raises(AccessDenied):
        uncached.decrypt(sealed)


# -- errors moto cannot produce: a canned KMS endpoint -------------------------

STUB_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
STUB_METADATA = {
    "KeyMetadata": {
        "KeyId": "1234abcd-12ab-34cd-56ef-1234567890ab",
        "Arn": STUB_ARN,
        "KeyState": "Enabled",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "CreationDate": 1700000000.0,
        "Description": "",
    }
}
STUB_HEALTHY = {"DescribeKey": (200, STUB_METADATA), "ListKeyRotations": (200, {"Rotations": [], "Truncated": False})}


class CannedKMS:
    """An HTTP server on 127.0.0.1 answering KMS JSON calls from a table ``{operation: (status, body)}``."""

    def __init__(self, replies: dict[str, tuple[int, object]]) -> None:
        self.replies = replies
        self.calls: Counter[str] = Counter()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                operation = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
                stub.calls[operation] += 1
                status, body = stub.replies.get(operation, (400, {"__type": "UnknownOperationException"}))
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def provider(self, **options) -> AWSKMSProvider:
        settings = {"connect_timeout": 1.0, "read_timeout": 2.0, "max_attempts": 1, "state_ttl": 0, **options}
        return AWSKMSProvider(region="us-east-1", endpoint_url=self.endpoint_url, **settings)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def canned(aws_credentials):
    stubs: list[CannedKMS] = []

    def start(replies: dict[str, tuple[int, object]]) -> CannedKMS:
        stubs.append(CannedKMS(replies))
        return stubs[-1]

    yield start
    for stub in stubs:
        stub.close()


def error(code: str, message: str = "", status: int = 400) -> tuple[int, dict]:
    return status, {"__type": code, "message": message}


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (error("ThrottlingException", "Rate exceeded"), Throttled),
        (error("KMSInternalException", status=500), ProviderUnavailable),
        ((503, b"<html>Service Unavailable</html>"), ProviderUnavailable),
        (error("DependencyTimeoutException", status=503), ProviderUnavailable),
        (error("AccessDeniedException", "User: x is not authorized to perform: kms:Encrypt"), AccessDenied),
        (error("UnrecognizedClientException", "The security token included in the request is invalid."), AccessDenied),
        (error("NotFoundException"), KeyNotFound),
        (error("DisabledException"), KeyDisabled),
        (error("KMSInvalidStateException"), KeyDisabled),
        (error("LimitExceededException"), ConfigurationError),
    ],
    ids=["throttled", "500", "503-html", "dependency-timeout", "iam-denial", "bad-credentials", "not-found", "disabled",
         "invalid-state", "limit-exceeded"],
)
def test_encrypt_error_mapping(canned, reply, expected):
    stub = canned({**STUB_HEALTHY, "Encrypt": reply})

    with pytest.raises(expected):
        stub.provider().encrypt(STUB_ARN, b"data")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (error("InvalidCiphertextException"), InvalidCiphertext),
        (error("IncorrectKeyException"), InvalidCiphertext),
        (error("NotFoundException"), InvalidCiphertext),
        (error("AccessDeniedException", "The ciphertext refers to a customer master key that does not exist"),
         InvalidCiphertext),
        (error("AccessDeniedException", "User: x is not authorized to perform: kms:Decrypt on resource: y"),
         AccessDenied),
        (error("ThrottlingException"), Throttled),
        (error("KMSInternalException", status=500), ProviderUnavailable),
        (error("DisabledException"), KeyDisabled),
    ],
    ids=[
        "invalid", "incorrect-key", "not-found", "ciphertext-names-unknown-key", "iam-denial", "throttled", "5xx",
        "disabled",
    ],
)
def test_decrypt_error_mapping(canned, reply, expected):
    stub = canned({**STUB_HEALTHY, "Decrypt": reply})
    wrapped = header_bytes(reference=STUB_ARN, arn=STUB_ARN, version=1) + b"opaque aws blob"

    with pytest.raises(expected):
        stub.provider().decrypt(wrapped)


def test_throttling_is_retried_max_attempts_times(canned):
    stub = canned({**STUB_HEALTHY, "Encrypt": error("ThrottlingException", "Rate exceeded")})

    with pytest.raises(Throttled):
        stub.provider(max_attempts=2).encrypt(STUB_ARN, b"data")
    assert stub.calls["Encrypt"] == 2


# -- throttling and bulk rewrap against moto, through a proxy --------------------------------------


@pytest.fixture
def throttling_proxy(moto_server):
    """moto behind :class:`HTTPProxy`; set ``proxy.fault`` to answer some requests as AWS does when throttling."""
    with HTTPProxy(moto_server.endpoint_url) as proxy:
        yield proxy


def test_a_throttled_reencrypt_is_typed_throttled_everywhere(moto_server, throttling_proxy, key):
    provider = moto_provider(moto_server, endpoint_url=throttling_proxy.url, max_attempts=2)
    items = [RewrapItem(provider.encrypt(key, b"dek %d" % n, encryption_context=CONTEXT).ciphertext, CONTEXT)
             for n in range(5)]
    throttling_proxy.fault = aws_throttling(operations={"ReEncrypt", "Encrypt"})

    with pytest.raises(Throttled) as single:
        provider.rewrap(items[0].ciphertext, encryption_context=CONTEXT)
    with pytest.raises(Throttled) as batch:
        provider.rewrap_many(items)
    with pytest.raises(Throttled):
        provider.encrypt(key, b"more")

    # botocore's standard mode retried each throttled call once (max_attempts=2) before giving up.
    assert throttling_proxy.answered >= 2 * 3
    assert isinstance(batch.value, ProviderUnavailable) and batch.value.retryable
    assert "ThrottlingException" in str(single.value) and single.value.retry_after is None
    throttling_proxy.fault = None
    assert [result.key_version for result in provider.rewrap_many(items)] == [1] * 5


def test_throttled_carries_a_retry_after_the_endpoint_sends(moto_server, throttling_proxy, key):
    provider = moto_provider(moto_server, endpoint_url=throttling_proxy.url, max_attempts=1)
    ciphertext = provider.encrypt(key, b"dek").ciphertext
    throttling_proxy.fault = aws_throttling(retry_after=3)

    with pytest.raises(Throttled) as throttled:
        provider.decrypt(ciphertext)

    assert throttled.value.retry_after == 3.0


def test_rewrap_many_keeps_at_most_concurrency_reencrypts_in_flight(moto_server, key):
    with HTTPProxy(moto_server.endpoint_url, delay=0.05) as proxy:
        provider = moto_provider(moto_server, endpoint_url=proxy.url, concurrency=6)
        items = [RewrapItem(provider.encrypt(key, b"dek %d" % n).ciphertext) for n in range(30)]
        provider.rotate_key(key)
        proxy.reset_counts()

        results = provider.rewrap_many(items)

    assert [result.key_version for result in results] == [2] * 30
    assert proxy.forwarded == 30 + 2, "30 ReEncrypts, and the key's state fetched once by ARN before them"
    assert 1 < proxy.peak_in_flight <= 6
    assert provider.decrypt(results[29].ciphertext).plaintext == b"dek 29"


def test_rewrap_many_fetches_each_keys_state_once_not_per_request(moto_server, key):
    with HTTPProxy(moto_server.endpoint_url) as proxy:
        provider = moto_provider(moto_server, endpoint_url=proxy.url, concurrency=8)
        items = [RewrapItem(moto_provider(moto_server).encrypt(key, b"%d" % n).ciphertext) for n in range(16)]

        provider.rewrap_many(items)

    # DescribeKey + ListKeyRotations for the key by ARN and by alias, then 16 ReEncrypts.
    assert proxy.forwarded == 4 + 16


def test_concurrency_option_sizes_the_connection_pool(moto_server):
    provider = AWSKMSProvider.from_config(
        {"region": moto_server.region, "endpoint_url": moto_server.endpoint_url, "concurrency": 40}
    )

    assert provider.concurrency == 40
    assert provider._client.meta.config.max_pool_connections == 40


def test_health_counts_a_listkeys_denial_as_healthy_but_not_bad_credentials(canned):
    denied = canned({"ListKeys": error("AccessDeniedException", "User: x is not authorized to perform: kms:ListKeys")})
    rejected = canned({"ListKeys": error("UnrecognizedClientException", "The security token is invalid.")})

    assert denied.provider().health_check().healthy
    status = rejected.provider().health_check()
    assert not status.healthy
    assert "AccessDenied" in status.detail


# -- configuration -----------------------------------------------------------


def test_missing_boto3_is_a_configuration_error_naming_it(monkeypatch, moto_server):
    monkeypatch.setitem(sys.modules, "boto3", None)

    with pytest.raises(ConfigurationError, match="boto3"):
        AWSKMSProvider(region=moto_server.region, endpoint_url=moto_server.endpoint_url)


def test_module_imports_without_boto3_and_fails_only_when_built():
    code = (
        "import sys; sys.modules['boto3'] = None\n"
        "from keyvault.kms.registry import load_provider_class\n"
        "cls = load_provider_class('aws')\n"
        "try:\n    cls.from_config({'region': 'us-east-1'})\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)

    assert result.stdout.startswith("ConfigurationError") and "pip install boto3" in result.stdout


def test_from_config_takes_the_settings_options(moto_server):
    options = {
        "region": moto_server.region,
        "endpoint_url": moto_server.endpoint_url,
        "connect_timeout": 1.5,
        "read_timeout": 4.0,
        "max_attempts": 4,
    }

    provider = AWSKMSProvider.from_config(options)

    config = provider._client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (1.5, 4.0)
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}, "max_attempts counts the first try too"
    assert provider.health_check().healthy


@pytest.mark.parametrize(
    "options",
    [
        {"region": "us-east-1", "surprise": 1},
        {"region": "us-east-1", "connect_timeout": 0},
        {"region": "us-east-1", "read_timeout": "soon"},
        {"region": "us-east-1", "max_attempts": 0},
        {"region": "us-east-1", "state_ttl": -1},
        {"region": "us-east-1", "endpoint_url": "127.0.0.1:4566"},
        {"region": "us-east-1", "concurrency": 0},
        {"region": "us-east-1", "concurrency": 10_000},
        {"region": "us-east-1", "concurrency": 2.5},
    ],
)
def test_bad_options_are_configuration_errors(aws_credentials, options):
    with pytest.raises(ConfigurationError):
        AWSKMSProvider.from_config(options)


def test_no_region_anywhere_is_a_configuration_error(aws_credentials, monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)

    with pytest.raises(ConfigurationError, match="region"):
        AWSKMSProvider(endpoint_url=f"http://127.0.0.1:{free_port()}")

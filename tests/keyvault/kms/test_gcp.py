"""The Cloud KMS provider beyond the contract suite: integrity checks, version names,
destroy/restore, error mapping, outages and configuration.

The server is ``tests.servers.gcp_kms``, an emulator of the documented Cloud KMS
v1 REST API written from Google's public REST reference; the client is the real
google-cloud-kms SDK over its REST transport.
"""

import base64
import json
import sys
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime

import pytest

from keyvault.kms import (
    AccessDenied,
    ConfigurationError,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    KeyState,
    KMSError,
    ProviderUnavailable,
    RewrapItem,
    Throttled,
    UnsupportedOperation,
    VersionState,
)
from keyvault.kms.gcp import INTEGRITY_ATTEMPTS, MAX_PLAINTEXT, GCPKMSProvider, crc32c
from tests.servers import gcp_kms
from tests.servers.gcp_kms import CloudKMSEmulator
from tests.servers.http_proxy import HTTPProxy, gcp_resource_exhausted

CONTEXT = {"tenant": "acme"}
DAY = 24 * 3600


@pytest.fixture(scope="module")
def module_emulator():
    server = CloudKMSEmulator().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def emulator(module_emulator):
    """The module's emulator, with no fault left over for the next test."""
    yield module_emulator
    module_emulator.reset_faults()


def make_provider(emulator, *, key_ring=None, timeout=5.0, endpoint=None, concurrency=16):
    return GCPKMSProvider(
        project="keyvault-test",
        location="europe-west1",
        key_ring=key_ring or f"ring-{uuid.uuid4().hex[:8]}",
        endpoint=endpoint or emulator.url,
        anonymous_credentials=True,
        timeout=timeout,
        concurrency=concurrency,
    )


@pytest.fixture(scope="module")
def ring(module_emulator):
    return f"ring-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def provider(emulator, ring):
    return make_provider(emulator, key_ring=ring)


@pytest.fixture
def key_id(provider):
    key = f"key-{uuid.uuid4().hex[:8]}"
    provider.create_key(key)
    return key


def rpcs_since(emulator, mark):
    return [rpc for _, _, rpc in list(emulator.calls)[mark:]]


# -- CRC32C --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        (b"123456789", 0xE3069283),  # the standard check value of CRC-32C
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4 test vectors
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_known_answers(data, expected):
    assert crc32c(data) == expected


def test_crc32c_agrees_with_the_emulators_bitwise_implementation():
    data = bytes(range(256)) * 5 + b"tail"

    assert crc32c(data) == gcp_kms.crc32c(data)


# -- ciphertext layout -----------------------------------------------------


def test_ciphertext_header_names_key_and_version(provider, key_id):
    ciphertext = provider.encrypt(key_id, b"payload").ciphertext
    key_bytes = key_id.encode()

    assert ciphertext[0] == 1
    assert ciphertext[1] == len(key_bytes)
    assert ciphertext[2 : 2 + len(key_bytes)] == key_bytes
    assert int.from_bytes(ciphertext[2 + len(key_bytes) : 6 + len(key_bytes)], "big") == 1


def test_header_relabelled_to_another_live_version_is_invalid(provider, key_id):
    # Given a v1 ciphertext and a key that also has an enabled version 2
    old = provider.encrypt(key_id, b"v1 data", encryption_context=CONTEXT).ciphertext
    provider.rotate_key(key_id)
    offset = 2 + len(key_id)

    # When its header is changed to claim version 2
    relabelled = old[:offset] + (2).to_bytes(4, "big") + old[offset + 4 :]

    # Then Cloud KMS refuses it: the header is part of the AAD
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(relabelled, encryption_context=CONTEXT)
    assert provider.decrypt(old, encryption_context=CONTEXT).key_version == 1


def test_ciphertext_without_our_plaintext_marker_is_invalid(provider, key_id, emulator):
    # Given a Cloud KMS ciphertext made directly with our AAD but without the marker byte
    header = provider.encrypt(key_id, b"x").ciphertext[: 2 + len(key_id) + 4]
    aad = header + b"\x00\x00\x00\x00"  # encode_context(None)
    request = {"name": provider._key_name(key_id), "plaintext": b"\x01raw", "additional_authenticated_data": aad}
    raw = provider._client.encrypt(request=request)

    with pytest.raises(InvalidCiphertext):
        provider.decrypt(header + raw.ciphertext)


def test_largest_plaintext_round_trips_and_larger_is_refused(provider, key_id):
    data = bytes(range(256)) * (MAX_PLAINTEXT // 256) + bytes(MAX_PLAINTEXT % 256)

    assert provider.decrypt(provider.encrypt(key_id, data).ciphertext).plaintext == data
    with pytest.raises(UnsupportedOperation):
        provider.encrypt(key_id, data + b"!")


# -- integrity (CRC32C) ------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["ciphertextCrc32c", "ciphertext", "verifiedPlaintextCrc32c", "verifiedAdditionalAuthenticatedDataCrc32c"]
)
def test_a_damaged_encrypt_response_is_discarded_and_retried(provider, key_id, emulator, field):
    emulator.corrupt_next(field, methods={"encrypt"})
    mark = len(emulator.calls)

    result = provider.encrypt(key_id, b"protected", encryption_context=CONTEXT)

    assert rpcs_since(emulator, mark) == ["encrypt", "encrypt"]
    assert provider.decrypt(result.ciphertext, encryption_context=CONTEXT).plaintext == b"protected"


@pytest.mark.parametrize("field", ["ciphertextCrc32c", "ciphertext", "verifiedPlaintextCrc32c"])
def test_a_persistently_damaged_encrypt_response_raises(provider, key_id, emulator, field):
    emulator.corrupt_next(field, times=INTEGRITY_ATTEMPTS, methods={"encrypt"})

    with pytest.raises(ProviderUnavailable, match="CRC32C"):
        provider.encrypt(key_id, b"protected")


@pytest.mark.parametrize("field", ["plaintext", "plaintextCrc32c"])
def test_a_damaged_decrypt_response_is_discarded_and_retried(provider, key_id, emulator, field):
    ciphertext = provider.encrypt(key_id, b"protected").ciphertext
    emulator.corrupt_next(field, methods={"decrypt"})

    assert provider.decrypt(ciphertext).plaintext == b"protected"


def test_a_persistently_damaged_plaintext_is_never_returned(provider, key_id, emulator):
    ciphertext = provider.encrypt(key_id, b"protected").ciphertext
    emulator.corrupt_next("plaintext", times=INTEGRITY_ATTEMPTS, methods={"decrypt"})

    with pytest.raises(ProviderUnavailable, match="CRC32C"):
        provider.decrypt(ciphertext)
    assert provider.decrypt(ciphertext).plaintext == b"protected"


def test_the_emulator_checks_request_checksums(emulator, ring, key_id):
    # The provider's checksums are only worth something if the server checks them.
    path = f"/v1/projects/keyvault-test/locations/europe-west1/keyRings/{ring}/cryptoKeys/{key_id}:encrypt"
    body = {"plaintext": base64.b64encode(b"abc").decode(), "plaintextCrc32c": str(crc32c(b"abd"))}

    status, answer = _http(emulator, "POST", path, body)

    assert (status, answer["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert "plaintext_crc32c" in answer["error"]["message"]


# -- version names -------------------------------------------------------


def test_encrypt_costs_one_call_and_reads_no_key_metadata(provider, key_id, emulator):
    mark = len(emulator.calls)

    provider.encrypt(key_id, b"x")

    assert rpcs_since(emulator, mark) == ["encrypt"]


def test_rotation_made_elsewhere_is_noticed_on_the_next_encrypt(emulator, ring, key_id):
    # Given two processes; the second rotates the key
    first, second = make_provider(emulator, key_ring=ring), make_provider(emulator, key_ring=ring)
    assert first.encrypt(key_id, b"before").key_version == 1
    second.rotate_key(key_id)
    mark = len(emulator.calls)

    # When the first encrypts again
    result = first.encrypt(key_id, b"after", encryption_context=CONTEXT)

    # Then it redid the encryption naming version 2, and its header says so
    assert result.key_version == 2
    assert rpcs_since(emulator, mark) == ["encrypt", "encrypt"]
    assert emulator.calls[-1][1].endswith(f"/cryptoKeys/{key_id}/cryptoKeyVersions/2:encrypt")
    assert first.decrypt(result.ciphertext, encryption_context=CONTEXT).key_version == 2
    assert first.encrypt(key_id, b"again").key_version == 2


def test_a_response_naming_another_version_is_not_trusted_blindly(provider, key_id, emulator):
    # Given a key whose primary is version 2
    provider.rotate_key(key_id)

    # When Cloud KMS's answer names version 1 once
    emulator.corrupt_next("name", methods={"encrypt"})
    result = provider.encrypt(key_id, b"data", encryption_context=CONTEXT)

    # Then the provider re-encrypted naming version 1, so the header is true
    assert result.key_version == 1
    opened = provider.decrypt(result.ciphertext, encryption_context=CONTEXT)
    assert (opened.key_version, opened.plaintext) == (1, b"data")


def test_a_response_naming_another_version_than_the_one_requested_raises(provider, key_id, emulator):
    provider.rotate_key(key_id)
    emulator.corrupt_next("name", times=2, methods={"encrypt"})

    with pytest.raises(KMSError, match="although"):
        provider.encrypt(key_id, b"data")


# -- lifecycle: describe, destroy, restore ------------------------------------


def test_describe_key_maps_versions_and_times(provider, key_id):
    provider.rotate_key(key_id)
    provider.set_key_version_state(key_id, 1, VersionState.DISABLED)

    info = provider.describe_key(key_id)

    assert info.state is KeyState.ENABLED
    assert info.primary_version == 2
    assert [(v.version, v.state) for v in info.versions] == [(1, VersionState.DISABLED), (2, VersionState.ENABLED)]
    assert abs((datetime.now(UTC) - info.created_at).total_seconds()) < 60
    assert info.versions[0].encrypt_count is None


def test_destroy_schedules_and_restore_brings_the_version_back_disabled(provider, key_id):
    # Given a v1 ciphertext and a rotated key
    old = provider.encrypt(key_id, b"v1 data").ciphertext
    provider.rotate_key(key_id)

    # When version 1 is destroyed
    destroyed = provider.set_key_version_state(key_id, 1, VersionState.DESTROYED)

    # Then Cloud KMS only schedules it, and nothing decrypts with it meanwhile
    assert destroyed.state is VersionState.DESTROY_SCHEDULED
    with pytest.raises(InvalidCiphertext):  # a version's state is never said on decrypt (kms/README.md)
        provider.decrypt(old)

    # When it is restored, it comes back disabled; enabling it makes the data readable again
    restored = provider.restore_key_version(key_id, 1)
    assert restored.state is VersionState.DISABLED
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(old)
    provider.set_key_version_state(key_id, 1, VersionState.ENABLED)
    assert provider.decrypt(old).plaintext == b"v1 data"


def test_destroy_becomes_final_after_the_scheduled_duration(provider, key_id, emulator):
    old = provider.encrypt(key_id, b"v1 data").ciphertext
    provider.rotate_key(key_id)
    provider.set_key_version_state(key_id, 1, VersionState.DESTROY_SCHEDULED)

    emulator.advance(31 * DAY)

    assert provider.describe_key(key_id).version(1).state is VersionState.DESTROYED
    with pytest.raises(KeyDisabled):
        provider.restore_key_version(key_id, 1)
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(old)


def test_restore_of_a_live_version_is_refused(provider, key_id):
    with pytest.raises(KeyDisabled):
        provider.restore_key_version(key_id, 1)
    with pytest.raises(KeyNotFound):
        provider.restore_key_version(key_id, 9)


def test_the_primary_version_cannot_be_destroyed(provider, key_id):
    with pytest.raises(KeyDisabled, match="primary"):
        provider.set_key_version_state(key_id, 1, VersionState.DESTROYED)
    assert provider.describe_key(key_id).version(1).state is VersionState.ENABLED


def test_set_primary_version_rolls_a_rotation_back(provider, key_id, emulator):
    provider.rotate_key(key_id)

    info = provider.set_primary_version(key_id, 1)

    assert info.primary_version == 1
    mark = len(emulator.calls)
    assert provider.encrypt(key_id, b"x").key_version == 1
    assert rpcs_since(emulator, mark) == ["encrypt"]


def test_set_primary_version_needs_an_enabled_existing_version(provider, key_id):
    provider.rotate_key(key_id)
    provider.set_key_version_state(key_id, 1, VersionState.DISABLED)

    with pytest.raises(KeyDisabled):
        provider.set_primary_version(key_id, 1)
    with pytest.raises(KeyNotFound):
        provider.set_primary_version(key_id, 5)
    assert provider.describe_key(key_id).primary_version == 2


def test_unknown_version_is_key_not_found(provider, key_id):
    for bad in (7, 0, "1"):
        with pytest.raises(KeyNotFound):
            provider.set_key_version_state(key_id, bad, VersionState.DISABLED)


def test_invalid_key_id_is_refused(provider):
    with pytest.raises(ConfigurationError):
        provider.create_key("no spaces allowed")
    with pytest.raises(ConfigurationError):
        provider.create_key("x" * 64)
    with pytest.raises(KeyNotFound):
        provider.encrypt("../other-ring", b"x")


def test_key_ring_is_created_on_first_use(emulator):
    # Given a key ring that does not exist yet
    fresh = make_provider(emulator)
    status = fresh.health_check()
    assert status.healthy and "is not created yet" in status.detail

    # When the first key is created, the ring is created with it
    fresh.create_key("first")

    assert "reachable" in fresh.health_check().detail
    other = make_provider(emulator, key_ring=fresh.key_ring)
    mark = len(emulator.calls)
    other.create_key("second")
    assert rpcs_since(emulator, mark) == ["createCryptoKey"]


def test_a_key_ring_created_meanwhile_by_another_process_is_fine(emulator, ring, key_id):
    # Given a fresh process whose first createCryptoKey races with the ring's creation elsewhere
    racing = make_provider(emulator, key_ring=ring)
    emulator.fail_next("NOT_FOUND", methods={"createCryptoKey"})
    mark = len(emulator.calls)

    racing.create_key("raced")

    assert rpcs_since(emulator, mark) == ["createCryptoKey", "createKeyRing", "createCryptoKey"]
    assert racing.describe_key("raced").primary_version == 1


def test_describe_key_reads_every_page_of_versions(provider, key_id, emulator, monkeypatch):
    monkeypatch.setattr("keyvault.kms.gcp.LIST_PAGE_SIZE", 2)
    for _ in range(4):
        provider.rotate_key(key_id)
    mark = len(emulator.calls)

    info = provider.describe_key(key_id)

    assert [v.version for v in info.versions] == [1, 2, 3, 4, 5]
    assert rpcs_since(emulator, mark) == ["getCryptoKey"] + ["listCryptoKeyVersions"] * 3


# -- error mapping ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        ("PERMISSION_DENIED", AccessDenied),
        ("UNAUTHENTICATED", AccessDenied),
        ("NOT_FOUND", KeyNotFound),
        ("FAILED_PRECONDITION", KeyDisabled),
        ("INVALID_ARGUMENT", ConfigurationError),
        ("UNIMPLEMENTED", UnsupportedOperation),
    ],
)
def test_encrypt_errors_are_mapped(provider, key_id, emulator, status, error):
    emulator.fail_next(status, methods={"encrypt"})

    with pytest.raises(error) as raised:
        provider.encrypt(key_id, b"x")
    assert type(raised.value) is error
    assert status in str(raised.value)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        ("INVALID_ARGUMENT", InvalidCiphertext),
        ("NOT_FOUND", InvalidCiphertext),
        ("FAILED_PRECONDITION", InvalidCiphertext),  # a version's state, checked before authenticating
        ("PERMISSION_DENIED", AccessDenied),
    ],
)
def test_decrypt_errors_are_mapped(provider, key_id, emulator, status, error):
    ciphertext = provider.encrypt(key_id, b"x").ciphertext
    emulator.fail_next(status, methods={"decrypt"})

    with pytest.raises(error) as raised:
        provider.decrypt(ciphertext)
    assert type(raised.value) is error


def test_invalid_ciphertext_says_nothing_about_why(provider, key_id):
    ciphertext = provider.encrypt(key_id, b"x", encryption_context=CONTEXT).ciphertext

    with pytest.raises(InvalidCiphertext) as raised:
        provider.decrypt(ciphertext, encryption_context={"tenant": "other"})
    assert str(raised.value) == str(InvalidCiphertext())
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


@pytest.mark.parametrize("status", ["UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "RESOURCE_EXHAUSTED"])
def test_transient_errors_are_retried(provider, key_id, emulator, status):
    ciphertext = provider.encrypt(key_id, b"x").ciphertext
    emulator.fail_next(status, times=2)
    mark = len(emulator.calls)

    assert provider.decrypt(ciphertext).plaintext == b"x"
    assert rpcs_since(emulator, mark) == ["decrypt"] * 3


def test_an_unreadable_answer_is_provider_unavailable(provider, key_id, emulator):
    emulator.garble_next(methods={"encrypt"})

    with pytest.raises(ProviderUnavailable, match="not a readable"):
        provider.encrypt(key_id, b"x")
    assert provider.encrypt(key_id, b"x").key_version == 1


def test_persistent_transient_errors_become_provider_unavailable(emulator, ring, key_id):
    impatient = make_provider(emulator, key_ring=ring, timeout=0.4)
    emulator.fail_next("UNAVAILABLE", times=1000)

    with pytest.raises(ProviderUnavailable) as raised:
        impatient.encrypt(key_id, b"x")
    assert raised.value.retryable


def test_persistent_resource_exhausted_is_throttled(emulator, ring, key_id):
    impatient = make_provider(emulator, key_ring=ring, timeout=0.4)
    ciphertext = impatient.encrypt(key_id, b"x").ciphertext
    emulator.fail_next("RESOURCE_EXHAUSTED", times=1000)

    with pytest.raises(Throttled) as encrypting:
        impatient.encrypt(key_id, b"x")
    with pytest.raises(Throttled):
        impatient.decrypt(ciphertext)
    with pytest.raises(Throttled):
        impatient.rewrap_many([RewrapItem(ciphertext)])

    assert isinstance(encrypting.value, ProviderUnavailable) and encrypting.value.retryable
    assert "RESOURCE_EXHAUSTED" in str(encrypting.value)


def test_throttled_carries_the_retry_delay_cloud_kms_asks_for(emulator, ring, key_id):
    with HTTPProxy(emulator.url, fault=gcp_resource_exhausted(retry_delay="1.5s")) as proxy:
        impatient = make_provider(emulator, key_ring=ring, timeout=0.3, endpoint=proxy.url)

        with pytest.raises(Throttled) as throttled:
            impatient.encrypt(key_id, b"x")

    assert throttled.value.retry_after == 1.5
    assert proxy.answered >= 1 and proxy.forwarded == 0


def test_rewrap_many_keeps_at_most_concurrency_items_in_flight(emulator, ring, key_id):
    plain = make_provider(emulator, key_ring=ring)
    items = [RewrapItem(plain.encrypt(key_id, b"dek %d" % n, encryption_context=CONTEXT).ciphertext, CONTEXT)
             for n in range(24)]
    plain.rotate_key(key_id)
    with HTTPProxy(emulator.url, delay=0.05) as proxy:
        provider = make_provider(emulator, key_ring=ring, endpoint=proxy.url, concurrency=5)

        results = provider.rewrap_many(items)

    assert [result.key_version for result in results] == [2] * 24
    assert 1 < proxy.peak_in_flight <= 5
    assert plain.decrypt(results[23].ciphertext, encryption_context=CONTEXT).plaintext == b"dek 23"


def test_concurrency_option_is_validated_and_sizes_the_connection_pool(emulator):
    provider = GCPKMSProvider.from_config(
        {"project": "p", "key_ring": "r", "endpoint": emulator.url, "anonymous_credentials": True, "concurrency": 32}
    )
    adapter = provider._client._transport._session.get_adapter(emulator.url)

    assert provider.concurrency == 32 and adapter._pool_maxsize == 32
    with pytest.raises(ConfigurationError, match="HMD_GCP_KMS_CONCURRENCY"):
        GCPKMSProvider(project="p", key_ring="r", endpoint=emulator.url, anonymous_credentials=True, concurrency=0)


def test_creations_are_not_retried(provider, key_id, emulator):
    emulator.fail_next("UNAVAILABLE", methods={"createCryptoKeyVersion"})
    mark = len(emulator.calls)

    with pytest.raises(ProviderUnavailable):
        provider.rotate_key(key_id)
    assert rpcs_since(emulator, mark) == ["createCryptoKeyVersion"]
    assert [v.version for v in provider.describe_key(key_id).versions] == [1]


def test_outage_and_recovery():
    # Given a provider talking to its own emulator
    with CloudKMSEmulator() as server:
        provider = make_provider(server, timeout=0.3)
        provider.create_key("outage")
        ciphertext = provider.encrypt("outage", b"survives").ciphertext

        # When the server goes away
        server.stop()

        # Then every call is ProviderUnavailable, quickly, and health says so
        for call in (
            lambda: provider.encrypt("outage", b"x"),
            lambda: provider.decrypt(ciphertext),
            lambda: provider.describe_key("outage"),
            lambda: provider.rotate_key("outage"),
        ):
            with pytest.raises(ProviderUnavailable):
                call()
        status = provider.health_check()
        assert not status.healthy and "ProviderUnavailable" in status.detail

        # When it comes back on the same port, so does the provider
        server.start()
        assert provider.decrypt(ciphertext).plaintext == b"survives"
        assert provider.health_check().healthy


# -- configuration ---------------------------------------------------------


def test_missing_sdk_is_a_configuration_error(monkeypatch, emulator):
    monkeypatch.setitem(sys.modules, "google.cloud.kms_v1", None)

    with pytest.raises(ConfigurationError, match="google-cloud-kms"):
        make_provider(emulator)


def test_from_config_reads_the_settings_keys(emulator):
    provider = GCPKMSProvider.from_config(
        {
            "project": "keyvault-test",
            "location": "global",
            "key_ring": "from-config",
            "endpoint": emulator.url,
            "anonymous_credentials": True,
            "timeout": 3.0,
        }
    )

    assert provider.key_ring_name == "projects/keyvault-test/locations/global/keyRings/from-config"
    assert provider.timeout == 3.0
    assert provider.health_check().healthy


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"project": "", "key_ring": "r"}, "HMD_GCP_PROJECT"),
        ({"project": "p", "key_ring": ""}, "HMD_GCP_KEY_RING"),
        ({"project": "p", "key_ring": "r", "location": "Europe/West"}, "HMD_GCP_LOCATION"),
        ({"project": "p", "key_ring": "r", "timeout": 0}, "HMD_GCP_TIMEOUT"),
        ({"project": "p", "key_ring": "r", "timeout": "soon"}, "HMD_GCP_TIMEOUT"),
        ({"project": "p", "key_ring": "r", "endpoint": "http://127.0.0.1:1"}, "ANONYMOUS"),
    ],
)
def test_bad_settings_are_configuration_errors(options, message):
    with pytest.raises(ConfigurationError, match=message):
        GCPKMSProvider.from_config(options)


def test_repr_names_the_key_ring_only(provider):
    assert repr(provider) == f"GCPKMSProvider(key_ring={provider.key_ring_name!r}, endpoint={provider.endpoint!r})"


# -- the emulator speaks Google's JSON -----------------------------------------


def _http(emulator, method, path, body=None):
    request = urllib.request.Request(
        emulator.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_emulator_json_shapes_follow_the_rest_reference(emulator, ring, key_id):
    key_path = f"/v1/projects/keyvault-test/locations/europe-west1/keyRings/{ring}/cryptoKeys/{key_id}"

    status, key = _http(emulator, "GET", key_path)
    assert status == 200
    assert key["purpose"] == "ENCRYPT_DECRYPT"
    assert key["primary"]["state"] == "ENABLED"
    assert key["primary"]["name"] == key_path[len("/v1/") :] + "/cryptoKeyVersions/1"
    assert key["createTime"].endswith("Z")

    _, numeric = _http(emulator, "GET", key_path + "?%24alt=json%3Benum-encoding%3Dint")
    assert numeric["primary"]["state"] == 1 and numeric["purpose"] == 1

    plaintext = b"shape"
    status, encrypted = _http(
        emulator,
        "POST",
        key_path + ":encrypt",
        {"plaintext": base64.b64encode(plaintext).decode(), "plaintextCrc32c": str(crc32c(plaintext))},
    )
    assert status == 200
    assert encrypted["verifiedPlaintextCrc32c"] is True
    assert encrypted["verifiedAdditionalAuthenticatedDataCrc32c"] is False
    assert encrypted["ciphertextCrc32c"] == str(crc32c(base64.b64decode(encrypted["ciphertext"])))


def test_emulator_errors_follow_the_rest_reference(emulator, ring):
    missing = f"/v1/projects/keyvault-test/locations/europe-west1/keyRings/{ring}/cryptoKeys/missing"

    status, body = _http(emulator, "GET", missing)

    assert status == 404
    assert body["error"]["status"] == "NOT_FOUND" and body["error"]["code"] == 404
    assert "missing" in body["error"]["message"]
    status, body = _http(emulator, "POST", "/v1/projects/p/locations/l/keyRings/r:frobnicate", {})
    assert (status, body["error"]["status"]) == (501, "UNIMPLEMENTED")

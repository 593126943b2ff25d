"""Envelope encryption over the real local provider: format, binding, tampering, rewrap, fuzzing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyvault.kms import ConfigurationError, InvalidCiphertext, KeyNotFound, VersionState, encode_context
from keyvault.kms.cache import DataKeyCache
from keyvault.kms.envelope import MAGIC, EnvelopeEncryptor, EnvelopeHeader, read_header
from keyvault.kms.local import LocalKMSProvider, generate_master_key

CONTEXT = {"tenant": "acme", "table": "payroll"}
KEK = "kek-a"
OTHER_KEK = "kek-b"  # same length as KEK, so a header can name it without moving any other field


class PublicApiLocal(LocalKMSProvider):
    """The local provider reached only through the public contract.

    Overriding ``decrypt`` and ``generate_data_key`` makes the envelope use them
    instead of the local provider's tuple fast path (``*_parts``), so every test
    below runs through both.
    """

    def decrypt(self, ciphertext, *, encryption_context=None):
        return super().decrypt(ciphertext, encryption_context=encryption_context)

    def generate_data_key(self, key_id, *, encryption_context=None, key_spec="AES_256"):
        return super().generate_data_key(key_id, encryption_context=encryption_context, key_spec=key_spec)


PROVIDER_CLASSES = [LocalKMSProvider, PublicApiLocal]
PROVIDER_IDS = ["fast-path", "public-api"]


@pytest.fixture(scope="module", params=PROVIDER_CLASSES, ids=PROVIDER_IDS)
def provider(request, tmp_path_factory):
    provider = request.param(tmp_path_factory.mktemp("envelope") / "keyring", generate_master_key())
    provider.create_key(KEK)
    provider.create_key(OTHER_KEK)
    return provider


@pytest.fixture(params=PROVIDER_CLASSES, ids=PROVIDER_IDS)
def fresh_provider(request, tmp_path):
    """A provider whose keys this test may rotate and disable."""
    provider = request.param(tmp_path / "keyring", generate_master_key())
    provider.create_key(KEK)
    return provider


@pytest.fixture(params=["uncached", "cached"])
def encryptor(request, provider):
    cache = DataKeyCache() if request.param == "cached" else None
    return EnvelopeEncryptor(provider, KEK, cache=cache)


def test_the_fast_path_is_used_only_where_it_is_what_the_public_method_runs(tmp_path):
    local = LocalKMSProvider(tmp_path / "keyring", generate_master_key())
    public_only = PublicApiLocal(tmp_path / "keyring", generate_master_key())
    patched = LocalKMSProvider(tmp_path / "keyring", generate_master_key())
    patched.decrypt = lambda ciphertext, *, encryption_context=None: None

    assert EnvelopeEncryptor(local, KEK)._decrypt_parts is not None
    assert EnvelopeEncryptor(local, KEK)._generate_parts is not None
    assert EnvelopeEncryptor(public_only, KEK)._decrypt_parts is None
    assert EnvelopeEncryptor(public_only, KEK)._generate_parts is None
    assert EnvelopeEncryptor(patched, KEK)._decrypt_parts is None
    assert EnvelopeEncryptor(patched, KEK)._generate_parts is not None


def layout(blob: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of every field, as README.md documents them."""
    id_length = blob[5]
    version_at = 6 + id_length
    wrapped_length = int.from_bytes(blob[version_at + 4 : version_at + 6], "big")
    wrapped_at = version_at + 6
    nonce_at = wrapped_at + wrapped_length
    return {
        "magic": (0, 4),
        "format_version": (4, 5),
        "kek_id_length": (5, 6),
        "kek_id": (6, version_at),
        "kek_version": (version_at, version_at + 4),
        "wrapped_dek_length": (version_at + 4, version_at + 6),
        "wrapped_dek": (wrapped_at, nonce_at),
        "nonce": (nonce_at, nonce_at + 12),
        "ciphertext": (nonce_at + 12, len(blob) - 16),
        "tag": (len(blob) - 16, len(blob)),
    }


def field(blob: bytes, name: str) -> bytes:
    start, end = layout(blob)[name]
    return blob[start:end]


def replace(blob: bytes, name: str, value: bytes) -> bytes:
    start, end = layout(blob)[name]
    return blob[:start] + value + blob[end:]


# -- round trips ---------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"x", b"attack at dawn", os.urandom(1024), os.urandom(3 * 1024 * 1024 + 7)])
@pytest.mark.parametrize("context", [None, CONTEXT], ids=["no-context", "context"])
def test_round_trip(encryptor, plaintext, context):
    blob = encryptor.encrypt(plaintext, encryption_context=context)

    assert encryptor.decrypt(blob, encryption_context=context) == plaintext
    assert len(blob) == len(field(blob, "wrapped_dek")) + 6 + len(KEK) + 6 + 12 + len(plaintext) + 16


def test_context_order_does_not_matter(encryptor):
    blob = encryptor.encrypt(b"data", encryption_context=CONTEXT)

    assert encryptor.decrypt(blob, encryption_context=dict(reversed(list(CONTEXT.items())))) == b"data"


def test_bytearray_and_memoryview_are_accepted(encryptor):
    blob = encryptor.encrypt(bytearray(b"abc"))

    assert encryptor.decrypt(bytearray(blob)) == b"abc"
    assert encryptor.decrypt(memoryview(blob)) == b"abc"
    assert encryptor.decrypt(encryptor.encrypt(memoryview(b"def"))) == b"def"


def test_plaintext_must_be_bytes(encryptor):
    with pytest.raises(TypeError):
        encryptor.encrypt("text")


@pytest.mark.parametrize("garbage", [None, "a string", 42, ["list"]])
def test_non_bytes_blob_is_invalid_ciphertext(encryptor, garbage):
    with pytest.raises(InvalidCiphertext):
        encryptor.decrypt(garbage)


def test_two_encryptions_differ_and_hide_the_plaintext(encryptor):
    first = encryptor.encrypt(b"same plaintext")
    second = encryptor.encrypt(b"same plaintext")

    assert first != second
    assert field(first, "nonce") != field(second, "nonce")
    assert b"same plaintext" not in first


def test_without_cache_every_blob_has_its_own_dek(provider):
    encryptor = EnvelopeEncryptor(provider, KEK)

    wrapped = {field(encryptor.encrypt(b"x"), "wrapped_dek") for _ in range(5)}

    assert len(wrapped) == 5


# -- the byte layout -----------------------------------------------------


def test_blob_layout_field_by_field(provider):
    blob = EnvelopeEncryptor(provider, KEK).encrypt(b"hello", encryption_context=CONTEXT)

    assert field(blob, "magic") == MAGIC == b"KVEN"
    assert field(blob, "format_version") == b"\x01"
    assert field(blob, "kek_id_length") == bytes([len(KEK)])
    assert field(blob, "kek_id") == KEK.encode()
    assert int.from_bytes(field(blob, "kek_version"), "big") == 1
    assert int.from_bytes(field(blob, "wrapped_dek_length"), "big") == len(field(blob, "wrapped_dek"))
    assert len(field(blob, "ciphertext")) == len(b"hello")
    # The wrapped DEK is the provider's own ciphertext, under the same context.
    dek = provider.decrypt(field(blob, "wrapped_dek"), encryption_context=CONTEXT)
    assert (dek.key_id, dek.key_version, len(dek.plaintext)) == (KEK, 1, 32)
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(field(blob, "wrapped_dek"))


def test_read_header_without_decrypting(provider):
    blob = EnvelopeEncryptor(provider, KEK).encrypt(b"x")

    assert read_header(blob) == EnvelopeHeader(format_version=1, kek_id=KEK, kek_version=1)
    assert read_header(bytearray(blob)).kek_id == KEK


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"",
        lambda b: b[:5],
        lambda b: b"XVEN" + b[4:],
        lambda b: b[:4] + b"\x02" + b[5:],
        lambda b: b[:5] + b"\x00" + b[6:],
        lambda b: b[: layout(b)["nonce"][0] + 12 + 15],  # no room for a tag
        lambda b: replace(b, "kek_id", b"\xff" * len(KEK)),
        lambda b: replace(b, "wrapped_dek_length", b"\x00\x00"),
        lambda b: replace(b, "wrapped_dek_length", b"\xff\xff"),
    ],
    ids=["empty", "short", "magic", "format", "empty-kek-id", "short-tag", "bad-utf8", "no-dek", "long-dek"],
)
def test_read_header_refuses_malformed_blobs(provider, mangle):
    blob = EnvelopeEncryptor(provider, KEK).encrypt(b"0123456789")

    with pytest.raises(InvalidCiphertext):
        read_header(mangle(blob))


# -- tampering -----------------------------------------------------------


def tampered_fields(blob: bytes, other_blob: bytes) -> dict[str, bytes]:
    """One meaningful forgery per header field, each as a whole blob.

    ``other_blob`` is another blob under the same KEK, version and context.
    """
    flip = lambda value: bytes([value[0] ^ 0x01]) + value[1:]  # noqa: E731
    wrapped_length = int.from_bytes(field(blob, "wrapped_dek_length"), "big")
    return {
        "magic": replace(blob, "magic", b"KVEM"),
        "format_version": replace(blob, "format_version", b"\x02"),
        "format_version_zero": replace(blob, "format_version", b"\x00"),
        "kek_id_length_longer": replace(blob, "kek_id_length", bytes([len(KEK) + 1])),
        "kek_id_length_shorter": replace(blob, "kek_id_length", bytes([len(KEK) - 1])),
        "kek_id": replace(blob, "kek_id", OTHER_KEK.encode()),
        "kek_version_other_existing": replace(blob, "kek_version", (2).to_bytes(4, "big")),
        "kek_version_zero": replace(blob, "kek_version", bytes(4)),
        "wrapped_dek_length_longer": replace(blob, "wrapped_dek_length", (wrapped_length + 1).to_bytes(2, "big")),
        "wrapped_dek_length_shorter": replace(blob, "wrapped_dek_length", (wrapped_length - 1).to_bytes(2, "big")),
        "wrapped_dek_bytes": replace(blob, "wrapped_dek", flip(field(blob, "wrapped_dek"))),
        "wrapped_dek_spliced_same_kek_and_context": replace(blob, "wrapped_dek", field(other_blob, "wrapped_dek")),
        "nonce": replace(blob, "nonce", flip(field(blob, "nonce"))),
        "ciphertext": replace(blob, "ciphertext", flip(field(blob, "ciphertext"))),
        "tag": replace(blob, "tag", flip(field(blob, "tag"))),
    }


TAMPERED = [
    "magic",
    "format_version",
    "format_version_zero",
    "kek_id_length_longer",
    "kek_id_length_shorter",
    "kek_id",
    "kek_version_other_existing",
    "kek_version_zero",
    "wrapped_dek_length_longer",
    "wrapped_dek_length_shorter",
    "wrapped_dek_bytes",
    "wrapped_dek_spliced_same_kek_and_context",
    "nonce",
    "ciphertext",
    "tag",
]


@pytest.mark.parametrize("name", TAMPERED)
def test_tampering_any_header_field_is_invalid_ciphertext(fresh_provider, name):
    cache = DataKeyCache()
    cached = EnvelopeEncryptor(fresh_provider, KEK, cache=cache)
    uncached = EnvelopeEncryptor(fresh_provider, KEK)
    blob = uncached.encrypt(b"the data", encryption_context=CONTEXT)
    other_blob = uncached.encrypt(b"other data", encryption_context=CONTEXT)
    fresh_provider.rotate_key(KEK)  # version 2 exists, so a header naming it is plausible
    fresh_provider.create_key(OTHER_KEK)  # and so does the KEK a forged header may name
    forged = tampered_fields(blob, other_blob)[name]
    assert forged != blob
    assert TAMPERED == list(tampered_fields(blob, other_blob))

    # Warm the cache and the last-header memo with the genuine blob first.
    assert cached.decrypt(blob, encryption_context=CONTEXT) == b"the data"
    for encryptor in (uncached, cached, EnvelopeEncryptor(fresh_provider, OTHER_KEK, cache=cache)):
        with pytest.raises(InvalidCiphertext):
            encryptor.decrypt(forged, encryption_context=CONTEXT)
        with pytest.raises(InvalidCiphertext):
            encryptor.rewrap(forged, encryption_context=CONTEXT)
    assert cached.decrypt(blob, encryption_context=CONTEXT) == b"the data"


def test_header_naming_another_existing_kek_is_refused_even_by_that_keks_encryptor(fresh_provider):
    # The wrapped DEK says kek-a; a header claiming kek-b must not open under kek-b's encryptor.
    fresh_provider.create_key(OTHER_KEK)
    blob = EnvelopeEncryptor(fresh_provider, KEK).encrypt(b"data")
    forged = replace(blob, "kek_id", OTHER_KEK.encode())

    assert read_header(forged).kek_id == OTHER_KEK
    with pytest.raises(InvalidCiphertext):
        EnvelopeEncryptor(fresh_provider, OTHER_KEK).decrypt(forged)


def test_a_dek_wrapped_by_another_kek_cannot_stand_in_for_this_one(fresh_provider):
    # Key substitution: someone allowed to use kek-a (not kek-b) makes a DEK under kek-a
    # and forges a blob that claims kek-b, data AAD and all. It must not open as kek-b's.
    fresh_provider.create_key(OTHER_KEK)
    data_key = fresh_provider.generate_data_key(KEK, encryption_context=CONTEXT)

    def by_hand(kek_id: str, plaintext: bytes) -> bytes:
        prefix = MAGIC + bytes([1, len(kek_id)]) + kek_id.encode()
        nonce = os.urandom(12)
        sealed = AESGCM(bytes(data_key.plaintext)).encrypt(nonce, plaintext, prefix + encode_context(CONTEXT))
        wrapped = data_key.ciphertext
        return prefix + (1).to_bytes(4, "big") + len(wrapped).to_bytes(2, "big") + wrapped + nonce + sealed

    forged = by_hand(OTHER_KEK, b"forged")
    for cache in (None, DataKeyCache()):
        with pytest.raises(InvalidCiphertext):
            EnvelopeEncryptor(fresh_provider, OTHER_KEK, cache=cache).decrypt(forged, encryption_context=CONTEXT)
    # The same construction under kek-a's own name is simply a valid blob.
    genuine = by_hand(KEK, b"made by hand")
    assert EnvelopeEncryptor(fresh_provider, KEK).decrypt(genuine, encryption_context=CONTEXT) == b"made by hand"


def test_spliced_wrapped_dek_passes_the_provider_but_not_the_data_tag(fresh_provider):
    encryptor = EnvelopeEncryptor(fresh_provider, KEK)
    first = encryptor.encrypt(b"first", encryption_context=CONTEXT)
    second = encryptor.encrypt(b"second", encryption_context=CONTEXT)
    spliced = replace(first, "wrapped_dek", field(second, "wrapped_dek"))

    # The provider accepts the spliced DEK (same KEK, version and context) ...
    assert fresh_provider.decrypt(field(spliced, "wrapped_dek"), encryption_context=CONTEXT).key_version == 1
    # ... but it is another DEK, so the data's tag fails.
    with pytest.raises(InvalidCiphertext):
        encryptor.decrypt(spliced, encryption_context=CONTEXT)
    # Also with both DEKs already in the cache.
    cached = EnvelopeEncryptor(fresh_provider, KEK, cache=DataKeyCache())
    cached.decrypt(first, encryption_context=CONTEXT)
    cached.decrypt(second, encryption_context=CONTEXT)
    with pytest.raises(InvalidCiphertext):
        cached.decrypt(spliced, encryption_context=CONTEXT)


def test_kek_version_in_header_must_match_the_wrapping_version(fresh_provider):
    # The KEK version is not in the data AAD (rewrap changes it), so only this check catches it.
    fresh_provider.rotate_key(KEK)
    blob_v2 = EnvelopeEncryptor(fresh_provider, KEK).encrypt(b"data")
    claims_v1 = replace(blob_v2, "kek_version", (1).to_bytes(4, "big"))

    assert read_header(blob_v2).kek_version == 2
    for cache in (None, DataKeyCache()):
        encryptor = EnvelopeEncryptor(fresh_provider, KEK, cache=cache)
        assert encryptor.decrypt(blob_v2) == b"data"
        with pytest.raises(InvalidCiphertext):
            encryptor.decrypt(claims_v1)


def test_flipping_any_byte_is_invalid_ciphertext(encryptor):
    blob = encryptor.encrypt(b"0123456789abcdef", encryption_context=CONTEXT)
    assert encryptor.decrypt(blob, encryption_context=CONTEXT) == b"0123456789abcdef"

    for index in range(len(blob)):
        for mask in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[index] ^= mask
            with pytest.raises(InvalidCiphertext):
                encryptor.decrypt(bytes(tampered), encryption_context=CONTEXT)


def test_truncation_at_every_length_and_extension_are_invalid_ciphertext(encryptor):
    blob = encryptor.encrypt(b"0123456789", encryption_context=CONTEXT)
    assert encryptor.decrypt(blob, encryption_context=CONTEXT) == b"0123456789"

    for length in range(len(blob)):
        with pytest.raises(InvalidCiphertext):
            encryptor.decrypt(blob[:length], encryption_context=CONTEXT)
    for extra in (b"\x00", b"more bytes"):
        with pytest.raises(InvalidCiphertext):
            encryptor.decrypt(blob + extra, encryption_context=CONTEXT)


# -- encryption context ----------------------------------------------------


@pytest.mark.parametrize(
    "wrong_context",
    [
        None,
        {"tenant": "acme"},
        {**CONTEXT, "extra": "pair"},
        {**CONTEXT, "tenant": "other"},
        {**CONTEXT, "tenant": "ACME"},
        {"Tenant": "acme", "table": "payroll"},
    ],
    ids=["missing-all", "missing-one", "extra", "changed", "value-case", "key-case"],
)
def test_wrong_context_is_invalid_ciphertext(encryptor, wrong_context):
    blob = encryptor.encrypt(b"bound", encryption_context=CONTEXT)
    assert encryptor.decrypt(blob, encryption_context=CONTEXT) == b"bound"  # warms any cache

    with pytest.raises(InvalidCiphertext):
        encryptor.decrypt(blob, encryption_context=wrong_context)


def test_context_given_only_at_decrypt_is_invalid_ciphertext(encryptor):
    blob = encryptor.encrypt(b"unbound")
    assert encryptor.decrypt(blob) == b"unbound"

    with pytest.raises(InvalidCiphertext):
        encryptor.decrypt(blob, encryption_context=CONTEXT)


def test_malformed_context_is_a_type_error(encryptor):
    with pytest.raises(TypeError):
        encryptor.encrypt(b"x", encryption_context={"n": 1})


# -- keys and providers ----------------------------------------------------


def test_blob_of_another_kek_is_refused_and_read_header_names_its_kek(provider):
    blob = EnvelopeEncryptor(provider, OTHER_KEK).encrypt(b"for b")

    with pytest.raises(InvalidCiphertext):
        EnvelopeEncryptor(provider, KEK).decrypt(blob)
    assert EnvelopeEncryptor(provider, read_header(blob).kek_id).decrypt(blob) == b"for b"


def test_unknown_kek_is_key_not_found(provider):
    with pytest.raises(KeyNotFound):
        EnvelopeEncryptor(provider, "no-such-kek").encrypt(b"x")


def test_blob_from_another_keyring_is_invalid_ciphertext(provider, tmp_path):
    stranger = LocalKMSProvider(tmp_path / "other-keyring", generate_master_key())
    stranger.create_key(KEK)
    blob = EnvelopeEncryptor(stranger, KEK).encrypt(b"elsewhere")

    with pytest.raises(InvalidCiphertext):
        EnvelopeEncryptor(provider, KEK).decrypt(blob)


@pytest.mark.parametrize("key_id", ["", "k" * 256, None, b"bytes"])
def test_bad_kek_id_is_configuration_error(provider, key_id):
    with pytest.raises(ConfigurationError):
        EnvelopeEncryptor(provider, key_id)


def test_provider_and_cache_are_checked(provider):
    with pytest.raises(ConfigurationError):
        EnvelopeEncryptor(object(), KEK)
    with pytest.raises(ConfigurationError):
        EnvelopeEncryptor(provider, KEK, cache={})


def test_disabled_kek_version_refuses_decrypt(fresh_provider):
    blob = EnvelopeEncryptor(fresh_provider, KEK).encrypt(b"v1 data")
    fresh_provider.rotate_key(KEK)
    fresh_provider.set_key_version_state(KEK, 1, VersionState.DISABLED)

    with pytest.raises(InvalidCiphertext):  # a version's state is never said (kms/README.md)
        EnvelopeEncryptor(fresh_provider, KEK).decrypt(blob)


def test_cached_dek_outlives_a_disabled_version_until_the_cache_is_cleared(fresh_provider):
    # The documented price of a decryption cache (as with the AWS Encryption SDK).
    cache = DataKeyCache()
    encryptor = EnvelopeEncryptor(fresh_provider, KEK, cache=cache)
    blob = encryptor.encrypt(b"v1 data")
    assert encryptor.decrypt(blob) == b"v1 data"
    fresh_provider.rotate_key(KEK)
    fresh_provider.set_key_version_state(KEK, 1, VersionState.DISABLED)

    assert encryptor.decrypt(blob) == b"v1 data"
    assert EnvelopeEncryptor(fresh_provider, KEK, cache=cache).decrypt(blob) == b"v1 data"
    cache.clear()
    with pytest.raises(InvalidCiphertext):
        encryptor.decrypt(blob)


def test_repr_shows_no_key_material(provider):
    cache = DataKeyCache()
    encryptor = EnvelopeEncryptor(provider, KEK, cache=cache)
    encryptor.encrypt(b"x")
    entry = next(iter(cache._encrypt.values()))

    assert KEK in repr(encryptor)
    assert bytes(entry.key).hex() not in repr(entry) + repr(cache) + repr(encryptor)
    assert "redacted" in repr(entry)


# -- rewrap ----------------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_rewrap_after_rotation_keeps_the_data_ciphertext(fresh_provider, cached):
    encryptor = EnvelopeEncryptor(fresh_provider, KEK, cache=DataKeyCache() if cached else None)
    old = encryptor.encrypt(b"payload", encryption_context=CONTEXT)
    assert encryptor.decrypt(old, encryption_context=CONTEXT) == b"payload"
    fresh_provider.rotate_key(KEK)

    new = encryptor.rewrap(old, encryption_context=CONTEXT)

    assert read_header(old).kek_version == 1
    assert read_header(new) == EnvelopeHeader(format_version=1, kek_id=KEK, kek_version=2)
    for name in ("nonce", "ciphertext", "tag"):
        assert field(new, name) == field(old, name)
    assert new.endswith(old[layout(old)["nonce"][0] :])
    assert field(new, "wrapped_dek") != field(old, "wrapped_dek")
    assert fresh_provider.decrypt(field(new, "wrapped_dek"), encryption_context=CONTEXT).key_version == 2
    assert encryptor.decrypt(new, encryption_context=CONTEXT) == b"payload"
    with pytest.raises(InvalidCiphertext):
        encryptor.decrypt(new, encryption_context={"tenant": "acme"})
    with pytest.raises(InvalidCiphertext):
        encryptor.decrypt(new)
    with pytest.raises(InvalidCiphertext):
        encryptor.rewrap(old, encryption_context={"tenant": "acme"})

    # The old version can now be retired: the rewrapped blob no longer needs it.
    fresh_provider.set_key_version_state(KEK, 1, VersionState.DISABLED)
    assert EnvelopeEncryptor(fresh_provider, KEK).decrypt(new, encryption_context=CONTEXT) == b"payload"
    with pytest.raises(InvalidCiphertext):
        EnvelopeEncryptor(fresh_provider, KEK).decrypt(old, encryption_context=CONTEXT)


def test_rewrap_refuses_tampered_data_and_disabled_versions(fresh_provider):
    encryptor = EnvelopeEncryptor(fresh_provider, KEK)
    blob = encryptor.encrypt(b"payload")
    fresh_provider.rotate_key(KEK)

    with pytest.raises(InvalidCiphertext):
        encryptor.rewrap(replace(blob, "tag", bytes(16)))
    fresh_provider.set_key_version_state(KEK, 1, VersionState.DISABLED)
    with pytest.raises(InvalidCiphertext):
        encryptor.rewrap(blob)


def test_rewrap_twice_is_harmless(fresh_provider):
    encryptor = EnvelopeEncryptor(fresh_provider, KEK)
    blob = encryptor.encrypt(b"payload")
    fresh_provider.rotate_key(KEK)

    once = encryptor.rewrap(blob)
    twice = encryptor.rewrap(once)

    assert read_header(twice).kek_version == read_header(once).kek_version == 2
    assert encryptor.decrypt(twice) == b"payload"


# -- fuzzing the parser ------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_targets(provider):
    cache = DataKeyCache()
    cached = EnvelopeEncryptor(provider, KEK, cache=cache)
    uncached = EnvelopeEncryptor(provider, KEK)
    blob = uncached.encrypt(b"fuzz me", encryption_context=CONTEXT)
    assert cached.decrypt(blob, encryption_context=CONTEXT) == b"fuzz me"
    return uncached, cached, blob


def _only_invalid_ciphertext(targets, data: bytes, original: bytes) -> None:
    for encryptor in targets[:2]:
        try:
            opened = encryptor.decrypt(data, encryption_context=CONTEXT)
        except InvalidCiphertext:
            assert data != original
        else:
            assert data == original and opened == b"fuzz me"
    try:
        read_header(data)
    except InvalidCiphertext:
        pass


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(fuzz_targets, data):
    _only_invalid_ciphertext(fuzz_targets, data, fuzz_targets[2])


@FUZZ
@given(tail=st.binary(max_size=300))
def test_fuzz_valid_prefix_then_arbitrary_bytes(fuzz_targets, tail):
    # Past the magic and KEK id, where the framing fields are parsed.
    blob = fuzz_targets[2]
    _only_invalid_ciphertext(fuzz_targets, MAGIC + bytes([1, len(KEK)]) + KEK.encode() + tail, blob)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
            st.integers(min_value=0, max_value=10_000),
            st.integers(min_value=0, max_value=255),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_mutated_valid_blobs(fuzz_targets, edits):
    blob = fuzz_targets[2]
    data = bytearray(blob)
    for operation, position, value in edits:
        index = position % (len(data) + 1)
        if operation == "flip" and index < len(data):
            data[index] ^= value or 1
        elif operation == "set" and index < len(data):
            data[index] = value
        elif operation == "insert":
            data[index:index] = bytes([value])
        elif operation == "delete" and index < len(data):
            del data[index]
        elif operation == "truncate":
            del data[index:]
    _only_invalid_ciphertext(fuzz_targets, bytes(data), blob)


# -- known-answer vectors ------------------------------------------------------

VECTORS = Path(__file__).parent / "vectors"


@pytest.fixture(scope="module")
def vector_provider(tmp_path_factory):
    """The committed keyring, copied (the provider puts a lock file beside it)."""
    folder = tmp_path_factory.mktemp("vectors")
    shutil.copy(VECTORS / "keyring", folder / "keyring")
    return LocalKMSProvider(folder / "keyring", (VECTORS / "master_key.txt").read_text().strip())


def load_vectors(name: str) -> list[dict]:
    return json.loads((VECTORS / name).read_text())


@pytest.mark.parametrize("vector", load_vectors("envelope_v1.json"), ids=lambda v: v["name"])
def test_known_answer_envelope_blobs_still_decrypt(vector_provider, vector):
    blob = bytes.fromhex(vector["blob_hex"])
    context = vector["encryption_context"]

    assert blob[:5] == MAGIC + b"\x01"
    assert read_header(blob) == EnvelopeHeader(1, vector["kek_id"], vector["kek_version"])
    for cache in (None, DataKeyCache()):
        encryptor = EnvelopeEncryptor(vector_provider, vector["kek_id"], cache=cache)
        assert encryptor.decrypt(blob, encryption_context=context).hex() == vector["plaintext_hex"]
        with pytest.raises(InvalidCiphertext):
            encryptor.decrypt(blob, encryption_context={**(context or {}), "extra": "pair"})


@pytest.mark.parametrize("vector", load_vectors("local_v1.json"), ids=lambda v: v["name"])
def test_known_answer_local_ciphertexts_still_decrypt(vector_provider, vector):
    opened = vector_provider.decrypt(
        bytes.fromhex(vector["ciphertext_hex"]), encryption_context=vector["encryption_context"]
    )

    assert opened.plaintext.hex() == vector["plaintext_hex"]
    assert (opened.key_id, opened.key_version) == (vector["key_id"], vector["key_version"])


def test_known_answer_vectors_cover_rotation_and_rewrap(vector_provider):
    names = {v["name"]: v for v in load_vectors("envelope_v1.json")}
    rewrapped, original = names["rewrapped-to-version-2"], names["still-version-1"]

    assert (rewrapped["kek_version"], original["kek_version"]) == (2, 1)
    assert bytes.fromhex(rewrapped["blob_hex"]).endswith(bytes.fromhex(original["blob_hex"])[-(12 + 23 + 16) :])
    assert [v.version for v in vector_provider.describe_key("vector-kek").versions] == [1, 2]


def test_the_committed_keyring_opens_only_with_its_master_key(tmp_path):
    shutil.copy(VECTORS / "keyring", tmp_path / "keyring")

    with pytest.raises(ConfigurationError):
        LocalKMSProvider(tmp_path / "keyring", generate_master_key()).describe_key("vector-kek")


def test_the_kms_package_imports_no_django():
    # The package rule: keyvault.kms stands alone (the parent package is the Django app, so stub it).
    code = (
        "import sys, types\n"
        "parent = types.ModuleType('keyvault'); parent.__path__ = ['keyvault']; sys.modules['keyvault'] = parent\n"
        "import keyvault.kms, keyvault.kms.envelope, keyvault.kms.cache, keyvault.kms.local, keyvault.kms.wire\n"
        "import keyvault.kms.aws, keyvault.kms.gcp, keyvault.kms.vault, keyvault.kms.pkcs11\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'celery'))\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr

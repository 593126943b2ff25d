"""The provider contract: every backend in ``tests/keyvault/kms/backends`` must pass all of it.

Behaviour a backend may lack is declared with ``KMSProvider.supports``; where a
capability is missing the suite checks the backend says so with
``UnsupportedOperation`` instead of silently skipping.
"""

import pytest

from keyvault.kms import (
    BoundContext,
    Capability,
    ConfigurationError,
    EncryptResult,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    KMSError,
    KeyState,
    ProviderUnavailable,
    RewrapItem,
    UnsupportedOperation,
    VersionState,
)
from keyvault.kms.local import LocalKMSProvider, generate_master_key

CONTEXT = {"tenant": "acme", "purpose": "contract"}


@pytest.fixture
def key_id(harness):
    return harness.new_key()


def test_round_trip_without_context(provider, key_id):
    result = provider.encrypt(key_id, b"attack at dawn")

    opened = provider.decrypt(result.ciphertext)

    assert opened.plaintext == b"attack at dawn"
    assert (opened.key_id, opened.key_version) == (key_id, result.key_version) == (key_id, 1)
    assert b"attack at dawn" not in result.ciphertext


def test_round_trip_with_context_in_any_order(provider, key_id):
    result = provider.encrypt(key_id, b"\x00secret\xff", encryption_context=CONTEXT)

    reordered = dict(reversed(list(CONTEXT.items())))

    assert provider.decrypt(result.ciphertext, encryption_context=reordered).plaintext == b"\x00secret\xff"


def test_a_bound_context_and_the_same_pairs_as_a_dict_are_interchangeable(provider, key_id):
    bound = BoundContext(CONTEXT)
    sealed_bound = provider.encrypt(key_id, b"bound", encryption_context=bound).ciphertext
    sealed_dict = provider.encrypt(key_id, b"dict", encryption_context=dict(CONTEXT)).ciphertext
    data_key = provider.generate_data_key(key_id, encryption_context=bound)

    assert provider.decrypt(sealed_bound, encryption_context=dict(CONTEXT)).plaintext == b"bound"
    assert provider.decrypt(sealed_dict, encryption_context=bound).plaintext == b"dict"
    assert provider.decrypt(data_key.ciphertext, encryption_context=CONTEXT).plaintext == bytes(data_key.plaintext)
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(sealed_bound, encryption_context=BoundContext({**CONTEXT, "purpose": "other"}))
    data_key.wipe()


def test_empty_plaintext_round_trips(provider, key_id):
    result = provider.encrypt(key_id, b"", encryption_context=CONTEXT)

    assert provider.decrypt(result.ciphertext, encryption_context=CONTEXT).plaintext == b""


def test_two_encryptions_of_the_same_plaintext_differ(provider, key_id):
    first = provider.encrypt(key_id, b"same")
    second = provider.encrypt(key_id, b"same")

    assert first.ciphertext != second.ciphertext


@pytest.mark.parametrize(
    "wrong_context",
    [
        None,
        {"tenant": "acme"},
        {**CONTEXT, "extra": "pair"},
        {**CONTEXT, "tenant": "other"},
        {**CONTEXT, "tenant": "ACME"},
        {"Tenant": "acme", "purpose": "contract"},
    ],
    ids=["missing-all", "missing-one", "extra", "changed", "value-case", "key-case"],
)
def test_wrong_context_is_invalid_ciphertext(provider, key_id, wrong_context):
    ciphertext = provider.encrypt(key_id, b"bound", encryption_context=CONTEXT).ciphertext

    with pytest.raises(InvalidCiphertext):
        provider.decrypt(ciphertext, encryption_context=wrong_context)


def test_context_given_at_decrypt_only_is_invalid(provider, key_id):
    ciphertext = provider.encrypt(key_id, b"unbound").ciphertext

    with pytest.raises(InvalidCiphertext):
        provider.decrypt(ciphertext, encryption_context=CONTEXT)


def test_flipping_any_byte_is_invalid_ciphertext(provider, key_id):
    ciphertext = provider.encrypt(key_id, b"0123456789", encryption_context=CONTEXT).ciphertext

    for index in range(len(ciphertext)):
        tampered = bytearray(ciphertext)
        tampered[index] ^= 0x01
        with pytest.raises(InvalidCiphertext):
            provider.decrypt(bytes(tampered), encryption_context=CONTEXT)


def test_truncation_at_every_length_is_invalid_ciphertext(provider, key_id):
    ciphertext = provider.encrypt(key_id, b"0123456789", encryption_context=CONTEXT).ciphertext

    for length in range(len(ciphertext)):
        with pytest.raises(InvalidCiphertext):
            provider.decrypt(ciphertext[:length], encryption_context=CONTEXT)


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"not a ciphertext at all", bytes(200)])
def test_garbage_is_invalid_ciphertext(provider, garbage):
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(garbage)


def test_unknown_key_is_key_not_found(provider, harness):
    missing = harness.new_key_id()

    with pytest.raises(KeyNotFound):
        provider.encrypt(missing, b"x")
    with pytest.raises(KeyNotFound):
        provider.describe_key(missing)
    with pytest.raises(KeyNotFound):
        provider.rotate_key(missing)
    with pytest.raises(KeyNotFound):
        provider.generate_data_key(missing)


def test_creating_an_existing_key_is_refused(provider, key_id):
    with pytest.raises(ConfigurationError):
        provider.create_key(key_id)


def test_describe_new_key(provider, key_id):
    info = provider.describe_key(key_id)

    assert info.key_id == key_id
    assert info.state is KeyState.ENABLED
    assert info.primary_version == 1
    assert [v.version for v in info.versions] == [1]
    assert info.versions[0].state is VersionState.ENABLED


def test_rotation_changes_primary_and_old_ciphertexts_still_decrypt(provider, key_id):
    old = provider.encrypt(key_id, b"before", encryption_context=CONTEXT)

    new_version = provider.rotate_key(key_id)
    new = provider.encrypt(key_id, b"after", encryption_context=CONTEXT)

    assert new_version.version == 2
    assert new.key_version == 2
    assert provider.describe_key(key_id).primary_version == 2
    assert [v.version for v in provider.describe_key(key_id).versions] == [1, 2]
    assert provider.decrypt(old.ciphertext, encryption_context=CONTEXT).key_version == 1
    assert provider.decrypt(old.ciphertext, encryption_context=CONTEXT).plaintext == b"before"
    assert provider.decrypt(new.ciphertext, encryption_context=CONTEXT).plaintext == b"after"


def test_disabled_version_refuses_decrypt_until_enabled(provider, key_id):
    old = provider.encrypt(key_id, b"v1 data")
    provider.rotate_key(key_id)

    if not provider.supports(Capability.DISABLE_VERSION):
        with pytest.raises(UnsupportedOperation):
            provider.set_key_version_state(key_id, 1, VersionState.DISABLED)
        return

    provider.set_key_version_state(key_id, 1, VersionState.DISABLED)
    assert provider.describe_key(key_id).version(1).state is VersionState.DISABLED
    with pytest.raises(InvalidCiphertext):  # a version's state is never said (keyvault/kms/README.md)
        provider.decrypt(old.ciphertext)
    with pytest.raises(InvalidCiphertext):
        provider.rewrap(old.ciphertext)

    provider.set_key_version_state(key_id, 1, VersionState.ENABLED)
    assert provider.decrypt(old.ciphertext).plaintext == b"v1 data"


def test_primary_version_cannot_be_disabled(provider, key_id):
    expected = KeyDisabled if provider.supports(Capability.DISABLE_VERSION) else UnsupportedOperation
    with pytest.raises(expected):
        provider.set_key_version_state(key_id, 1, VersionState.DISABLED)
    assert provider.encrypt(key_id, b"still works").key_version == 1


def test_destroyed_version_is_gone_for_good(provider, key_id):
    old = provider.encrypt(key_id, b"v1 data")
    provider.rotate_key(key_id)

    if not provider.supports(Capability.DESTROY_VERSION):
        with pytest.raises(UnsupportedOperation):
            provider.set_key_version_state(key_id, 1, VersionState.DESTROYED)
        return

    provider.set_key_version_state(key_id, 1, VersionState.DESTROYED)
    assert provider.describe_key(key_id).version(1).state in (VersionState.DESTROYED, VersionState.DESTROY_SCHEDULED)
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(old.ciphertext)
    with pytest.raises(KeyDisabled):
        provider.set_key_version_state(key_id, 1, VersionState.ENABLED)


# -- what a failed decrypt reveals (keyvault/kms/README.md): a version's state, never ------------------


def _forged(ciphertext: bytes) -> bytes:
    """The ciphertext with its last byte changed: its header still names the same key and version."""
    return ciphertext[:-1] + bytes([ciphertext[-1] ^ 0x01])


def _refusal(call) -> str:
    with pytest.raises(KMSError) as raised:
        call()
    return f"{type(raised.value).__name__}: {raised.value}"


@pytest.mark.parametrize(("state", "capability"), [(VersionState.DISABLED, Capability.DISABLE_VERSION),
                                                   (VersionState.DESTROYED, Capability.DESTROY_VERSION)],
                         ids=["disabled", "destroyed"])
def test_forged_blob_naming_a_retired_version_gets_the_one_opaque_error(provider, harness, key_id, state, capability):
    # given a ciphertext of version 1, then version 2 primary, and a forged blob naming version 2
    old = provider.encrypt(key_id, b"v1 data", encryption_context=CONTEXT).ciphertext
    provider.rotate_key(key_id)
    current = provider.encrypt(key_id, b"v2 data", encryption_context=CONTEXT).ciphertext
    baseline = _refusal(lambda: provider.decrypt(_forged(current), encryption_context=CONTEXT))
    assert baseline == f"InvalidCiphertext: {InvalidCiphertext()}"
    if not provider.supports(capability):
        return

    # when version 1 is retired, and forged and authentic blobs naming it are opened and rewrapped
    provider.set_key_version_state(key_id, 1, state)
    renamed = harness.name_version(current, 1)  # a real v2 ciphertext whose header now names v1
    answers = {
        _refusal(lambda: provider.decrypt(_forged(old), encryption_context=CONTEXT)),
        _refusal(lambda: provider.decrypt(renamed, encryption_context=CONTEXT)),
        _refusal(lambda: provider.decrypt(old, encryption_context=CONTEXT)),
        _refusal(lambda: provider.rewrap(_forged(old), encryption_context=CONTEXT)),
        _refusal(lambda: provider.rewrap(old, encryption_context=CONTEXT)),
    }

    # then each answer is word for word the one a forged blob naming a live version gets
    assert answers == {baseline}


@pytest.mark.parametrize("named", [3, 99])
def test_forged_blob_naming_a_version_that_never_existed_gets_the_one_opaque_error(provider, harness, key_id, named):
    # given a key with versions 1 and 2, and a real v2 ciphertext whose header is made to name another version
    provider.rotate_key(key_id)
    current = provider.encrypt(key_id, b"v2 data", encryption_context=CONTEXT).ciphertext
    baseline = _refusal(lambda: provider.decrypt(_forged(current), encryption_context=CONTEXT))
    forged = harness.name_version(current, named)
    assert forged != current

    # when it is opened and rewrapped, then the answer is the one any forged blob gets
    assert _refusal(lambda: provider.decrypt(forged, encryption_context=CONTEXT)) == baseline
    assert _refusal(lambda: provider.rewrap(forged, encryption_context=CONTEXT)) == baseline
    assert baseline == f"InvalidCiphertext: {InvalidCiphertext()}"


def test_forged_blob_naming_a_live_version_of_a_disabled_key_learns_nothing(provider, key_id):
    # given an authentic ciphertext of a key that is then disabled (where the backend can)
    ciphertext = provider.encrypt(key_id, b"data", encryption_context=CONTEXT).ciphertext
    if not provider.supports(Capability.DISABLE_KEY):
        return
    provider.set_key_state(key_id, KeyState.DISABLED)

    # when a forged blob naming it is opened, and the authentic one
    forged = _refusal(lambda: provider.decrypt(_forged(ciphertext), encryption_context=CONTEXT))
    authentic = _refusal(lambda: provider.decrypt(ciphertext, encryption_context=CONTEXT))

    # then the authentic blob may learn the key is disabled; the forged one learns it only where the
    # provider says the key's own state before opening (aws, as AWS KMS does), never anything else
    assert authentic.startswith("KeyDisabled: ")
    assert forged in (f"InvalidCiphertext: {InvalidCiphertext()}", authentic)


def test_disabled_key_refuses_crypto_until_enabled(provider, key_id):
    ciphertext = provider.encrypt(key_id, b"data").ciphertext

    if not provider.supports(Capability.DISABLE_KEY):
        with pytest.raises(UnsupportedOperation):
            provider.set_key_state(key_id, KeyState.DISABLED)
        return

    provider.set_key_state(key_id, KeyState.DISABLED)
    assert provider.describe_key(key_id).state is KeyState.DISABLED
    with pytest.raises(KeyDisabled):
        provider.encrypt(key_id, b"more")
    with pytest.raises(KeyDisabled):
        provider.decrypt(ciphertext)
    with pytest.raises(KeyDisabled):
        provider.generate_data_key(key_id)

    provider.set_key_state(key_id, KeyState.ENABLED)
    assert provider.decrypt(ciphertext).plaintext == b"data"


def test_destroyed_key_decrypts_nothing(provider, key_id):
    ciphertext = provider.encrypt(key_id, b"data").ciphertext

    if not provider.supports(Capability.DESTROY_KEY):
        with pytest.raises(UnsupportedOperation):
            provider.destroy_key(key_id)
        return

    provider.destroy_key(key_id)
    with pytest.raises((KeyDisabled, KeyNotFound, InvalidCiphertext)):
        provider.decrypt(ciphertext)
    with pytest.raises((KeyDisabled, KeyNotFound)):
        provider.encrypt(key_id, b"more")


@pytest.mark.parametrize(("key_spec", "length"), [("AES_256", 32), ("AES_128", 16)])
def test_generate_data_key(provider, key_id, key_spec, length):
    with provider.generate_data_key(key_id, encryption_context=CONTEXT, key_spec=key_spec) as data_key:
        plaintext = bytes(data_key.plaintext)
        assert isinstance(data_key.plaintext, bytearray)
        assert len(plaintext) == length
        assert (data_key.key_id, data_key.key_version) == (key_id, 1)
        assert provider.decrypt(data_key.ciphertext, encryption_context=CONTEXT).plaintext == plaintext
        with pytest.raises(InvalidCiphertext):
            provider.decrypt(data_key.ciphertext, encryption_context={"tenant": "other"})
    assert data_key.plaintext == bytearray(length), "leaving the context manager wipes the plaintext"
    assert plaintext.hex() not in repr(data_key)


def test_generate_data_key_gives_fresh_keys(provider, key_id):
    first = provider.generate_data_key(key_id)
    second = provider.generate_data_key(key_id)

    assert first.plaintext != second.plaintext


def test_generate_data_key_unknown_spec(provider, key_id):
    with pytest.raises(ConfigurationError):
        provider.generate_data_key(key_id, key_spec="DES")


def test_rewrap_moves_to_new_primary_and_keeps_context(provider, key_id):
    old = provider.encrypt(key_id, b"payload", encryption_context=CONTEXT)
    provider.rotate_key(key_id)

    rewrapped = provider.rewrap(old.ciphertext, encryption_context=CONTEXT)

    assert (rewrapped.key_id, rewrapped.key_version) == (key_id, 2)
    assert provider.decrypt(rewrapped.ciphertext, encryption_context=CONTEXT).plaintext == b"payload"
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(rewrapped.ciphertext, encryption_context={"tenant": "acme"})
    with pytest.raises(InvalidCiphertext):
        provider.rewrap(old.ciphertext, encryption_context={"tenant": "acme"})


def test_rewrap_to_another_key(provider, harness, key_id):
    other = harness.new_key()
    old = provider.encrypt(key_id, b"payload", encryption_context=CONTEXT)

    moved = provider.rewrap(old.ciphertext, encryption_context=CONTEXT, key_id=other)

    assert moved.key_id == other
    assert provider.decrypt(moved.ciphertext, encryption_context=CONTEXT).plaintext == b"payload"


# -- rewrap_many: aligned, typed, one bad item never spoils the batch --------------------------------

#: More than one Vault batch (HMD_VAULT_BATCH_SIZE, 200) and than any pool of requests or sessions (16).
MANY = 230


def _item(provider, key_id, plaintext: bytes, context=CONTEXT) -> RewrapItem:
    return RewrapItem(provider.encrypt(key_id, plaintext, encryption_context=context).ciphertext, context)


def _foreign_ciphertext(harness, folder) -> bytes:
    """A well-formed ciphertext of a key this backend does not hold (another keyring's)."""
    stranger = LocalKMSProvider(folder / "foreign-keyring", generate_master_key())
    foreign_key = harness.new_key_id()
    stranger.create_key(foreign_key)
    return stranger.encrypt(foreign_key, b"not yours", encryption_context=CONTEXT).ciphertext


def test_rewrap_many_mixed_batch_is_aligned_and_typed(provider, harness, key_id, tmp_path):
    # given DEKs of a key that is then rotated, one of another key, and four kinds of bad item between them
    other = harness.new_key()
    good = [_item(provider, key_id, b"dek %d" % n) for n in range(3)]
    bare = _item(provider, key_id, b"no context", context=None)
    of_other = _item(provider, other, b"other key")
    provider.rotate_key(key_id)
    malformed = RewrapItem(b"not a ciphertext at all", CONTEXT)
    tampered = RewrapItem(_forged(good[0].ciphertext), CONTEXT)
    wrong_context = RewrapItem(good[1].ciphertext, {"tenant": "other"})
    foreign = RewrapItem(_foreign_ciphertext(harness, tmp_path), CONTEXT)
    items = [good[0], malformed, good[1], wrong_context, bare, foreign, of_other, tampered, good[2]]

    # when they are rewrapped in one call
    results = provider.rewrap_many(items)

    # then each result sits at its item's place: new ciphertexts for the good ones, the one opaque error for the rest
    assert [type(result) for result in results] == [EncryptResult, InvalidCiphertext] * 4 + [EncryptResult]
    assert {str(results[index]) for index in (1, 3, 5, 7)} == {str(InvalidCiphertext())}
    for n, index in enumerate((0, 2, 8)):
        assert (results[index].key_id, results[index].key_version) == (key_id, 2)
        assert provider.decrypt(results[index].ciphertext, encryption_context=CONTEXT).plaintext == b"dek %d" % n
    assert (results[4].key_id, results[4].key_version) == (key_id, 2)
    assert provider.decrypt(results[4].ciphertext).plaintext == b"no context"
    # a ciphertext of another key stays with its own key (there at its primary, version 1)
    assert (results[6].key_id, results[6].key_version) == (other, 1)
    assert provider.decrypt(results[6].ciphertext, encryption_context=CONTEXT).plaintext == b"other key"


def test_rewrap_many_of_nothing_is_nothing(provider, key_id):
    assert provider.rewrap_many([]) == []
    assert provider.rewrap_many([], key_id=key_id) == []


def test_rewrap_many_larger_than_a_batch_or_a_pool(provider, key_id):
    # given more DEKs than one Vault batch and one request pool, bad ones at the edges of the first batch
    items = [_item(provider, key_id, b"dek %d" % n, context={"row": str(n)}) for n in range(MANY)]
    bad = {0, 199, 200, MANY - 1}
    for index in bad:
        items[index] = RewrapItem(items[index].ciphertext, {"row": "elsewhere"})
    provider.rotate_key(key_id)

    results = provider.rewrap_many(items)

    assert len(results) == MANY
    assert [index for index, result in enumerate(results) if isinstance(result, InvalidCiphertext)] == sorted(bad)
    assert all(isinstance(results[index], EncryptResult) and results[index].key_version == 2
               for index in range(MANY) if index not in bad)
    for index in (1, 198, 201, MANY - 2):
        opened = provider.decrypt(results[index].ciphertext, encryption_context={"row": str(index)})
        assert (opened.plaintext, opened.key_version) == (b"dek %d" % index, 2)


def test_rewrap_many_to_another_key(provider, harness, key_id):
    other = harness.new_key()
    items = [_item(provider, key_id, b"dek %d" % n) for n in range(3)] + [RewrapItem(b"junk", CONTEXT)]

    moved = provider.rewrap_many(items, key_id=other)
    nowhere = provider.rewrap_many(items, key_id=harness.new_key_id())

    assert [type(result) for result in moved] == [EncryptResult] * 3 + [InvalidCiphertext]
    assert {result.key_id for result in moved[:3]} == {other}
    assert provider.decrypt(moved[2].ciphertext, encryption_context=CONTEXT).plaintext == b"dek 2"
    assert [type(result) for result in nowhere] == [KeyNotFound] * 3 + [InvalidCiphertext]


def test_rewrap_many_on_a_backend_that_is_down_raises_for_the_whole_call(provider, harness, key_id):
    items = [_item(provider, key_id, b"dek %d" % n) for n in range(3)]
    broken = harness.broken_provider()

    if harness.broken_is_down:
        with pytest.raises(ProviderUnavailable):
            broken.rewrap_many(items)
    else:
        # misconfigured, not down: each item meets the ConfigurationError (only an outage ends the call)
        results = broken.rewrap_many(items)
        assert [type(result) for result in results] == [ConfigurationError] * 3


def test_encrypt_count_is_tracked(provider, key_id):
    for _ in range(3):
        provider.encrypt(key_id, b"x")

    count = provider.describe_key(key_id).version(1).encrypt_count
    if provider.supports(Capability.ENCRYPT_COUNT):
        assert count is not None and count >= 3
    else:
        assert count is None


def test_health_check_healthy(provider):
    status = provider.health_check()

    assert status.healthy, status.detail
    assert status.provider == provider.name
    assert status.latency_ms >= 0


def test_health_check_reports_unreachable_backend_without_raising(harness):
    status = harness.broken_provider().health_check()

    assert not status.healthy
    assert status.detail
    assert status.provider == harness.provider.name

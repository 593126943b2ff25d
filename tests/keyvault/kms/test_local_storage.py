"""The local keyring on storage that refuses writes: a full tmpfs and a read-only mount, both real.

Given a keyring on a volume that fills up or turns read-only, when keys are created,
data is encrypted and health is checked, then every refusal is a typed
``StorageUnavailable`` naming the path and the system's reason (never key material), nothing
is half-written, encryption goes on exactly as far as the counts already reserved allow,
decryption is unaffected, and the health check says what is wrong.
"""

from __future__ import annotations

import errno
import os

import pytest

from keyvault.kms import InvalidCiphertext, KeyNotFound, StorageUnavailable
from keyvault.kms.envelope import EnvelopeEncryptor
from keyvault.kms.local import LocalKMSProvider, generate_master_key
from tests.keyvault.kms.test_local_provider import open_keyring
from tests.volumes import fill, read_only_view, tiny_volume

BLOCK = 8


@pytest.fixture
def master_key():
    return generate_master_key()


@pytest.fixture
def volume(tmp_path):
    with tiny_volume(tmp_path / "volume") as mounted:
        yield mounted


def provider_on(folder, master_key, **options) -> LocalKMSProvider:
    # Fixed blocks of BLOCK encryptions, so the test knows exactly how many are reserved.
    options.setdefault("reservation_block", BLOCK)
    options.setdefault("max_reservation_block", BLOCK)
    return LocalKMSProvider(folder / "keyring", master_key, **options)


def assert_names_path_and_reason(error: StorageUnavailable, path, reason: str, master_key: str) -> None:
    message = str(error)
    assert str(path) in message and reason in message
    assert len(message.splitlines()) == 1
    assert master_key not in message
    assert error.retryable


def test_creating_a_key_on_a_full_volume_fails_typed_and_leaves_the_keyring_as_it_was(volume, master_key):
    # given a keyring with one key on a volume that then fills up
    provider = provider_on(volume, master_key)
    provider.create_key("first")
    before = (volume / "keyring").read_bytes()
    fill(volume)

    # when another key is created
    with pytest.raises(StorageUnavailable) as raised:
        provider.create_key("second")

    # then the error is typed and says where and why; the keyring file is byte for byte the same,
    # no temp file is left, and the key exists nowhere
    assert raised.value.errno == errno.ENOSPC
    assert_names_path_and_reason(raised.value, volume / "keyring", "No space left on device", master_key)
    material = open_keyring(volume / "keyring", master_key)["keys"]["first"]["versions"]["1"]["material"]
    assert material not in str(raised.value)
    assert (volume / "keyring").read_bytes() == before
    assert sorted(os.listdir(volume)) == ["filler", "keyring", "keyring.lock"]
    with pytest.raises(KeyNotFound):
        provider.describe_key("second")
    with pytest.raises(KeyNotFound):
        provider_on(volume, master_key).describe_key("second")


def test_encryption_goes_on_from_reserved_counts_then_fails_typed(volume, master_key):
    # given a process that reserved a block of 8 encryptions and used 1, then the volume fills up
    provider = provider_on(volume, master_key)
    provider.create_key("k")
    made = [provider.encrypt("k", b"0", encryption_context={"n": "0"}).ciphertext]
    fill(volume)

    # when it keeps encrypting (direct calls, data keys and envelopes share the block)
    made += [provider.encrypt("k", b"%d" % n, encryption_context={"n": str(n)}).ciphertext for n in range(1, 5)]
    provider.generate_data_key("k").wipe()
    envelope = EnvelopeEncryptor(provider, "k")
    blobs = [envelope.encrypt(b"env", encryption_context={"n": str(n)}) for n in range(2)]

    # then exactly the 8 reserved encryptions were made, and the ninth is refused with the reason
    for attempt in (lambda: provider.encrypt("k", b"9"), lambda: provider.generate_data_key("k"),
                    lambda: envelope.encrypt(b"env")):
        with pytest.raises(StorageUnavailable) as raised:
            attempt()
        assert "no reserved encryptions left and cannot reserve more" in str(raised.value)
        assert_names_path_and_reason(raised.value, volume / "keyring", "No space left on device", master_key)
    assert provider.describe_key("k").version(1).encrypt_count == BLOCK

    # and everything made still opens, in this process and in a fresh one
    for reader in (provider, provider_on(volume, master_key)):
        assert [reader.decrypt(c, encryption_context={"n": str(n)}).plaintext for n, c in enumerate(made)] == [
            b"%d" % n for n in range(5)
        ]
        assert EnvelopeEncryptor(reader, "k").decrypt(blobs[1], encryption_context={"n": "1"}) == b"env"
        with pytest.raises(InvalidCiphertext):
            reader.decrypt(made[0], encryption_context={"n": "1"})


def test_a_new_process_cannot_encrypt_on_a_full_volume_and_says_why(volume, master_key):
    provider_on(volume, master_key).create_key("k")
    fill(volume)

    fresh = provider_on(volume, master_key)  # as a worker started after the volume filled up

    with pytest.raises(StorageUnavailable) as raised:
        fresh.encrypt("k", b"x")
    assert "version 1 of 'k' cannot encrypt in this process" in str(raised.value)
    assert_names_path_and_reason(raised.value, volume / "keyring", "No space left on device", master_key)


def test_health_says_a_full_volume_is_unhealthy_and_recovers_when_space_is_freed(volume, master_key):
    provider = provider_on(volume, master_key)
    provider.create_key("k")
    assert provider.health_check().healthy

    filler = fill(volume)
    full = provider.health_check()
    filler.unlink()
    freed = provider.health_check()

    assert not full.healthy
    assert full.detail.startswith("StorageUnavailable: ")
    assert str(volume / "keyring") in full.detail and "No space left on device" in full.detail
    assert freed.healthy, freed.detail
    assert not [name for name in os.listdir(volume) if name.endswith((".probe", ".tmp"))]


def test_a_read_only_volume_refuses_changes_typed_but_opens_and_follows_changes(tmp_path, master_key):
    # given a keyring that one process writes, seen read-only by another (a read-only mount)
    writable = tmp_path / "writable"
    writer = provider_on(writable, master_key)
    writer.create_key("k")
    sealed = writer.encrypt("k", b"before").ciphertext
    with read_only_view(writable, tmp_path / "read-only") as view:
        reader = provider_on(view, master_key)

        # when the reader checks its health, changes a key and encrypts
        health = reader.health_check()
        with pytest.raises(StorageUnavailable) as rotating:
            reader.rotate_key("k")
        with pytest.raises(StorageUnavailable) as encrypting:
            reader.encrypt("k", b"x")

        # then each says the volume is read-only, and the keyring is unchanged
        assert not health.healthy and "Read-only file system" in health.detail
        for raised in (rotating, encrypting):
            assert raised.value.errno == errno.EROFS
            assert_names_path_and_reason(raised.value, view / "keyring", "Read-only file system", master_key)
        assert reader.describe_key("k").primary_version == 1

        # and it still opens ciphertexts, and sees the writer's rotation at once (the change
        # counter is mapped read-only)
        assert reader.decrypt(sealed).plaintext == b"before"
        writer.rotate_key("k")
        assert reader.describe_key("k").primary_version == 2
        assert reader.decrypt(writer.encrypt("k", b"after").ciphertext).plaintext == b"after"


def test_the_change_counter_is_allocated_not_a_hole(volume, master_key):
    # A store through the map into an unallocated page of a full volume would kill the process (SIGBUS).
    provider = provider_on(volume, master_key)
    provider.create_key("k")

    assert os.stat(volume / "keyring.lock").st_blocks > 0


def test_a_full_volume_before_the_lock_file_exists_only_costs_the_fast_check(volume, master_key):
    # given a keyring copied onto a volume that is full before any process made its lock file
    source = provider_on(volume.parent / "elsewhere", master_key)
    source.create_key("k")
    sealed = source.encrypt("k", b"x").ciphertext
    (volume / "keyring").write_bytes((volume.parent / "elsewhere" / "keyring").read_bytes())
    fill(volume)

    # when a process opens it
    reader = provider_on(volume, master_key)

    # then it decrypts (checking the file instead of a counter it could not allocate)
    assert reader.decrypt(sealed).plaintext == b"x"
    assert reader._generation is None

"""What only the local provider has: its keyring file, master key, usage limits and sharing between processes.

The behaviour every provider shares is in ``test_contract.py``.
"""

import base64
import json
import multiprocessing
import os
import shutil
import stat
import sys

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyvault.kms import ConfigurationError, InvalidCiphertext, KeyDisabled, KeyState, VersionState
from keyvault.kms.base import EncryptResult, KMSProvider, RewrapItem
from keyvault.kms.context import BoundContext
from keyvault.kms import local as local_module
from keyvault.kms.local import LocalKMSProvider, decode_master_key, generate_master_key


@pytest.fixture
def master_key():
    return generate_master_key()


@pytest.fixture
def keyring(tmp_path):
    return tmp_path / "kms" / "keyring"


def open_keyring(path, master_key: str) -> dict:
    """Decrypt a keyring file the way the provider does (magic, nonce, sealed JSON)."""
    blob = path.read_bytes()
    nonce, sealed = blob[5:17], blob[17:]
    return json.loads(AESGCM(decode_master_key(master_key)).decrypt(nonce, sealed, b"keyvault local keyring v1"))


# -- the keyring file --------------------------------------------------------


def test_keyring_file_is_private_and_reveals_nothing(keyring, master_key):
    provider = LocalKMSProvider(keyring, master_key)
    provider.create_key("payroll-kek-7f3a", description="salaries of the board")
    provider.rotate_key("payroll-kek-7f3a")

    content = keyring.read_bytes()
    assert stat.S_IMODE(os.stat(keyring).st_mode) == 0o600
    assert content.startswith(b"KVKR\x01")
    for secret in (b"payroll-kek-7f3a", b"salaries", b"material", b"versions"):
        assert secret not in content
    materials = [
        v["material"] for v in open_keyring(keyring, master_key)["keys"]["payroll-kek-7f3a"]["versions"].values()
    ]
    assert len(materials) == 2
    for material in materials:
        assert material.encode() not in content
        assert base64.b64decode(material) not in content
    # The sibling lock file holds only the 8-byte change counter: one bump per change.
    lock = keyring.with_name("keyring.lock")
    assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
    assert len(lock.read_bytes()) == 8
    assert int.from_bytes(lock.read_bytes(), sys.byteorder) == 2  # create_key, rotate_key


def test_keyring_is_rewritten_under_a_fresh_nonce(keyring, master_key):
    provider = LocalKMSProvider(keyring, master_key)
    provider.create_key("k")
    before = keyring.read_bytes()

    provider.rotate_key("k")

    assert keyring.read_bytes()[5:17] != before[5:17]


def test_wrong_master_key_is_configuration_error(keyring, master_key):
    provider = LocalKMSProvider(keyring, master_key)
    provider.create_key("k")
    ciphertext = provider.encrypt("k", b"data").ciphertext

    intruder = LocalKMSProvider(keyring, generate_master_key())

    with pytest.raises(ConfigurationError, match="master key"):
        intruder.describe_key("k")
    with pytest.raises(ConfigurationError):
        intruder.decrypt(ciphertext)
    with pytest.raises(ConfigurationError):
        intruder.encrypt("k", b"more")
    with pytest.raises(ConfigurationError):
        intruder.create_key("other")
    assert not intruder.health_check().healthy
    assert provider.decrypt(ciphertext).plaintext == b"data"


@pytest.mark.parametrize("bad", ["not base64!", base64.b64encode(b"short").decode(), b"\x00" * 31])
def test_malformed_master_key_is_configuration_error(keyring, bad):
    with pytest.raises(ConfigurationError):
        LocalKMSProvider(keyring, bad)


def test_a_file_that_is_not_a_keyring_is_configuration_error(keyring, master_key):
    keyring.parent.mkdir(parents=True)
    keyring.write_bytes(b"just some file")

    with pytest.raises(ConfigurationError, match="not a Keyvault keyring"):
        LocalKMSProvider(keyring, master_key).describe_key("k")


# -- the encryption limit ------------------------------------------------------


def test_encryption_limit_disables_the_version_until_rotated(keyring, master_key):
    provider = LocalKMSProvider(keyring, master_key, max_encryptions_per_version=5, reservation_block=2)
    provider.create_key("k")
    ciphertexts = [provider.encrypt("k", b"%d" % i).ciphertext for i in range(5)]

    with pytest.raises(KeyDisabled, match="limit"):
        provider.encrypt("k", b"one too many")
    with pytest.raises(KeyDisabled):
        provider.generate_data_key("k")
    assert provider.describe_key("k").version(1).encrypt_count == 5
    assert [provider.decrypt(c).plaintext for c in ciphertexts] == [b"0", b"1", b"2", b"3", b"4"]

    provider.rotate_key("k")

    assert provider.encrypt("k", b"fresh").key_version == 2
    assert provider.describe_key("k").version(2).encrypt_count == 2  # one block reserved


def test_counts_survive_reopening(keyring, master_key):
    first = LocalKMSProvider(keyring, master_key, max_encryptions_per_version=5, reservation_block=1)
    first.create_key("k")
    for _ in range(3):
        first.encrypt("k", b"x")

    reopened = LocalKMSProvider(keyring, master_key, max_encryptions_per_version=5, reservation_block=1)

    assert reopened.describe_key("k").version(1).encrypt_count == 3
    reopened.encrypt("k", b"x")
    reopened.generate_data_key("k")
    with pytest.raises(KeyDisabled):
        reopened.encrypt("k", b"x")


def test_reserved_blocks_make_the_stored_count_an_upper_bound(keyring, master_key):
    provider = LocalKMSProvider(keyring, master_key, reservation_block=100, max_reservation_block=100)
    provider.create_key("k")

    for _ in range(101):
        provider.encrypt("k", b"x")

    assert provider.describe_key("k").version(1).encrypt_count == 200


def encrypt_count(provider: LocalKMSProvider) -> int:
    return provider.describe_key("k").version(1).encrypt_count


def test_blocks_used_up_quickly_grow_fourfold_up_to_the_cap(keyring, master_key, monkeypatch):
    # given blocks of 100 allowed to grow to 1,600, and every block counting as "used up quickly"
    monkeypatch.setattr(local_module, "RESERVATION_GROWTH_SECONDS", 3600.0)
    provider = LocalKMSProvider(keyring, master_key, reservation_block=100, max_reservation_block=1600)
    provider.create_key("k")

    # when it makes one encryption more than blocks of 100, 400 and 1,600 hold
    for _ in range(100 + 400 + 1600 + 1):
        provider.generate_data_key("k").wipe()

    # then the fourth block was the cap again
    assert encrypt_count(provider) == 100 + 400 + 1600 + 1600


def test_blocks_used_up_slowly_stay_small(keyring, master_key, monkeypatch):
    monkeypatch.setattr(local_module, "RESERVATION_GROWTH_SECONDS", 0.0)
    provider = LocalKMSProvider(keyring, master_key, reservation_block=100, max_reservation_block=1600)
    provider.create_key("k")

    for _ in range(301):
        provider.encrypt("k", b"x")

    assert encrypt_count(provider) == 400


def test_a_block_is_never_more_than_a_64th_of_the_limit(keyring, master_key, monkeypatch):
    # given a limit of 6,400 (so blocks of at most 100) and blocks that would grow fourfold from 10
    monkeypatch.setattr(local_module, "RESERVATION_GROWTH_SECONDS", 3600.0)
    provider = LocalKMSProvider(keyring, master_key, max_encryptions_per_version=6400, reservation_block=10)
    provider.create_key("k")

    # when it encrypts 1,000 times
    for _ in range(1000):
        provider.encrypt("k", b"x")

    # then the blocks were 10, 40, then 100 each: 1,000 encryptions fit in 10 + 40 + 10 * 100
    assert encrypt_count(provider) == 1050


# -- sharing the keyring ---------------------------------------------------------


def test_changes_by_another_instance_are_seen_at_once(keyring, master_key):
    admin = LocalKMSProvider(keyring, master_key)
    worker = LocalKMSProvider(keyring, master_key)
    admin.create_key("k")
    old = worker.encrypt("k", b"v1")

    admin.rotate_key("k")
    assert worker.encrypt("k", b"v2").key_version == 2

    admin.set_key_version_state("k", 1, VersionState.DISABLED)
    with pytest.raises(InvalidCiphertext):  # a version's state is never said (kms/README.md)
        worker.decrypt(old.ciphertext)

    admin.set_key_state("k", KeyState.DISABLED)
    with pytest.raises(KeyDisabled):
        worker.encrypt("k", b"no")


def test_a_keyring_replaced_behind_the_providers_back_is_seen_within_a_second(keyring, master_key, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(local_module, "_monotonic", lambda: now[0])
    provider = LocalKMSProvider(keyring, master_key)
    provider.create_key("k")
    backup = keyring.with_name("backup")
    shutil.copy2(keyring, backup)
    provider.rotate_key("k")
    assert provider.describe_key("k").primary_version == 2

    os.replace(backup, keyring)  # restored from a backup: no change counter was bumped

    assert provider.describe_key("k").primary_version == 2
    now[0] += local_module.RECHECK_SECONDS
    assert provider.describe_key("k").primary_version == 1


def test_works_without_the_shared_change_counter(keyring, master_key, monkeypatch):
    # Where the lock file cannot be mapped the provider stats the keyring on every call.
    monkeypatch.setattr(LocalKMSProvider, "_open_generation", lambda self: None)
    admin = LocalKMSProvider(keyring, master_key)
    worker = LocalKMSProvider(keyring, master_key)
    admin.create_key("k")
    ciphertext = worker.encrypt("k", b"data").ciphertext

    admin.rotate_key("k")

    assert worker.encrypt("k", b"x").key_version == 2
    assert worker.decrypt(ciphertext).plaintext == b"data"


def _rotate_in_another_process(keyring, master_key) -> None:
    LocalKMSProvider(keyring, master_key).rotate_key("k")


def test_a_rotation_in_another_process_is_seen_at_once(keyring, master_key):
    provider = LocalKMSProvider(keyring, master_key)
    provider.create_key("k")
    assert provider.encrypt("k", b"x").key_version == 1

    child = multiprocessing.get_context("spawn").Process(target=_rotate_in_another_process, args=(keyring, master_key))
    child.start()
    child.join(timeout=60)

    assert child.exitcode == 0
    assert provider.encrypt("k", b"x").key_version == 2


def _count_in_child(provider: LocalKMSProvider, queue) -> None:
    provider.encrypt("k", b"child")
    queue.put(provider.describe_key("k").version(1).encrypt_count)


def test_a_forked_child_reserves_its_own_block(keyring, master_key):
    provider = LocalKMSProvider(keyring, master_key, reservation_block=10)
    provider.create_key("k")
    provider.encrypt("k", b"parent")
    assert provider.describe_key("k").version(1).encrypt_count == 10
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    child = context.Process(target=_count_in_child, args=(provider, queue))
    child.start()
    count_seen_by_child = queue.get(timeout=30)
    child.join(timeout=30)

    assert child.exitcode == 0
    assert count_seen_by_child == 20
    assert provider.describe_key("k").version(1).encrypt_count == 20


ROUNDS = 6


def _hammer(keyring, master_key, worker: int, barrier, queue) -> None:
    """One process: create keys, rotate the shared key and encrypt under everything."""
    try:
        provider = LocalKMSProvider(keyring, master_key, reservation_block=3)
        barrier.wait(timeout=60)
        made = []
        rotated = []
        for round_ in range(ROUNDS):
            own = f"w{worker}-k{round_}"
            provider.create_key(own)
            rotated.append(provider.rotate_key("shared").version)
            for key_id in (own, "shared"):
                for n in range(4):
                    plaintext = f"{worker}/{round_}/{key_id}/{n}".encode()
                    result = provider.encrypt(key_id, plaintext, encryption_context={"w": str(worker)})
                    made.append((result.ciphertext, plaintext, result.key_id, result.key_version))
        queue.put((worker, rotated, made))
    except BaseException as exc:  # report to the test instead of leaving it waiting
        queue.put((worker, f"{type(exc).__name__}: {exc}", []))


def test_processes_sharing_a_keyring_lose_no_key_version_or_ciphertext(keyring, master_key):
    LocalKMSProvider(keyring, master_key).create_key("shared")
    context = multiprocessing.get_context("spawn")
    workers = 3
    barrier = context.Barrier(workers)
    queue = context.Queue()
    processes = [context.Process(target=_hammer, args=(keyring, master_key, n, barrier, queue)) for n in range(workers)]
    for process in processes:
        process.start()
    reports = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert [rotated for _, rotated, _ in reports if isinstance(rotated, str)] == []
    assert [process.exitcode for process in processes] == [0] * workers

    provider = LocalKMSProvider(keyring, master_key)
    shared = provider.describe_key("shared")
    rotations = sorted(version for _, rotated, _ in reports for version in rotated)
    # Every rotation got its own version number and every version is still there.
    assert rotations == list(range(2, 2 + workers * ROUNDS))
    assert [v.version for v in shared.versions] == list(range(1, 2 + workers * ROUNDS))
    for worker in range(workers):
        for round_ in range(ROUNDS):
            assert provider.describe_key(f"w{worker}-k{round_}").primary_version == 1
    made = [item for _, _, items in reports for item in items]
    assert len(made) == workers * ROUNDS * 2 * 4
    used: dict[tuple[str, int], int] = {}
    for ciphertext, plaintext, key_id, version in made:
        worker = plaintext.split(b"/")[0].decode()
        opened = provider.decrypt(ciphertext, encryption_context={"w": worker})
        assert (opened.plaintext, opened.key_id, opened.key_version) == (plaintext, key_id, version)
        used[(key_id, version)] = used.get((key_id, version), 0) + 1
    # No encryption went uncounted: each version's stored count covers what was made with it.
    for (key_id, version), count in used.items():
        assert provider.describe_key(key_id).version(version).encrypt_count >= count
    with pytest.raises(InvalidCiphertext):
        provider.decrypt(made[0][0], encryption_context={"w": "someone else"})


# -- what a failed decrypt reveals (keyvault/kms/README.md) ------------------------------------------


@pytest.mark.parametrize("named", [3, 99, 2**32 - 1], ids=["next", "far", "largest"])
def test_a_header_naming_a_version_that_never_existed_gets_the_one_opaque_error(keyring, master_key, named):
    # given a key with versions 1 (destroyed) and 2, and a ciphertext of v2 whose header is made to name another
    provider = LocalKMSProvider(keyring, master_key)
    provider.create_key("k")
    provider.rotate_key("k")
    provider.set_key_version_state("k", 1, VersionState.DESTROYED)
    ciphertext = provider.encrypt("k", b"v2 data").ciphertext
    at = 2 + ciphertext[1]  # format version, key id length, key id, then the u32 version
    forged = ciphertext[:at] + named.to_bytes(4, "big") + ciphertext[at + 4:]
    destroyed = ciphertext[:at] + (1).to_bytes(4, "big") + ciphertext[at + 4:]

    # when both are opened, then each gets exactly the error any tampered ciphertext gets
    for blob in (forged, destroyed):
        with pytest.raises(InvalidCiphertext) as raised:
            provider.decrypt(blob)
        assert type(raised.value) is InvalidCiphertext and str(raised.value) == str(InvalidCiphertext())


# -- the bulk rewrap ------------------------------------------------------------------------------

ITEM_KINDS = ("good", "no context", "other key", "wrong context", "malformed", "tampered", "disabled version",
              "memoryview")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(ITEM_KINDS), max_size=12), to_other=st.booleans())
def test_rewrap_many_gives_what_the_contracts_default_loop_gives(tmp_path_factory, master_key, kinds, to_other):
    # given a key rotated to v3 with v2 disabled, another key, and items of every kind in a random order
    provider = LocalKMSProvider(tmp_path_factory.mktemp("kms") / "keyring", master_key)
    provider.create_key("k")
    provider.create_key("other")
    context = {"tenant": "t1"}
    sealed = {n: provider.encrypt("k", b"dek %d" % n, encryption_context=context).ciphertext for n in (1, 2)}
    provider.rotate_key("k")
    provider.rotate_key("k")
    provider.set_key_version_state("k", 2, VersionState.DISABLED)
    made = {
        "good": RewrapItem(sealed[1], BoundContext(context)),
        "no context": RewrapItem(provider.encrypt("k", b"bare").ciphertext, None),
        "other key": RewrapItem(provider.encrypt("other", b"o", encryption_context=context).ciphertext, context),
        "wrong context": RewrapItem(sealed[1], {"tenant": "t2"}),
        "malformed": RewrapItem(b"\x01", context),
        "tampered": RewrapItem(sealed[1][:-1] + bytes([sealed[1][-1] ^ 1]), context),
        "disabled version": RewrapItem(sealed[2], context),
        "memoryview": RewrapItem(memoryview(sealed[1]), context),
    }
    items = [made[kind] for kind in kinds]
    key_id = "other" if to_other else None

    # when the local provider's own rewrap_many and the contract's default loop rewrap them
    fast = provider.rewrap_many(items, key_id=key_id)
    default = KMSProvider.rewrap_many(provider, items, key_id=key_id)

    # then each place holds the same kind of outcome: the same error, or a ciphertext of the same key and
    # version opening to the same plaintext under the item's context
    assert [type(outcome) for outcome in fast] == [type(outcome) for outcome in default]
    for item, mine, theirs in zip(items, fast, default, strict=True):
        if isinstance(mine, Exception):
            assert str(mine) == str(theirs)
            continue
        assert (mine.key_id, mine.key_version) == (theirs.key_id, theirs.key_version)
        assert mine.ciphertext != theirs.ciphertext  # each sealed under a fresh nonce
        opened = [provider.decrypt(result.ciphertext, encryption_context=item.encryption_context).plaintext
                  for result in (mine, theirs)]
        assert opened[0] == opened[1]


def test_rewrap_many_counts_every_encryption_and_refuses_past_the_limit_per_item(keyring, master_key):
    # given a key that may encrypt 5 times, 2 of them used
    provider = LocalKMSProvider(keyring, master_key, max_encryptions_per_version=5, reservation_block=1)
    provider.create_key("k")
    items = [RewrapItem(provider.encrypt("k", b"dek %d" % n).ciphertext) for n in range(2)]

    # when 4 items are rewrapped in place
    results = provider.rewrap_many(items * 2)

    # then 3 encryptions were left, and the fourth item alone met the refusal
    assert [type(result) for result in results] == [EncryptResult] * 3 + [KeyDisabled]
    assert provider.describe_key("k").version(1).encrypt_count == 5


def test_rewrap_many_of_a_context_that_is_no_context_raises_as_the_default_loop_does(keyring, master_key):
    provider = LocalKMSProvider(keyring, master_key)
    provider.create_key("k")
    items = [RewrapItem(provider.encrypt("k", b"dek").ciphertext, {"n": 1})]  # not a string value

    for rewrap_many in (provider.rewrap_many, lambda batch: KMSProvider.rewrap_many(provider, batch)):
        with pytest.raises(TypeError):
            rewrap_many(items)

"""The DEK cache: limits, partitions, TTL, wiping, LRU, threads, fork, and fewer provider calls."""

import collections
import multiprocessing
import os
import threading

import pytest

from keyvault.kms import ConfigurationError, InvalidCiphertext, KMSProvider
from keyvault.kms.cache import DEFAULT_MAX_MESSAGES, MAX_MESSAGES_LIMIT, CachedDataKey, DataKeyCache
from keyvault.kms.envelope import EnvelopeEncryptor
from keyvault.kms.local import LocalKMSProvider, generate_master_key

CONTEXT = {"tenant": "acme"}


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingProvider(KMSProvider):
    """The real local provider, counting the calls that reach it (a wrapper, not a mock)."""

    name = "counting"

    def __init__(self, inner: KMSProvider) -> None:
        self.inner = inner
        self.calls: collections.Counter = collections.Counter()
        self.capabilities = inner.capabilities

    def _count(self, method: str):
        self.calls[method] += 1
        return getattr(self.inner, method)

    def create_key(self, key_id, *, description=""):
        return self._count("create_key")(key_id, description=description)

    def describe_key(self, key_id):
        return self._count("describe_key")(key_id)

    def rotate_key(self, key_id):
        return self._count("rotate_key")(key_id)

    def set_key_version_state(self, key_id, version, state):
        return self._count("set_key_version_state")(key_id, version, state)

    def encrypt(self, key_id, plaintext, *, encryption_context=None):
        return self._count("encrypt")(key_id, plaintext, encryption_context=encryption_context)

    def decrypt(self, ciphertext, *, encryption_context=None):
        return self._count("decrypt")(ciphertext, encryption_context=encryption_context)

    def generate_data_key(self, key_id, *, encryption_context=None, key_spec="AES_256"):
        return self._count("generate_data_key")(key_id, encryption_context=encryption_context, key_spec=key_spec)

    def health_check(self):
        return self._count("health_check")()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    provider = LocalKMSProvider(tmp_path_factory.mktemp("cache") / "keyring", generate_master_key())
    provider.create_key("kek")
    provider.create_key("kek-2")
    return provider


@pytest.fixture
def provider(local):
    return CountingProvider(local)


@pytest.fixture
def clock():
    return FakeClock()


def wrapped_dek(blob: bytes) -> bytes:
    """The wrapped-DEK field of a blob: equal for blobs that share a DEK."""
    at = 6 + blob[5] + 4
    length = int.from_bytes(blob[at : at + 2], "big")
    return blob[at + 2 : at + 2 + length]


def entry(key: bytearray | None = None) -> CachedDataKey:
    return CachedDataKey(key if key is not None else bytearray(os.urandom(32)), kek_id="k", kek_version=1, wrapped=b"w")


# -- encryption limits -----------------------------------------------------


def test_dek_is_reused_until_max_age(provider, clock):
    encryptor = EnvelopeEncryptor(provider, "kek", cache=DataKeyCache(max_age=60, clock=clock))

    first = encryptor.encrypt(b"a")
    clock.advance(59.9)
    second = encryptor.encrypt(b"b")
    clock.advance(0.1)
    third = encryptor.encrypt(b"c")

    assert wrapped_dek(first) == wrapped_dek(second) != wrapped_dek(third)
    assert provider.calls["generate_data_key"] == 2
    assert [encryptor.decrypt(blob) for blob in (first, second, third)] == [b"a", b"b", b"c"]


def test_dek_is_reused_for_at_most_max_messages(provider, clock):
    encryptor = EnvelopeEncryptor(provider, "kek", cache=DataKeyCache(max_messages=3, clock=clock))

    blobs = [encryptor.encrypt(b"m") for _ in range(7)]

    groups = collections.Counter(wrapped_dek(blob) for blob in blobs)
    assert sorted(groups.values()) == [1, 3, 3]
    assert provider.calls["generate_data_key"] == 3


def test_dek_is_reused_for_at_most_max_bytes(provider, clock):
    cache = DataKeyCache(max_bytes=100, clock=clock)
    encryptor = EnvelopeEncryptor(provider, "kek", cache=cache)

    a = encryptor.encrypt(bytes(60))
    b = encryptor.encrypt(bytes(40))  # exactly 100: still the same DEK
    c = encryptor.encrypt(bytes(1))  # would make 101: a new DEK
    big = encryptor.encrypt(bytes(101))  # larger than max_bytes on its own: never cached
    d = encryptor.encrypt(bytes(1))

    assert wrapped_dek(a) == wrapped_dek(b)
    assert len({wrapped_dek(c), wrapped_dek(a), wrapped_dek(big)}) == 3
    assert wrapped_dek(d) == wrapped_dek(c)
    assert provider.calls["generate_data_key"] == 3
    assert encryptor.decrypt(big) == bytes(101)


def test_a_message_too_large_to_cache_has_its_key_wiped(clock):
    cache = DataKeyCache(max_bytes=10, clock=clock)
    key = bytearray(os.urandom(32))

    assert cache.put_for_encrypt("p", entry(key), 11) is False
    assert cache.get_for_encrypt("p", 1) is None
    # (the envelope wipes such a one-off key itself)


def test_expired_and_exhausted_encryption_entries_are_wiped(clock):
    cache = DataKeyCache(max_age=10, max_messages=2, clock=clock)
    aged, used = bytearray(os.urandom(32)), bytearray(os.urandom(32))
    cache.put_for_encrypt("aged", entry(aged), 1)
    cache.put_for_encrypt("used", entry(used), 1)

    assert cache.get_for_encrypt("used", 1) is not None  # second message: the limit
    assert cache.get_for_encrypt("used", 1) is None
    clock.advance(10)
    assert cache.get_for_encrypt("aged", 1) is None

    assert aged == bytearray(32) and used == bytearray(32)
    assert len(cache) == 0


# -- partitions ------------------------------------------------------------


def test_partitioned_by_context_and_by_key(provider, clock):
    cache = DataKeyCache(clock=clock)
    kek = EnvelopeEncryptor(provider, "kek", cache=cache)
    kek_2 = EnvelopeEncryptor(provider, "kek-2", cache=cache)

    plain = kek.encrypt(b"x")
    acme = kek.encrypt(b"x", encryption_context={"tenant": "acme", "table": "t"})
    acme_reordered = kek.encrypt(b"x", encryption_context={"table": "t", "tenant": "acme"})
    globex = kek.encrypt(b"x", encryption_context={"tenant": "globex", "table": "t"})
    other_key = kek_2.encrypt(b"x")
    # Encryptors are cheap; a new one on the same provider and KEK shares the cache.
    again = EnvelopeEncryptor(provider, "kek", cache=cache).encrypt(b"x")

    assert wrapped_dek(acme) == wrapped_dek(acme_reordered)
    assert wrapped_dek(again) == wrapped_dek(plain)
    assert len({wrapped_dek(b) for b in (plain, acme, globex, other_key)}) == 4
    assert provider.calls["generate_data_key"] == 4


def test_separate_providers_never_share_entries(local, clock):
    cache = DataKeyCache(clock=clock)
    first, second = CountingProvider(local), CountingProvider(local)

    blob = EnvelopeEncryptor(first, "kek", cache=cache).encrypt(b"x")
    EnvelopeEncryptor(second, "kek", cache=cache).encrypt(b"x")
    EnvelopeEncryptor(first, "kek", cache=cache).decrypt(blob)
    EnvelopeEncryptor(second, "kek", cache=cache).decrypt(blob)

    assert (first.calls["generate_data_key"], second.calls["generate_data_key"]) == (1, 1)
    assert (first.calls["decrypt"], second.calls["decrypt"]) == (1, 1)


# -- decryption ------------------------------------------------------------


def test_decrypt_cache_ttl(provider, clock):
    encryptor = EnvelopeEncryptor(provider, "kek", cache=DataKeyCache(decrypt_ttl=30, clock=clock))
    blob = EnvelopeEncryptor(provider, "kek").encrypt(b"secret", encryption_context=CONTEXT)

    for _ in range(5):
        assert encryptor.decrypt(blob, encryption_context=CONTEXT) == b"secret"
    assert provider.calls["decrypt"] == 1
    clock.advance(29.9)
    assert encryptor.decrypt(blob, encryption_context=CONTEXT) == b"secret"
    assert provider.calls["decrypt"] == 1
    clock.advance(0.1)
    assert encryptor.decrypt(blob, encryption_context=CONTEXT) == b"secret"
    assert provider.calls["decrypt"] == 2


def test_decrypt_cache_is_keyed_by_context_too(provider, clock):
    cache = DataKeyCache(clock=clock)
    encryptor = EnvelopeEncryptor(provider, "kek", cache=cache)
    blob = encryptor.encrypt(b"bound", encryption_context=CONTEXT)
    assert encryptor.decrypt(blob, encryption_context=CONTEXT) == b"bound"

    with pytest.raises(InvalidCiphertext):
        encryptor.decrypt(blob, encryption_context={"tenant": "globex"})
    with pytest.raises(InvalidCiphertext):
        encryptor.decrypt(blob)
    # The wrong contexts went to the provider, which refused them: no cache hit skipped a check.
    assert provider.calls["decrypt"] == 3


def test_expired_decrypt_entry_is_wiped(clock):
    cache = DataKeyCache(decrypt_ttl=5, clock=clock)
    key = bytearray(os.urandom(32))
    cache.put_for_decrypt("w", entry(key))
    assert cache.get_for_decrypt("w") is not None

    clock.advance(5)

    assert cache.get_for_decrypt("w") is None
    assert key == bytearray(32)


# -- capacity, LRU, clear --------------------------------------------------


@pytest.mark.parametrize("side", ["encrypt", "decrypt"])
def test_capacity_evicts_the_least_recently_used_and_wipes_it(clock, side):
    cache = DataKeyCache(capacity=2, clock=clock)
    keys = {name: bytearray(os.urandom(32)) for name in "abc"}
    put = (
        (lambda name: cache.put_for_encrypt(name, entry(keys[name]), 1))
        if side == "encrypt"
        else (lambda name: cache.put_for_decrypt(name, entry(keys[name])))
    )
    get = (lambda name: cache.get_for_encrypt(name, 1)) if side == "encrypt" else cache.get_for_decrypt

    put("a")
    put("b")
    assert get("a") is not None  # a is now more recent than b
    put("c")

    assert keys["b"] == bytearray(32)
    assert get("b") is None
    assert get("a") is not None and get("c") is not None
    assert keys["a"] != bytearray(32) and keys["c"] != bytearray(32)


def test_an_entry_marked_used_gets_a_second_chance(clock):
    cache = DataKeyCache(capacity=2, clock=clock)
    first, second = entry(), entry()
    cache.put_for_decrypt("first", first)
    cache.put_for_decrypt("second", second)

    DataKeyCache.mark_used(first)  # used through a held reference, not a lookup
    cache.put_for_decrypt("third", entry())

    assert cache.get_for_decrypt("first") is first
    assert cache.get_for_decrypt("second") is None
    assert second.key == bytearray(32)


def test_replacing_an_entry_wipes_the_old_one(clock):
    cache = DataKeyCache(clock=clock)
    old_key = bytearray(os.urandom(32))
    cache.put_for_encrypt("p", entry(old_key), 1)
    cache.put_for_encrypt("p", entry(), 1)

    assert old_key == bytearray(32)
    assert len(cache) == 1


def test_clear_wipes_everything(provider, clock):
    cache = DataKeyCache(clock=clock)
    encryptor = EnvelopeEncryptor(provider, "kek", cache=cache)
    encryptor.decrypt(encryptor.encrypt(b"x"))
    keys = [e.key for e in [*cache._encrypt.values(), *cache._decrypt.values()]]
    assert len(keys) == 2 and all(key != bytearray(32) for key in keys)

    cache.clear()

    assert len(cache) == 0
    assert all(key == bytearray(32) for key in keys)
    assert encryptor.decrypt(encryptor.encrypt(b"y")) == b"y"


# -- configuration ---------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"max_age": 0},
        {"max_age": -1},
        {"decrypt_ttl": 0},
        {"max_messages": 0},
        {"max_messages": MAX_MESSAGES_LIMIT + 1},
        {"max_bytes": 0},
        {"capacity": 0},
    ],
)
def test_limits_out_of_range_are_refused(options):
    with pytest.raises(ConfigurationError):
        DataKeyCache(**options)


def test_defaults_respect_the_nist_message_limit():
    cache = DataKeyCache()

    assert cache.max_messages == DEFAULT_MAX_MESSAGES <= 2**32
    assert (cache.max_age, cache.decrypt_ttl, cache.max_bytes, cache.capacity) == (300.0, 300.0, 2**32, 1000)
    assert DataKeyCache(max_messages=2**32).max_messages == 2**32


# -- fewer provider calls --------------------------------------------------


def test_cache_saves_provider_calls(provider):
    uncached = EnvelopeEncryptor(provider, "kek")
    blobs = [uncached.encrypt(b"row %d" % i) for i in range(50)]
    for blob in blobs:
        uncached.decrypt(blob)
    assert (provider.calls["generate_data_key"], provider.calls["decrypt"]) == (50, 50)

    provider.calls.clear()
    cached = EnvelopeEncryptor(provider, "kek", cache=DataKeyCache())
    blobs = [cached.encrypt(b"row %d" % i) for i in range(50)]
    assert [cached.decrypt(blob) for blob in blobs] == [b"row %d" % i for i in range(50)]
    assert (provider.calls["generate_data_key"], provider.calls["decrypt"]) == (1, 1)


# -- threads and processes -------------------------------------------------


def test_threads_share_the_cache_without_breaking_limits(provider):
    cache = DataKeyCache(max_messages=25, capacity=8)
    encryptor = EnvelopeEncryptor(provider, "kek", cache=cache)
    contexts = [None, {"tenant": "a"}, {"tenant": "b"}]
    results: list[tuple[bytes, bytes, dict | None]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def work(worker: int) -> None:
        try:
            start.wait()
            for i in range(120):
                context = contexts[i % 3]
                plaintext = b"%d-%d" % (worker, i)
                blob = encryptor.encrypt(plaintext, encryption_context=context)
                assert encryptor.decrypt(blob, encryption_context=context) == plaintext
                results.append((blob, plaintext, context))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(results) == 720
    per_dek = collections.Counter(wrapped_dek(blob) for blob, _, _ in results)
    assert max(per_dek.values()) <= 25
    assert provider.calls["generate_data_key"] == len(per_dek) >= 720 // 25
    fresh = EnvelopeEncryptor(provider, "kek")
    for blob, plaintext, context in results[::7]:
        assert fresh.decrypt(blob, encryption_context=context) == plaintext


def _encrypt_in_child(encryptor: EnvelopeEncryptor, queue) -> None:
    queue.put((len(encryptor.cache._encrypt), encryptor.encrypt(b"from the child")))


def test_forked_child_does_not_reuse_the_parents_encryption_dek(local):
    cache = DataKeyCache()
    encryptor = EnvelopeEncryptor(local, "kek", cache=cache)
    parent_blob = encryptor.encrypt(b"from the parent")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    child = context.Process(target=_encrypt_in_child, args=(encryptor, queue))
    child.start()
    entries_in_child, child_blob = queue.get(timeout=30)
    child.join(timeout=30)

    assert child.exitcode == 0
    assert entries_in_child == 0
    assert wrapped_dek(child_blob) != wrapped_dek(parent_blob)
    assert encryptor.decrypt(child_blob) == b"from the child"
    assert wrapped_dek(encryptor.encrypt(b"again")) == wrapped_dek(parent_blob)

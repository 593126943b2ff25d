"""A cache of data-encryption keys (DEKs) for envelope encryption.

Modelled on the AWS Encryption SDK's caching cryptographic materials manager:

* **Encryption** reuses one DEK, per partition (provider, KEK id and canonical
  encryption context), for up to ``max_age`` seconds, ``max_messages``
  messages and ``max_bytes`` plaintext bytes, whichever comes first. Then the
  entry is evicted and the next message gets a fresh DEK from the provider.
* **Decryption** remembers unwrapped DEKs for ``decrypt_ttl`` seconds. The
  envelope looks them up by the provider, the blob's whole header (KEK id,
  KEK version and the exact wrapped-DEK bytes: an exact match, stronger than a
  digest and cheaper) and the canonical context, so a hit never skips a check
  the provider would have made for *that* blob and context.

Defaults, and why:

=================  ==========  ====================================================
``max_age``        300 s       a revoked or disabled KEK stops being used within
                               five minutes (AWS KMS itself is eventually consistent
                               over a similar window).
``max_messages``   2**20       far below the 2**32 random-nonce messages NIST SP
                               800-38D allows per key; a forked child starts with
                               no encryption entries, so processes never share one.
``max_bytes``      2**32       4 GiB of plaintext per DEK.
``decrypt_ttl``    300 s       as ``max_age``.
``capacity``       1000        entries per side (encryption, decryption), LRU.
=================  ==========  ====================================================

What a cache costs: a DEK cached for decryption keeps opening its blobs for up
to ``decrypt_ttl`` after its KEK version was disabled at the provider. Call
:meth:`DataKeyCache.clear` after disabling or destroying a version when that
must take effect at once.

Evicted keys are wiped: the ``bytearray`` holding the DEK is zeroed. The
``AESGCM`` object built from it keeps its own copy inside OpenSSL, which
Python cannot reach; it is released with the entry, once no thread still
finishing a message holds it. The cache is thread-safe (one lock guards the
maps and the usage counts; the only write made outside it is the single-store
``referenced`` flag of :meth:`DataKeyCache.mark_used`) and takes an injectable
``clock`` (seconds, monotonic) for tests.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigurationError

#: NIST SP 800-38D §8.3: at most 2**32 encryptions with random 96-bit nonces per key.
MAX_MESSAGES_LIMIT = 2**32

DEFAULT_MAX_AGE = 300.0
DEFAULT_MAX_MESSAGES = 2**20
DEFAULT_MAX_BYTES = 2**32
DEFAULT_DECRYPT_TTL = 300.0
DEFAULT_CAPACITY = 1000

_NEVER = float("-inf")


class CachedDataKey:
    """One unwrapped DEK with what is needed to use it, and its usage so far.

    ``header`` and ``aad`` are bytes the user of the cache precomputes once per
    DEK (the envelope keeps its blob header and data AAD there); the cache
    never looks at them.
    """

    __slots__ = (
        "key",
        "cipher",
        "kek_id",
        "kek_version",
        "wrapped",
        "header",
        "aad",
        "created_at",
        "expires_at",
        "messages",
        "bytes",
        "referenced",
    )

    def __init__(
        self,
        key: bytearray,
        *,
        kek_id: str,
        kek_version: int,
        wrapped: bytes,
        header: bytes = b"",
        aad: bytes = b"",
    ) -> None:
        self.key = key
        self.cipher = AESGCM(key)
        self.kek_id = kek_id
        self.kek_version = kek_version
        self.wrapped = wrapped
        self.header = header
        self.aad = aad
        self.created_at = 0.0
        #: clock reading from which the entry is unusable; ``-inf`` once evicted.
        self.expires_at = _NEVER
        self.messages = 0
        self.bytes = 0
        #: set by users that hold the entry between lookups (see :meth:`DataKeyCache.mark_used`).
        self.referenced = False

    def wipe(self) -> None:
        """Zero the DEK in place.

        The cipher stays: another thread may be finishing a message it took
        before the eviction (its OpenSSL copy of the key goes with the entry).
        """
        self.expires_at = _NEVER
        self.key[:] = bytes(len(self.key))

    def __repr__(self) -> str:
        return (
            f"CachedDataKey(kek_id={self.kek_id!r}, kek_version={self.kek_version}, key=<redacted>, "
            f"messages={self.messages}, bytes={self.bytes})"
        )


# After fork the child drops every encryption entry (so parent and child never
# count messages for the same DEK separately) and gets a fresh lock.
_live_caches: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_live_caches):
        cache._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class DataKeyCache:
    """Bounded, thread-safe LRU cache of DEKs for :class:`~keyvault.kms.envelope.EnvelopeEncryptor`.

    :param max_age: seconds an encryption DEK may be reused (> 0).
    :param max_messages: messages per encryption DEK (1 .. 2**32).
    :param max_bytes: plaintext bytes per encryption DEK (> 0); a single message
        larger than this is never cached.
    :param decrypt_ttl: seconds an unwrapped DEK stays cached for decryption (> 0).
    :param capacity: entries kept per side (encryption, decryption); the least
        recently used is evicted and wiped.
    :param clock: monotonic seconds; injectable for tests.
    :raises ConfigurationError: a limit is out of range.
    """

    def __init__(
        self,
        *,
        max_age: float = DEFAULT_MAX_AGE,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        decrypt_ttl: float = DEFAULT_DECRYPT_TTL,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not max_age > 0 or not decrypt_ttl > 0:
            raise ConfigurationError("DataKeyCache max_age and decrypt_ttl must be positive")
        if not 1 <= max_messages <= MAX_MESSAGES_LIMIT:
            raise ConfigurationError(f"DataKeyCache max_messages must be between 1 and 2**32, not {max_messages}")
        if max_bytes < 1 or capacity < 1:
            raise ConfigurationError("DataKeyCache max_bytes and capacity must be positive")
        self.max_age = float(max_age)
        self.max_messages = int(max_messages)
        self.max_bytes = int(max_bytes)
        self.decrypt_ttl = float(decrypt_ttl)
        self.capacity = int(capacity)
        self.clock = clock
        self._lock = threading.Lock()
        self._encrypt: OrderedDict[Hashable, CachedDataKey] = OrderedDict()
        self._decrypt: OrderedDict[Hashable, CachedDataKey] = OrderedDict()
        _live_caches.add(self)

    # -- encryption ----------------------------------------------------

    def get_for_encrypt(self, partition: Hashable, plaintext_length: int) -> CachedDataKey | None:
        """Return the partition's DEK with this message counted, or ``None`` if none may serve it.

        An entry that is too old, or that this message would take past
        ``max_messages`` or ``max_bytes``, is evicted and wiped. A message
        larger than ``max_bytes`` on its own bypasses the cache and leaves the
        entry alone.
        """
        if plaintext_length > self.max_bytes:
            return None
        lock = self._lock
        lock.acquire()
        try:
            entry = self._encrypt.get(partition)
            if entry is None:
                return None
            messages, total = entry.messages, entry.bytes + plaintext_length
            if messages < self.max_messages and total <= self.max_bytes and self.clock() < entry.expires_at:
                entry.messages = messages + 1
                entry.bytes = total
                entry.referenced = False
                self._encrypt.move_to_end(partition)
                return entry
            del self._encrypt[partition]
        finally:
            lock.release()
        entry.wipe()
        return None

    def reuse_for_encrypt(self, entry: CachedDataKey, plaintext_length: int) -> bool:
        """Count one more message on an entry the caller kept from an earlier lookup, if it may take it.

        The same limits as :meth:`get_for_encrypt`, without the lookup: ``False``
        when the entry was evicted, is too old, or this message would take it past
        ``max_messages`` or ``max_bytes`` (then look the partition up again, which
        evicts it). A reuse gives the entry the second chance of :meth:`mark_used`
        instead of moving it in the LRU order.
        """
        lock = self._lock
        lock.acquire()
        try:
            messages, total = entry.messages, entry.bytes + plaintext_length
            if messages < self.max_messages and total <= self.max_bytes and self.clock() < entry.expires_at:
                entry.messages = messages + 1
                entry.bytes = total
                entry.referenced = True
                return True
            return False
        finally:
            lock.release()

    def put_for_encrypt(self, partition: Hashable, entry: CachedDataKey, plaintext_length: int) -> bool:
        """Store a fresh DEK for ``partition``, counting its first message of ``plaintext_length`` bytes.

        :returns: ``False`` (and stores nothing) when that one message already
            exceeds ``max_bytes``; the caller then uses the DEK once and wipes it.
        """
        if plaintext_length > self.max_bytes:
            return False
        entry.created_at = self.clock()
        entry.expires_at = entry.created_at + self.max_age
        entry.messages = 1
        entry.bytes = plaintext_length
        with self._lock:
            evicted = self._store(self._encrypt, partition, entry)
        for old in evicted:
            old.wipe()
        return True

    # -- decryption ----------------------------------------------------

    def get_for_decrypt(self, lookup: Hashable) -> CachedDataKey | None:
        """Return the unwrapped DEK stored under ``lookup``, unless its TTL has run out."""
        lock = self._lock
        lock.acquire()
        try:
            entry = self._decrypt.get(lookup)
            if entry is None:
                return None
            if self.clock() < entry.expires_at:
                self._decrypt.move_to_end(lookup)
                entry.referenced = False
                return entry
            del self._decrypt[lookup]
        finally:
            lock.release()
        entry.wipe()
        return None

    @staticmethod
    def mark_used(entry: CachedDataKey) -> None:
        """Record a use of an entry the caller kept from an earlier lookup.

        Lookups move an entry to the young end of the LRU order; a caller
        that reuses an entry it holds (the envelope's last-header memo) only
        sets this flag, and eviction gives a flagged entry a second chance
        (moves it to the young end, clears the flag) instead of evicting it.
        Check ``entry.expires_at`` against the clock before using it.
        """
        entry.referenced = True

    def put_for_decrypt(self, lookup: Hashable, entry: CachedDataKey) -> None:
        """Remember an unwrapped DEK under ``lookup`` for ``decrypt_ttl`` seconds."""
        entry.created_at = self.clock()
        entry.expires_at = entry.created_at + self.decrypt_ttl
        with self._lock:
            evicted = self._store(self._decrypt, lookup, entry)
        for old in evicted:
            old.wipe()

    # -- housekeeping --------------------------------------------------

    def _store(self, side: OrderedDict, lookup: Hashable, entry: CachedDataKey) -> list[CachedDataKey]:
        """Insert under the lock; return the entries pushed out (to wipe outside it)."""
        evicted = []
        previous = side.pop(lookup, None)
        if previous is not None and previous is not entry:
            evicted.append(previous)
        side[lookup] = entry
        while len(side) > self.capacity:
            oldest_lookup, oldest = side.popitem(last=False)
            if oldest.referenced:  # used since it last moved: a second chance
                oldest.referenced = False
                side[oldest_lookup] = oldest
            else:
                evicted.append(oldest)
        return evicted

    def clear(self) -> None:
        """Evict and wipe every entry (e.g. after disabling a KEK version)."""
        with self._lock:
            entries = [*self._encrypt.values(), *self._decrypt.values()]
            self._encrypt.clear()
            self._decrypt.clear()
        for entry in entries:
            entry.wipe()

    def __len__(self) -> int:
        return len(self._encrypt) + len(self._decrypt)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        entries, self._encrypt = list(self._encrypt.values()), OrderedDict()
        for entry in entries:
            entry.wipe()

    def __repr__(self) -> str:
        return (
            f"DataKeyCache(max_age={self.max_age}, max_messages={self.max_messages}, max_bytes={self.max_bytes}, "
            f"decrypt_ttl={self.decrypt_ttl}, capacity={self.capacity}, "
            f"entries={len(self._encrypt)}+{len(self._decrypt)})"
        )

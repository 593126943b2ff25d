"""Envelope encryption: data under a fresh AES-256-GCM data key, the data key under a KEK.

Any :class:`~keyvault.kms.base.KMSProvider` holds the key-encryption key
(KEK); only the short data-encryption key (DEK) travels to it, so data of any
size costs one provider call (none at all with a :class:`DataKeyCache` hit).

Blob layout, version 1 (integers big-endian; byte by byte in ``README.md``)::

    4   magic "KVEN"
    u8  format version (1)
    u8  KEK id length L (1..255)
    L   KEK id, UTF-8
    u32 KEK version that wrapped the DEK
    u16 wrapped-DEK length W (1..65535)
    W   wrapped DEK (the provider's own ciphertext, opaque here)
    12  nonce (random per message)
    N   AES-256-GCM data ciphertext ‖ 16-byte tag

How every header byte is authenticated while :meth:`EnvelopeEncryptor.rewrap`
can still swap the wrapped DEK and KEK version without touching the data:

* the data AEAD's associated data is ``magic ‖ format version ‖ L ‖ KEK id``
  followed by the canonical encryption context (:func:`encode_context`);
* the wrapped DEK is the provider's AEAD ciphertext under the same context;
  the provider reports which key and version opened it, and both must equal
  the header's KEK id and KEK version;
* the length fields only frame those parts: any change shifts the nonce or the
  ciphertext and the tag check fails;
* a wrapped DEK spliced in from another blob under the same KEK and context
  passes the provider and the version check but yields another DEK, under
  which the data's tag fails.

Every failure to open a blob is the one opaque :class:`InvalidCiphertext`.

Where a provider offers tuple-returning fast paths (``decrypt_parts``,
``generate_data_key_parts``; see :mod:`keyvault.kms.fastpath`) the envelope
calls them directly, also through the registry's metrics proxy. A context is
encoded once per call (never, for a :class:`~keyvault.kms.context.BoundContext`)
and handed to the provider bound, so the provider does not encode it again.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from struct import Struct
from struct import error as StructError

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .base import EncryptionContext, KMSProvider
from .cache import CachedDataKey, DataKeyCache
from .context import EMPTY_BOUND, EMPTY_CONTEXT, BoundContext, bind_context
from .errors import ConfigurationError, InvalidCiphertext, KeyNotFound
from .fastpath import provider_fast_paths

MAGIC = b"KVEN"
FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
DEK_BYTES = 32
MAX_WRAPPED_DEK_BYTES = 0xFFFF

_VERSION_AND_WRAPPED_LENGTH = Struct(">IH")
_unpack_frame = _VERSION_AND_WRAPPED_LENGTH.unpack_from
_pack_frame = _VERSION_AND_WRAPPED_LENGTH.pack
_TRAILER = NONCE_BYTES + TAG_BYTES  # the least that follows the wrapped DEK
# magic, format version, KEK id length: the part every blob starts with.
_FIXED_PREFIX = len(MAGIC) + 2


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """What a blob says about itself, read without decrypting (so not yet authenticated)."""

    format_version: int
    kek_id: str
    kek_version: int


def read_header(blob: bytes) -> EnvelopeHeader:
    """Return the format version, KEK id and KEK version a blob claims.

    Nothing is verified cryptographically: use it to decide *whether* a blob
    needs :meth:`EnvelopeEncryptor.rewrap` (e.g. its KEK version is not the
    primary), never to trust the blob.

    :raises InvalidCiphertext: the bytes are not a well-formed envelope blob.
    """
    blob = _as_bytes(blob)
    if len(blob) < _FIXED_PREFIX or blob[: len(MAGIC)] != MAGIC or blob[len(MAGIC)] != FORMAT_VERSION:
        raise InvalidCiphertext()
    id_length = blob[len(MAGIC) + 1]
    if id_length == 0:
        raise InvalidCiphertext()
    prefix_end = _FIXED_PREFIX + id_length
    kek_version, _ = _frame(blob, prefix_end)
    try:
        kek_id = blob[_FIXED_PREFIX:prefix_end].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCiphertext() from None
    return EnvelopeHeader(format_version=FORMAT_VERSION, kek_id=kek_id, kek_version=kek_version)


def _frame(blob: bytes, prefix_end: int) -> tuple[int, int]:
    """Read KEK version and wrapped-DEK length after the prefix; return (version, nonce offset)."""
    try:
        kek_version, wrapped_length = _VERSION_AND_WRAPPED_LENGTH.unpack_from(blob, prefix_end)
    except StructError:
        raise InvalidCiphertext() from None
    start = prefix_end + _VERSION_AND_WRAPPED_LENGTH.size + wrapped_length
    if wrapped_length == 0 or len(blob) < start + NONCE_BYTES + TAG_BYTES:
        raise InvalidCiphertext()
    return kek_version, start


def _as_bytes(blob: object) -> bytes:
    if type(blob) is bytes:
        return blob
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise InvalidCiphertext()
    return bytes(blob)


_ZERO_DEK = bytes(DEK_BYTES)


def _wipe(key: bytearray) -> None:
    key[:] = bytes(len(key))


class EnvelopeEncryptor:
    """Encrypt and decrypt data of any size under one KEK of one provider.

    :param provider: the provider holding the KEK.
    :param key_id: the KEK. Blobs name it; this encryptor opens only blobs of
        this KEK (use :func:`read_header` to pick the encryptor for a blob).
    :param cache: reuse DEKs (see :mod:`keyvault.kms.cache`); ``None`` asks the
        provider for a fresh DEK on every encryption and unwraps on every
        decryption.
    :raises ConfigurationError: ``key_id`` is empty or longer than 255 UTF-8 bytes.

    Encryption contexts follow the provider contract: non-secret ``str`` pairs,
    bound to the blob; decryption needs exactly the same pairs in any order.
    A context that is not a mapping of ``str`` raises ``TypeError``.
    Encryptors are cheap and thread-safe; all state worth sharing is in the cache.
    """

    def __init__(self, provider: KMSProvider, key_id: str, *, cache: DataKeyCache | None = None) -> None:
        if not isinstance(provider, KMSProvider):
            raise ConfigurationError("EnvelopeEncryptor needs a KMSProvider")
        if cache is not None and not isinstance(cache, DataKeyCache):
            raise ConfigurationError("EnvelopeEncryptor cache must be a DataKeyCache or None")
        key_bytes = key_id.encode("utf-8") if isinstance(key_id, str) else b""
        if not 1 <= len(key_bytes) <= 255:
            raise ConfigurationError("the envelope KEK id must be 1-255 bytes of UTF-8 text")
        self.provider = provider
        self.key_id = sys.intern(key_id)
        self.cache = cache
        #: magic ‖ format version ‖ L ‖ KEK id: both the blob's first bytes and the start of the data AAD.
        self._prefix = MAGIC + bytes((FORMAT_VERSION, len(key_bytes))) + key_bytes
        self._prefix_end = len(self._prefix)
        self._frame_end = self._prefix_end + _VERSION_AND_WRAPPED_LENGTH.size  # where the wrapped DEK starts
        self._empty_aad = self._prefix + EMPTY_CONTEXT
        self._empty_partition = (provider, key_id, EMPTY_CONTEXT)
        self._decrypt_parts, self._generate_parts = provider_fast_paths(provider)
        #: the provider's decrypt fast path when there is no cache: the one branch decrypt takes then.
        self._uncached_decrypt_parts = self._decrypt_parts if cache is None else None
        #: (context, header, header length, cache entry, clock) of the last blob opened through the cache.
        self._decrypt_memo: tuple | None = None
        #: (context bytes, cache entry) this encryptor encrypted with last.
        self._encrypt_memo: tuple | None = None

    def __repr__(self) -> str:
        cached = self.cache is not None
        return f"EnvelopeEncryptor(provider={self.provider.name!r}, key_id={self.key_id!r}, cached={cached})"

    # -- provider calls ----------------------------------------------

    def _generate(self, encryption_context: EncryptionContext | None) -> tuple[bytearray, bytes, int]:
        """A fresh DEK from the provider: (plaintext, wrapped, KEK version), checked to fit the format."""
        if self._generate_parts is not None:
            key, wrapped, version = self._generate_parts(self.key_id, encryption_context)
        else:
            data_key = self.provider.generate_data_key(self.key_id, encryption_context=encryption_context)
            key, wrapped, version = data_key.plaintext, data_key.ciphertext, data_key.key_version
        if len(key) != DEK_BYTES or not 0 < len(wrapped) <= MAX_WRAPPED_DEK_BYTES:
            _wipe(key)
            raise self._unfit_data_key()
        return key, wrapped, version

    def _unwrap(self, wrapped: bytes, kek_version: int, encryption_context: EncryptionContext | None) -> bytes:
        """Have the provider open the wrapped DEK and check it names this blob's KEK and version."""
        try:
            if self._decrypt_parts is not None:
                dek, key_id, version = self._decrypt_parts(wrapped, encryption_context)
            else:
                opened = self.provider.decrypt(wrapped, encryption_context=encryption_context)
                dek, key_id, version = opened.plaintext, opened.key_id, opened.key_version
        except KeyNotFound:
            raise InvalidCiphertext() from None
        if version != kek_version or key_id != self.key_id or len(dek) != DEK_BYTES:
            raise InvalidCiphertext()
        return dek

    def _unfit_data_key(self) -> ConfigurationError:
        return ConfigurationError(
            f"provider {self.provider.name!r} returned a data key the envelope format cannot hold"
        )

    # -- encrypt -------------------------------------------------------

    def encrypt(self, plaintext: bytes, *, encryption_context: EncryptionContext | None = None) -> bytes:
        """Encrypt ``plaintext`` (any length, including empty) and return the blob.

        :raises KeyNotFound, KeyDisabled, ProviderUnavailable: from the provider.
        :raises TypeError: ``plaintext`` is not bytes-like, or the context is malformed.
        """
        if type(plaintext) is not bytes and not isinstance(plaintext, (bytearray, memoryview)):
            raise TypeError("plaintext must be bytes")
        # Encoded once here (a BoundContext already is) and handed on bound: the provider reuses the bytes.
        if type(encryption_context) is not BoundContext:
            encryption_context = BoundContext(encryption_context) if encryption_context else EMPTY_BOUND
        context = encryption_context.encoded
        cache = self.cache
        if cache is None:
            return self._encrypt_once(plaintext, encryption_context, context)
        memo = self._encrypt_memo
        # The entry this encryptor used last under this very context (a BoundContext's bytes are one
        # object): the cache only has to count the message, no lookup.
        if memo is None or memo[0] is not context or not cache.reuse_for_encrypt(memo[1], len(plaintext)):
            partition = self._empty_partition if context is EMPTY_CONTEXT else (self.provider, self.key_id, context)
            entry = cache.get_for_encrypt(partition, len(plaintext))
            if entry is None:
                entry = self._cache_new_data_key(partition, plaintext, encryption_context, context)
                if entry is None:  # too large to cache: a DEK for this message only
                    return self._encrypt_once(plaintext, encryption_context, context)
            self._encrypt_memo = memo = (context, entry)
        entry = memo[1]
        nonce = os.urandom(NONCE_BYTES)
        return entry.header + nonce + entry.cipher.encrypt(nonce, plaintext, entry.aad)

    def _encrypt_once(self, plaintext: bytes, encryption_context: EncryptionContext | None, context: bytes) -> bytes:
        """Encrypt under a fresh DEK used for this message only (the path without a cache)."""
        aad = self._empty_aad if context is EMPTY_CONTEXT else self._prefix + context
        parts = self._generate_parts
        if parts is None:
            key, wrapped, version = self._generate(encryption_context)
        else:  # _generate, inlined for the hot path
            key, wrapped, version = parts(self.key_id, encryption_context)
            if len(key) != DEK_BYTES or not 0 < len(wrapped) <= MAX_WRAPPED_DEK_BYTES:
                _wipe(key)
                raise self._unfit_data_key()
        try:
            nonce = os.urandom(NONCE_BYTES)
            sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
        finally:
            key[:] = _ZERO_DEK  # same length: zeroed in place
        return b"".join((self._prefix, _pack_frame(version, len(wrapped)), wrapped, nonce, sealed))

    def _cache_new_data_key(
        self, partition: tuple, plaintext: bytes, encryption_context: EncryptionContext | None, context: bytes
    ) -> CachedDataKey | None:
        """Put a fresh DEK in the cache for ``partition``, this message counted; ``None`` if it may not be cached."""
        if len(plaintext) > self.cache.max_bytes:
            return None
        key, wrapped, version = self._generate(encryption_context)
        entry = CachedDataKey(
            key,
            kek_id=self.key_id,
            kek_version=version,
            wrapped=wrapped,
            header=self._prefix + _pack_frame(version, len(wrapped)) + wrapped,
            aad=self._prefix + context,
        )
        self.cache.put_for_encrypt(partition, entry, len(plaintext))
        return entry

    # -- decrypt -------------------------------------------------------

    def decrypt(self, blob: bytes, *, encryption_context: EncryptionContext | None = None) -> bytes:
        """Open a blob made by :meth:`encrypt` (or :meth:`rewrap`) under this KEK.

        :raises InvalidCiphertext: for every failure to open it (malformed,
            truncated, tampered, another KEK, wrong context); never says which.
        :raises KeyDisabled: the KEK version that wrapped the DEK is disabled or
            destroyed (only for an authentic wrapped DEK).
        :raises ProviderUnavailable: the provider could not be reached.
        """
        parts = self._uncached_decrypt_parts
        if parts is not None and type(blob) is bytes:
            # No cache and a provider fast path: the steps below in the fewest operations (this is the
            # whole cost of an uncached decryption besides three AES-GCM calls).
            if type(encryption_context) is not BoundContext:
                encryption_context = BoundContext(encryption_context) if encryption_context else EMPTY_BOUND
            try:
                kek_version, wrapped_length = _unpack_frame(blob, self._prefix_end)
            except StructError:
                raise InvalidCiphertext() from None
            if not blob.startswith(self._prefix):
                raise InvalidCiphertext()
            frame_end = self._frame_end
            start = frame_end + wrapped_length
            try:  # an empty or cut wrapped DEK is refused by the provider as any malformed one is
                dek, key_id, version = parts(blob[frame_end:start], encryption_context)
            except KeyNotFound:
                raise InvalidCiphertext() from None
            if version != kek_version or key_id != self.key_id or len(dek) != DEK_BYTES:
                raise InvalidCiphertext()
            try:
                return AESGCM(dek).decrypt(
                    blob[start : start + NONCE_BYTES], blob[start + NONCE_BYTES :], self._prefix + encryption_context.encoded
                )
            except (InvalidTag, ValueError):  # ValueError: too short to hold a whole nonce
                raise InvalidCiphertext() from None
        if type(blob) is not bytes:
            blob = _as_bytes(blob)
        if type(encryption_context) is not BoundContext:  # as in encrypt
            encryption_context = BoundContext(encryption_context) if encryption_context else EMPTY_BOUND
        context = encryption_context.encoded
        cache = self.cache
        memo = self._decrypt_memo  # (always None without a cache)
        if memo is not None:
            memo_context, memo_header, start, entry, clock = memo
            if (
                memo_context == context
                and blob.startswith(memo_header)
                and len(blob) >= start + _TRAILER
                and clock() < entry.expires_at
            ):
                # Same header as the last blob this encryptor opened under this
                # context (blobs sharing a cached DEK do): already verified, so
                # only the data remains; the entry is still live in the cache.
                entry.referenced = True  # DataKeyCache.mark_used, inlined
                try:
                    return entry.cipher.decrypt(
                        blob[start : start + NONCE_BYTES], blob[start + NONCE_BYTES :], entry.aad
                    )
                except InvalidTag:
                    raise InvalidCiphertext() from None
        # One comparison checks magic, format version, KEK id length and KEK id.
        if not blob.startswith(self._prefix):
            raise InvalidCiphertext()
        try:
            kek_version, wrapped_length = _unpack_frame(blob, self._prefix_end)
        except StructError:
            raise InvalidCiphertext() from None
        frame_end = self._frame_end
        start = frame_end + wrapped_length
        if wrapped_length == 0 or len(blob) < start + _TRAILER:
            raise InvalidCiphertext()
        if cache is None:
            dek = self._unwrap(blob[frame_end:start], kek_version, encryption_context)
            cipher = AESGCM(dek)
            aad = self._empty_aad if context is EMPTY_CONTEXT else self._prefix + context
        else:
            # The header holds KEK id, KEK version and wrapped DEK: one key for all three.
            header = blob[:start]
            lookup = (self.provider, header, context)
            entry = cache.get_for_decrypt(lookup)
            if entry is None:
                dek = self._unwrap(blob[frame_end:start], kek_version, encryption_context)
                entry = CachedDataKey(
                    bytearray(dek),
                    kek_id=self.key_id,
                    kek_version=kek_version,
                    wrapped=header,
                    aad=self._prefix + context,
                )
                cache.put_for_decrypt(lookup, entry)
            # A hit needs no further check: the lookup holds the whole header
            # (KEK id, KEK version, wrapped DEK), which _unwrap verified under
            # this very context before the entry went in.
            self._decrypt_memo = (context, header, start, entry, cache.clock)
            cipher, aad = entry.cipher, entry.aad
        try:
            return cipher.decrypt(blob[start : start + NONCE_BYTES], blob[start + NONCE_BYTES :], aad)
        except InvalidTag:
            raise InvalidCiphertext() from None

    # -- rewrap --------------------------------------------------------

    def rewrap(self, blob: bytes, *, encryption_context: EncryptionContext | None = None) -> bytes:
        """Re-wrap the blob's DEK under the KEK's primary version; the data ciphertext is kept byte for byte.

        The blob is verified in full first (the provider opens the wrapped DEK,
        the data's tag is checked) and the cache is bypassed, so a tampered
        blob is never given a fresh header and a disabled version is noticed.
        The plaintext never leaves this method.

        :raises InvalidCiphertext, KeyDisabled, ProviderUnavailable: as :meth:`decrypt`.
        :raises KeyDisabled, KeyNotFound: the KEK may not encrypt any more.
        """
        blob = _as_bytes(blob)
        if blob[: self._prefix_end] != self._prefix:
            raise InvalidCiphertext()
        kek_version, start = _frame(blob, self._prefix_end)
        wrapped = blob[self._prefix_end + _VERSION_AND_WRAPPED_LENGTH.size : start]
        encryption_context = bind_context(encryption_context)
        context = encryption_context.encoded
        dek = self._unwrap(wrapped, kek_version, encryption_context)
        try:
            AESGCM(dek).decrypt(blob[start : start + NONCE_BYTES], blob[start + NONCE_BYTES :], self._prefix + context)
        except InvalidTag:
            raise InvalidCiphertext() from None
        rewrapped = self.provider.encrypt(self.key_id, dek, encryption_context=encryption_context)
        new_wrapped = rewrapped.ciphertext
        if rewrapped.key_id != self.key_id or not 1 <= len(new_wrapped) <= MAX_WRAPPED_DEK_BYTES:
            raise self._unfit_data_key()
        return (
            self._prefix
            + _VERSION_AND_WRAPPED_LENGTH.pack(rewrapped.key_version, len(new_wrapped))
            + new_wrapped
            + blob[start:]
        )

"""Envelope encryption bound to the key inventory: one encryptor per KEK, one shared DEK cache.

Blobs name their KEK by its provider key id; :func:`kek_for_blob` maps that back
to the inventory, so a KEK that is disabled, pending deletion or destroyed
refuses to open blobs even while the provider (or the DEK cache) still could.
The inventory is consulted at most every ``KEK_LOOKUP_TTL`` seconds per KEK and
process; services that switch a KEK or version off call :func:`forget` so this
process stops at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from django.conf import settings

from keyvault.audit import Actor, events
from keyvault.exceptions import KeyNotUsable
from keyvault.kms import InvalidCiphertext, get_provider
from keyvault.kms.cache import DataKeyCache
from keyvault.kms.envelope import EnvelopeEncryptor, read_header
from keyvault.models.core import KeyEncryptionKey, KeyVersion

KEK_LOOKUP_TTL = 5.0

_lock = threading.Lock()
_cache: DataKeyCache | None = None
_by_name: dict[str, tuple[float, _KekView]] = {}
_by_key_id: dict[str, tuple[float, _KekView]] = {}
#: (provider name, provider key id) -> encryptor; rebuilt when the registry hands out another provider.
_encryptors: dict[tuple[str, str], EnvelopeEncryptor] = {}


@dataclass(frozen=True)
class _KekView:
    """What the hot path needs to know about a KEK, without holding an ORM row."""

    pk: int
    name: str
    provider: str
    provider_key_id: str
    state: str
    retired_versions: frozenset[int]


def data_key_cache() -> DataKeyCache:
    """The process-wide DEK cache, configured by ``HMD_DEK_CACHE_*``."""
    global _cache
    with _lock:
        if _cache is None:
            _cache = DataKeyCache(**settings.DEK_CACHE)
        return _cache


def forget(kek: KeyEncryptionKey | None = None) -> None:
    """Drop cached KEK state and DEKs (after a KEK or version is switched off)."""
    with _lock:
        _by_name.clear()
        _by_key_id.clear()
        _encryptors.clear()
        if _cache is not None:
            _cache.clear()


def _view(kek: KeyEncryptionKey) -> _KekView:
    retired = frozenset(
        KeyVersion.objects.filter(kek=kek).exclude(state=KeyVersion.State.ENABLED).values_list("number", flat=True)
    )
    return _KekView(kek.pk, kek.name, kek.provider, kek.provider_key_id, kek.state, retired)


def _lookup(table: dict, key: str, query) -> _KekView:
    now = time.monotonic()
    hit = table.get(key)
    if hit is not None and now - hit[0] < KEK_LOOKUP_TTL:
        return hit[1]
    kek = query()
    if kek is None:
        raise KeyNotUsable(f"no KEK {key!r} in the inventory")
    view = _view(kek)
    table[key] = (now, view)
    return view


def _usable(view: _KekView) -> _KekView:
    if view.state != KeyEncryptionKey.State.ENABLED:
        raise KeyNotUsable(f"KEK {view.name!r} is {view.state.replace('_', ' ')}")
    return view


def encryptor(view: _KekView) -> EnvelopeEncryptor:
    """The KEK's encryptor, built once per process (it finds its provider's fast paths when built)."""
    provider, cache = get_provider(view.provider), data_key_cache()
    found = _encryptors.get((view.provider, view.provider_key_id))
    if found is None or found.provider is not provider or found.cache is not cache:
        found = _encryptors[(view.provider, view.provider_key_id)] = EnvelopeEncryptor(
            provider, view.provider_key_id, cache=cache
        )
    return found


def kek_named(name: str) -> _KekView:
    """The enabled KEK called ``name``, from a short-lived cache."""
    return _usable(_lookup(_by_name, name, lambda: KeyEncryptionKey.objects.filter(name=name).first()))


def kek_for_blob(blob: bytes) -> _KekView:
    """The enabled KEK a blob names.

    :raises InvalidCiphertext: the blob names no KEK we know, or a retired (disabled or destroyed)
        version of one.
    :raises KeyNotUsable: the KEK is disabled or pending deletion.
    """
    header = read_header(blob)
    try:
        view = _lookup(
            _by_key_id, header.kek_id,
            lambda: KeyEncryptionKey.objects.filter(provider_key_id=header.kek_id).order_by("pk").first(),
        )
    except KeyNotUsable:
        raise InvalidCiphertext() from None
    _usable(view)  # the KEK's own state may be said (as AWS KMS does); a version's never
    if header.kek_version in view.retired_versions:
        raise InvalidCiphertext()  # anyone can write a version number: see keyvault/kms/README.md
    return view


def seal(kek_name: str, plaintext: bytes, *, encryption_context: Mapping[str, str] | None = None) -> bytes:
    """Envelope-encrypt under the KEK called ``kek_name`` (not audited: the data path)."""
    return encryptor(kek_named(kek_name)).encrypt(plaintext, encryption_context=encryption_context)


def open_blob(blob: bytes, *, encryption_context: Mapping[str, str] | None = None) -> bytes:
    """Open a blob from :func:`seal` (not audited: the data path)."""
    return encryptor(kek_for_blob(blob)).decrypt(blob, encryption_context=encryption_context)


def rewrap_blob(blob: bytes, *, encryption_context: Mapping[str, str] | None = None) -> bytes:
    """Move a blob's DEK to its KEK's primary version; the data ciphertext is unchanged."""
    return encryptor(kek_for_blob(blob)).rewrap(blob, encryption_context=encryption_context)


def encrypt(kek: KeyEncryptionKey, plaintext: bytes, *, actor: Actor,
            encryption_context: Mapping[str, str] | None = None) -> bytes:
    """Envelope-encrypt for an operator (``kms envelope-encrypt``), audited."""
    blob = seal(kek.name, plaintext, encryption_context=encryption_context)
    events.envelope_encrypted(kek, actor=actor, size=len(plaintext), kek_version=read_header(blob).kek_version,
                              context_keys=sorted(encryption_context or {}))
    return blob


def decrypt(blob: bytes, *, actor: Actor, encryption_context: Mapping[str, str] | None = None) -> bytes:
    """Open an envelope blob for an operator (``kms envelope-decrypt``), audited, failures too."""
    try:
        view = kek_for_blob(blob)
        plaintext = encryptor(view).decrypt(blob, encryption_context=encryption_context)
    except Exception as exc:
        events.envelope_decrypt_failed(actor=actor, error=type(exc).__name__)
        raise
    events.envelope_decrypted(view.name, actor=actor, size=len(plaintext))
    return plaintext


def rewrap(blob: bytes, *, actor: Actor, encryption_context: Mapping[str, str] | None = None) -> bytes:
    """Move a blob's DEK to its KEK's primary version, audited (failures as a failed decrypt)."""
    try:
        view = kek_for_blob(blob)
        moved = encryptor(view).rewrap(blob, encryption_context=encryption_context)
    except Exception as exc:
        events.envelope_decrypt_failed(actor=actor, error=type(exc).__name__)
        raise
    events.envelope_rewrapped(view.name, actor=actor, to_version=read_header(moved).kek_version)
    return moved

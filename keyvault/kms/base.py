"""The provider contract: one ABC every KMS backend implements.

Providers take and return the small frozen dataclasses defined here and never
see ORM objects (Barbican's crypto plugins work the same way). Key material
never leaves a provider except as the plaintext half of a :class:`DataKey`,
which the caller wipes.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from .errors import KMSError, ProviderUnavailable, UnsupportedOperation
from .options import EnvReader, Option, read_options

EncryptionContext = Mapping[str, str]


class KeyState(enum.StrEnum):
    """Lifecycle of a key as a whole (the states AWS KMS documents)."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DELETION = "pending_deletion"
    DESTROYED = "destroyed"


class VersionState(enum.StrEnum):
    """Lifecycle of one key version (the states Cloud KMS documents)."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTROY_SCHEDULED = "destroy_scheduled"
    DESTROYED = "destroyed"


class Capability(enum.StrEnum):
    """Optional behaviours; the contract suite adapts to what a provider declares."""

    #: ``set_key_version_state(..., DISABLED/ENABLED)`` works per version.
    DISABLE_VERSION = "disable_version"
    #: ``set_key_version_state(..., DESTROYED)`` erases a version's material.
    DESTROY_VERSION = "destroy_version"
    #: ``set_key_state`` can disable and re-enable the whole key.
    DISABLE_KEY = "disable_key"
    #: ``rewrap`` happens inside the backend without plaintext crossing the wire.
    NATIVE_REWRAP = "native_rewrap"
    #: ``KeyVersionInfo.encrypt_count`` is tracked by the provider.
    ENCRYPT_COUNT = "encrypt_count"
    #: ``destroy_key`` erases the whole key.
    DESTROY_KEY = "destroy_key"
    #: ``set_primary_version`` can make an older, enabled version primary again (rollback).
    SET_PRIMARY = "set_primary"


@dataclass(frozen=True, slots=True)
class KeyVersionInfo:
    """One version of a key: its number, state, creation time and usage count."""

    version: int
    state: VersionState
    created_at: datetime
    encrypt_count: int | None = None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as the provider sees it, with all its versions (oldest first)."""

    key_id: str
    state: KeyState
    primary_version: int
    versions: tuple[KeyVersionInfo, ...]
    created_at: datetime
    description: str = ""

    def version(self, number: int) -> KeyVersionInfo:
        """Return version ``number``; ``KeyError`` if the key has no such version."""
        for info in self.versions:
            if info.version == number:
                return info
        raise KeyError(number)


@dataclass(frozen=True, slots=True)
class EncryptResult:
    """A ciphertext and the key version that produced it."""

    ciphertext: bytes
    key_id: str
    key_version: int

    def __repr__(self) -> str:
        return f"EncryptResult(key_id={self.key_id!r}, key_version={self.key_version}, ciphertext=<{len(self.ciphertext)} bytes>)"


@dataclass(frozen=True, slots=True)
class DecryptResult:
    """A plaintext and the key version that had produced its ciphertext."""

    plaintext: bytes
    key_id: str
    key_version: int

    def __repr__(self) -> str:
        # Plaintext may be key material: never in a repr, a log line or a traceback.
        return f"DecryptResult(key_id={self.key_id!r}, key_version={self.key_version}, plaintext=<redacted>)"


@dataclass(frozen=True, slots=True)
class DataKey:
    """A fresh data-encryption key: plaintext for immediate use, ciphertext to store.

    ``plaintext`` is a ``bytearray`` so it can be zeroed: call :meth:`wipe`, or use
    the object as a context manager, as soon as the key is no longer needed.
    """

    plaintext: bytearray = field(repr=False)
    ciphertext: bytes
    key_id: str
    key_version: int

    def wipe(self) -> None:
        """Overwrite the plaintext key with zeros, in place."""
        for index in range(len(self.plaintext)):
            self.plaintext[index] = 0

    def __enter__(self) -> DataKey:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id!r}, key_version={self.key_version}, plaintext=<redacted>, ciphertext=<{len(self.ciphertext)} bytes>)"


@dataclass(frozen=True, slots=True)
class RewrapItem:
    """One ciphertext for :meth:`KMSProvider.rewrap_many`, with the context it was sealed under."""

    ciphertext: bytes
    encryption_context: EncryptionContext | None = None

    def __repr__(self) -> str:
        return f"RewrapItem(ciphertext=<{len(self.ciphertext)} bytes>, encryption_context={dict(self.encryption_context or {})!r})"


#: What :meth:`KMSProvider.rewrap_many` returns per item: the new ciphertext, or the
#: error that item alone met (the other items are unaffected).
RewrapOutcome = EncryptResult | KMSError


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """The outcome of :meth:`KMSProvider.health_check`."""

    healthy: bool
    provider: str
    latency_ms: float
    detail: str


KEY_SPECS = {"AES_256": 32, "AES_128": 16}


class KMSProvider(abc.ABC):
    """A key-management backend holding key-encryption keys (KEKs).

    KEKs never leave the backend. Every key has numbered versions; exactly one
    (the primary) encrypts, every enabled version decrypts. Ciphertexts name
    their key and version, so :meth:`decrypt` needs no key id.

    All methods raise only :mod:`keyvault.kms.errors` exceptions.
    """

    #: Registry name, as used in ``HMD_KMS_PROVIDER``.
    name: str = ""
    #: What operators call the backend ("AWS KMS"), in messages; the registry name when empty.
    title: str = ""
    #: Optional behaviours this backend supports (see :class:`Capability`).
    capabilities: frozenset[Capability] = frozenset()
    #: The options :meth:`from_config` takes that come from ``HMD_*`` variables (keyvault/kms/options.py).
    OPTIONS: tuple[Option, ...] = ()
    #: Variables whose presence means this provider is configured (it is listed in ``settings.KMS``).
    CONFIGURED_BY: tuple[str, ...] = ()

    @classmethod
    def options_from_env(cls, env: EnvReader) -> dict:
        """This provider's options from its ``HMD_*`` variables (defaults where unset)."""
        return read_options(cls.OPTIONS, env)

    def supports(self, capability: Capability) -> bool:
        """Return whether this backend supports ``capability``."""
        return capability in self.capabilities

    # -- key lifecycle -------------------------------------------------

    @abc.abstractmethod
    def create_key(self, key_id: str, *, description: str = "") -> KeyInfo:
        """Create a new symmetric KEK with version 1 as its primary.

        :param key_id: the name of the key at this provider.
        :param description: free text stored with the key where the backend can.
        :returns: the new key's :class:`KeyInfo`.
        :raises ConfigurationError: ``key_id`` is not a valid name for this backend,
            or a key with that name exists.
        :raises ProviderUnavailable: the backend could not be reached.
        """

    @abc.abstractmethod
    def describe_key(self, key_id: str) -> KeyInfo:
        """Return the key's state and all its versions.

        :raises KeyNotFound: there is no such key.
        :raises ProviderUnavailable: the backend could not be reached.
        """

    @abc.abstractmethod
    def rotate_key(self, key_id: str) -> KeyVersionInfo:
        """Create a new version and make it primary; older versions still decrypt.

        :returns: the new primary version.
        :raises KeyNotFound: there is no such key.
        :raises KeyDisabled: the key is disabled or pending deletion.
        :raises ProviderUnavailable: the backend could not be reached.
        """

    @abc.abstractmethod
    def set_key_version_state(self, key_id: str, version: int, state: VersionState) -> KeyVersionInfo:
        """Enable, disable or destroy one version.

        The primary version can be disabled only after another is made primary
        (by :meth:`rotate_key`); a destroyed version cannot come back.

        :raises KeyNotFound: no such key or version.
        :raises KeyDisabled: the transition is not allowed (e.g. disabling the primary).
        :raises UnsupportedOperation: the backend cannot do this (see :meth:`supports`).
        """

    def set_key_state(self, key_id: str, state: KeyState) -> KeyInfo:
        """Enable or disable the whole key (all versions at once).

        :raises KeyNotFound: there is no such key.
        :raises UnsupportedOperation: the backend cannot; state is then enforced by
            Keyvault's own inventory only.
        """
        raise UnsupportedOperation(f"{self.name}: key-level enable/disable is not supported")

    def set_primary_version(self, key_id: str, version: int) -> KeyInfo:
        """Make an existing, enabled version the primary again (to roll a rotation back).

        :raises KeyNotFound: no such key or version.
        :raises KeyDisabled: the version is not enabled.
        :raises UnsupportedOperation: the backend always encrypts with its newest version.
        """
        raise UnsupportedOperation(f"{self.name}: the primary version cannot be moved back")

    def destroy_key(self, key_id: str) -> None:
        """Erase the key and every version. Irreversible.

        :raises KeyNotFound: there is no such key.
        :raises UnsupportedOperation: the backend cannot destroy keys.
        """
        raise UnsupportedOperation(f"{self.name}: destroying keys is not supported")

    # -- cryptography --------------------------------------------------

    @abc.abstractmethod
    def encrypt(
        self, key_id: str, plaintext: bytes, *, encryption_context: EncryptionContext | None = None
    ) -> EncryptResult:
        """Encrypt ``plaintext`` under the key's primary version.

        :param encryption_context: non-secret pairs bound to the ciphertext; decrypt
            must present exactly the same pairs (order does not matter).
        :raises KeyNotFound: there is no such key.
        :raises KeyDisabled: the key or its primary version may not encrypt (also
            when the version reached its encryption limit).
        :raises ProviderUnavailable: the backend could not be reached.
        """

    @abc.abstractmethod
    def decrypt(self, ciphertext: bytes, *, encryption_context: EncryptionContext | None = None) -> DecryptResult:
        """Decrypt a ciphertext produced by :meth:`encrypt` of this provider.

        :raises InvalidCiphertext: for every failure to open it (malformed, tampered,
            wrong context, unknown key, a version that is unknown, disabled or destroyed);
            never says which.
        :raises KeyDisabled: the *key* (never one version) is disabled or pending deletion;
            where the backend can, only once the ciphertext authenticates (README:
            "What a failed decrypt reveals").
        :raises ProviderUnavailable: the backend could not be reached.
        """

    @abc.abstractmethod
    def generate_data_key(
        self,
        key_id: str,
        *,
        encryption_context: EncryptionContext | None = None,
        key_spec: str = "AES_256",
    ) -> DataKey:
        """Return a fresh random data key, in plaintext and wrapped by ``key_id``.

        :param key_spec: ``AES_256`` (32 bytes) or ``AES_128`` (16 bytes).
        :raises KeyNotFound, KeyDisabled, ProviderUnavailable: as :meth:`encrypt`.
        :raises ConfigurationError: unknown ``key_spec``.
        """

    def rewrap(
        self,
        ciphertext: bytes,
        *,
        encryption_context: EncryptionContext | None = None,
        key_id: str | None = None,
    ) -> EncryptResult:
        """Re-encrypt under the primary version of ``key_id`` (default: the same key).

        The plaintext never reaches the caller. This default decrypts and
        re-encrypts inside the provider object; backends with a server-side
        re-encrypt override it.

        :raises InvalidCiphertext, KeyDisabled, KeyNotFound, ProviderUnavailable:
            as :meth:`decrypt` and :meth:`encrypt`.
        """
        opened = self.decrypt(ciphertext, encryption_context=encryption_context)
        plaintext = bytearray(opened.plaintext)
        try:
            return self.encrypt(key_id or opened.key_id, bytes(plaintext), encryption_context=encryption_context)
        finally:
            plaintext[:] = bytes(len(plaintext))

    def rewrap_many(
        self,
        items: Sequence[RewrapItem],
        *,
        key_id: str | None = None,
    ) -> list[RewrapOutcome]:
        """Rewrap many ciphertexts; the result is aligned with ``items``.

        Each element is an :class:`EncryptResult` or the :class:`KMSError` that item
        met: one bad ciphertext (malformed, foreign key, wrong context) never spoils
        the batch. Only a :class:`ProviderUnavailable` (the backend is down or
        throttling) is raised for the whole call, since retrying the batch is then
        the right answer. This default loops over :meth:`rewrap`; backends with a
        batch API or a connection pool override it.
        """
        results: list[RewrapOutcome] = []
        for item in items:
            try:
                results.append(self.rewrap(item.ciphertext, encryption_context=item.encryption_context, key_id=key_id))
            except ProviderUnavailable:
                raise
            except KMSError as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    def health_check(self) -> HealthStatus:
        """Report whether the backend is reachable and usable. Never raises."""

    # -- helpers for implementations -----------------------------------

    @staticmethod
    def key_length(key_spec: str) -> int:
        """Return the byte length for ``key_spec``; ``ConfigurationError`` if unknown."""
        from .errors import ConfigurationError

        try:
            return KEY_SPECS[key_spec]
        except KeyError:
            raise ConfigurationError(f"unknown key_spec {key_spec!r}; use one of {sorted(KEY_SPECS)}") from None

    def timed_health(self, probe) -> HealthStatus:
        """Run ``probe()`` (returning a detail string) and wrap it as a :class:`HealthStatus`.

        Any exception becomes an unhealthy status whose detail names the error
        class and message, never a traceback.
        """
        started = time.perf_counter()
        try:
            detail = probe()
            healthy = True
        except Exception as exc:  # health checks report, they never raise
            detail = f"{type(exc).__name__}: {exc}"
            healthy = False
        latency_ms = (time.perf_counter() - started) * 1000
        return HealthStatus(healthy=healthy, provider=self.name, latency_ms=latency_ms, detail=detail)

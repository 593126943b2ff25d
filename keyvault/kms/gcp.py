"""Google Cloud KMS provider (``HMD_KMS_PROVIDER=gcp``), through ``google-cloud-kms``.

Implementation guide
====================

Resources
---------
One provider works inside one key ring::

    projects/{HMD_GCP_PROJECT}/locations/{HMD_GCP_LOCATION}/keyRings/{HMD_GCP_KEY_RING}

and our ``key_id`` is the crypto key id within it (``[a-zA-Z0-9_-]{1,63}``),
so ``key_id`` ``billing`` is ``.../keyRings/R/cryptoKeys/billing`` and its
version 3 is ``.../cryptoKeys/billing/cryptoKeyVersions/3``. Cloud KMS numbers
versions 1, 2, 3 ... per key, which are our version numbers. Keys are created
as ``ENCRYPT_DECRYPT`` / ``GOOGLE_SYMMETRIC_ENCRYPTION`` (AES-256-GCM inside
Google), protection level ``SOFTWARE`` unless the provider is built with
``protection_level="HSM"``, with the label ``managed-by=keyvault``. The key
ring is created on first use (``create_key``) when it does not exist.

Cloud KMS never deletes keys or key rings, so a key id can never be reused, and
a key has no free-text description: ``KeyInfo.description`` is always empty.

Lifecycle mapping
-----------------
* ``rotate_key`` = ``CreateCryptoKeyVersion`` + ``UpdateCryptoKeyPrimaryVersion``
  (for HSM keys it waits while the new version is ``PENDING_GENERATION``);
  ``set_primary_version`` (a rollback) is ``UpdateCryptoKeyPrimaryVersion`` alone.
  Rotating by hand does not move Cloud KMS's own ``next_rotation_time``; leave
  Cloud KMS's automatic rotation off and let Keyvault's scheduler rotate.
* ``set_key_version_state(ENABLED|DISABLED)`` = ``UpdateCryptoKeyVersion`` with
  ``update_mask=state``. The primary version is never disabled or destroyed
  through this provider (rotate first), as the contract requires.
* ``set_key_version_state(DESTROYED)`` (or ``DESTROY_SCHEDULED``) =
  ``DestroyCryptoKeyVersion``: the version becomes ``DESTROY_SCHEDULED`` and
  Cloud KMS erases it after the key's ``destroy_scheduled_duration`` (default
  30 days). Until then :meth:`GCPKMSProvider.restore_key_version`
  (``RestoreCryptoKeyVersion``) brings it back as ``DISABLED``.
* Version states map one to one (ENABLED, DISABLED, DESTROY_SCHEDULED,
  DESTROYED); the transient ``PENDING_*`` states read as DISABLED and the
  failed/external-destruction states as DESTROYED. Cloud KMS has no key-level
  state: ``describe_key`` derives one (enabled while any version is enabled).
  Key-level disable, key destruction and encryption counts are not supported.
* There is no server-side re-encrypt in Cloud KMS (the documented procedure is
  decrypt with the old version, encrypt with the primary), so ``rewrap`` is the
  base class's decrypt + encrypt inside this process.

Ciphertext layout
-----------------
Cloud KMS's symmetric ciphertext is opaque: it does not tell the client which
version made it. Ours must, so we wrap it (integers big-endian)::

    u8  format version (1)
    u8  key id length L (1..63)
    L   key id, ASCII
    u32 key version
    N   Cloud KMS ciphertext

The Cloud KMS ``additional_authenticated_data`` is the header above followed by
``encode_context(encryption_context)``, so changing the key id, the version or
any context pair makes Cloud KMS refuse the ciphertext (``INVALID_ARGUMENT``,
which we report as the opaque ``InvalidCiphertext``). The plaintext sent to
Cloud KMS is one zero byte followed by the caller's plaintext: Cloud KMS
documents ``plaintext`` as required and proto3 cannot tell an empty field from
an unset one, so this is what lets an empty plaintext round-trip.

Which version goes in the header? ``Encrypt`` is called on the *key* (Cloud
KMS picks its primary) with the header of the version we believe is primary;
the response's ``name`` says which version Cloud KMS really used. If that is
another version, the result is discarded and we encrypt again naming that
version explicitly, and check ``name`` again (a mismatch then is a
``KMSError``). So the header always names the version Cloud KMS reports, the
hot path needs no ``GetCryptoKey`` call (and no viewer permission), and a
rotation made elsewhere is noticed on the next encrypt. ``DecryptResponse``
has no ``name`` field in the v1 API, so decrypt cannot re-check the version;
the AAD binding makes the header exactly what our encrypt verified.

Integrity (CRC32C)
------------------
As Google recommends, every request carries ``plaintext_crc32c`` /
``ciphertext_crc32c`` and ``additional_authenticated_data_crc32c``; an encrypt
response is accepted only if both ``verified_*`` flags are true and its
``ciphertext_crc32c`` matches the ciphertext, a decrypt response only if its
``plaintext_crc32c`` matches the plaintext. A failed check discards the response
and retries, :data:`INTEGRITY_ATTEMPTS` times in all, then raises
``ProviderUnavailable``: corrupted data is never returned. CRC32C is computed
here (table-driven; ``google-crc32c`` is not a dependency of google-cloud-kms).

Errors and retries
------------------
Over REST, FAILED_PRECONDITION and INVALID_ARGUMENT are both HTTP 400, so the
canonical ``error.status`` of the response body decides:

=================================================  =======================================
Cloud KMS status                                   Keyvault error
=================================================  =======================================
NOT_FOUND                                          ``KeyNotFound`` (``InvalidCiphertext`` on decrypt)
FAILED_PRECONDITION (version disabled/destroyed)   ``KeyDisabled`` (``InvalidCiphertext`` on decrypt)
INVALID_ARGUMENT                                   ``InvalidCiphertext`` on decrypt, else ``ConfigurationError``
ALREADY_EXISTS                                     ``ConfigurationError`` (``create_key``)
PERMISSION_DENIED, UNAUTHENTICATED                 ``AccessDenied``
UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL,          ``ProviderUnavailable``
RESOURCE_EXHAUSTED, connection errors, timeouts
=================================================  =======================================

Cloud KMS checks a version's state before it authenticates the ciphertext, so
its answer for a disabled or destroyed version would reach tampered ciphertexts
too: decrypt reports it as ``InvalidCiphertext``, like every other failure to
open one (``keyvault/kms/README.md``, "What a failed decrypt reveals").
An answer that is not Cloud KMS JSON (a confused proxy) is ``ProviderUnavailable``.

Idempotent calls (reads, encrypt, decrypt, state changes) are retried on the
transient statuses and connection errors with exponential backoff (0.1 s
doubling to 2 s) until ``HMD_GCP_TIMEOUT`` seconds have passed in total;
creations (key ring, key, version) are not retried, so a lost answer cannot
create two versions.

IAM
---
* Runtime (encrypt, decrypt, data keys, rewrap): ``roles/cloudkms.cryptoKeyEncrypterDecrypter``.
  Grant it on the key ring rather than on single keys: Cloud KMS answers
  PERMISSION_DENIED instead of NOT_FOUND for resources the caller has no
  permission on, and a ciphertext naming an unknown key then reads as
  ``AccessDenied`` rather than ``InvalidCiphertext``.
* ``describe_key`` and the health check: ``roles/cloudkms.viewer``.
* ``create_key``, ``rotate_key``, ``set_primary_version``, version state changes, destroy and restore:
  ``roles/cloudkms.admin`` (creating the key ring too; or create the ring
  beforehand). Split the runtime and admin identities where you can.

Credentials come from Application Default Credentials. With
``HMD_GCP_KMS_ENDPOINT`` the client talks to another endpoint (a regional or
Private Service Connect one, or an emulator); a plain ``http://`` endpoint is
accepted only together with ``HMD_GCP_ANONYMOUS_CREDENTIALS`` so no token ever
crosses the wire in clear. The client always uses the REST transport, in
production as in the tests against the emulator.

Limits
------
Plaintext at most 65,535 bytes per call (Cloud KMS's 64 KiB minus our marker
byte; HSM keys: 8 KiB for plaintext and AAD together), AAD (header + context)
at most 64 KiB. Larger data belongs in envelope encryption with
:meth:`GCPKMSProvider.generate_data_key`. Do not set
``GOOGLE_SDK_PYTHON_LOGGING_SCOPE`` in production: the SDK's debug logging
prints request payloads, which hold plaintext data keys.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from .base import (
    Capability,
    DataKey,
    DecryptResult,
    EncryptionContext,
    EncryptResult,
    HealthStatus,
    KeyInfo,
    KeyState,
    KeyVersionInfo,
    KMSProvider,
    VersionState,
)
from .context import encode_context
from .errors import (
    AccessDenied,
    ConfigurationError,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    KMSError,
    ProviderUnavailable,
    UnsupportedOperation,
)
from .loading import require_sdk
from .options import Option
from .wire import KeyHeader, as_frame

SDK_PACKAGE = "google-cloud-kms"
PLAINTEXT_MARKER = b"\x00"
MAX_PLAINTEXT = 64 * 1024 - len(PLAINTEXT_MARKER)
MAX_AAD = 64 * 1024
INTEGRITY_ATTEMPTS = 3
DEFAULT_TIMEOUT = 10.0
LIST_PAGE_SIZE = 1000
KEY_LABELS = {"managed-by": "keyvault"}

_RESOURCE_ID = re.compile(r"^[a-zA-Z0-9_-]{1,63}$")
#: The ciphertext header (keyvault/kms/wire.py): an ASCII crypto key id, a version from 1, then
#: Cloud KMS's ciphertext, which may not be empty.
HEADER = KeyHeader(encoding="ascii", key_id_pattern=_RESOURCE_ID, min_version=1, min_trailer=1)
_LOCATION = re.compile(r"^[a-z0-9-]{1,63}$")
_PROJECT = re.compile(r"^[a-z0-9.:-]{1,100}$")
_EPOCH = datetime.fromtimestamp(0, UTC)

_VERSION_STATES = {
    "ENABLED": VersionState.ENABLED,
    "DISABLED": VersionState.DISABLED,
    "DESTROY_SCHEDULED": VersionState.DESTROY_SCHEDULED,
    "DESTROYED": VersionState.DESTROYED,
    # Not usable yet: reads as disabled.
    "PENDING_GENERATION": VersionState.DISABLED,
    "PENDING_IMPORT": VersionState.DISABLED,
    # Never usable again: reads as destroyed.
    "IMPORT_FAILED": VersionState.DESTROYED,
    "GENERATION_FAILED": VersionState.DESTROYED,
    "PENDING_EXTERNAL_DESTRUCTION": VersionState.DESTROYED,
    "EXTERNAL_DESTRUCTION_FAILED": VersionState.DESTROYED,
}

_STATUS_ERRORS: dict[str, type[KMSError]] = {
    "NOT_FOUND": KeyNotFound,
    "FAILED_PRECONDITION": KeyDisabled,
    "INVALID_ARGUMENT": ConfigurationError,
    "OUT_OF_RANGE": ConfigurationError,
    "ALREADY_EXISTS": ConfigurationError,
    "PERMISSION_DENIED": AccessDenied,
    "UNAUTHENTICATED": AccessDenied,
    "UNIMPLEMENTED": UnsupportedOperation,
    "UNAVAILABLE": ProviderUnavailable,
    "DEADLINE_EXCEEDED": ProviderUnavailable,
    "INTERNAL": ProviderUnavailable,
    "RESOURCE_EXHAUSTED": ProviderUnavailable,
    "ABORTED": ProviderUnavailable,
}
# FAILED_PRECONDITION on decrypt is a version's state (a key has none), checked before the ciphertext is
# authenticated: opaque, like every other failure to open one.
_DECRYPT_ERRORS: dict[str, type[KMSError]] = {"NOT_FOUND": InvalidCiphertext, "INVALID_ARGUMENT": InvalidCiphertext,
                                              "FAILED_PRECONDITION": InvalidCiphertext}
# Canonical status for an HTTP answer whose body does not name one.
_HTTP_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class _AlreadyExists(KMSError):
    """Internal: the resource being created exists (never leaves this module)."""


# -- CRC32C ----------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for index in range(256):
        crc = index
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Return the CRC-32C (Castagnoli) of ``data``, as Cloud KMS's ``*_crc32c`` fields hold it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- SDK -------------------------------------------------------------------


#: google-cloud-kms and what it brings, imported when a provider is built.
SDK_MODULES = {
    "kms": "google.cloud.kms_v1",
    "exceptions": "google.api_core.exceptions",
    "retry": "google.api_core.retry",
    "auth_exceptions": "google.auth.exceptions",
    "credentials": "google.auth.credentials",
    "requests_exceptions": "requests.exceptions",
    "json_format": "google.protobuf.json_format",
}


def _as_datetime(value: object) -> datetime:
    """Turn the SDK's timestamp (a datetime subclass, or None when unset) into a plain UTC datetime."""
    if not isinstance(value, datetime):
        return _EPOCH
    return datetime.fromtimestamp(value.timestamp(), UTC)


class GCPKMSProvider(KMSProvider):
    """KEKs held by Google Cloud KMS, one crypto key per ``key_id`` in one key ring."""

    name = "gcp"
    OPTIONS = (
        Option("project", "HMD_GCP_PROJECT", ""),
        Option("location", "HMD_GCP_LOCATION", "global"),
        Option("key_ring", "HMD_GCP_KEY_RING", ""),
        Option("endpoint", "HMD_GCP_KMS_ENDPOINT", ""),
        Option("anonymous_credentials", "HMD_GCP_ANONYMOUS_CREDENTIALS", False, "bool"),
        Option("timeout", "HMD_GCP_TIMEOUT", DEFAULT_TIMEOUT, "float"),
    )
    CONFIGURED_BY = ("HMD_GCP_PROJECT",)
    capabilities = frozenset({Capability.DISABLE_VERSION, Capability.DESTROY_VERSION, Capability.SET_PRIMARY})

    def __init__(
        self,
        *,
        project: str,
        key_ring: str,
        location: str = "global",
        endpoint: str = "",
        anonymous_credentials: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        protection_level: str = "SOFTWARE",
        credentials: object | None = None,
    ) -> None:
        """Build a client for ``projects/{project}/locations/{location}/keyRings/{key_ring}``.

        :param endpoint: ``host[:port]`` or URL of another Cloud KMS endpoint (an
            emulator needs ``http://`` and ``anonymous_credentials``).
        :param timeout: seconds for each call, retries included.
        :param credentials: explicit ``google.auth`` credentials; by default
            Application Default Credentials.
        :raises ConfigurationError: bad settings, the SDK is missing, or no
            credentials can be found.
        """
        if not project or not _PROJECT.match(project):
            raise ConfigurationError("set HMD_GCP_PROJECT to the Google Cloud project id holding the key ring")
        if not key_ring or not _RESOURCE_ID.match(key_ring):
            raise ConfigurationError("set HMD_GCP_KEY_RING to a key ring id of 1-63 letters, digits, _ and -")
        if not location or not _LOCATION.match(location):
            raise ConfigurationError(
                f"HMD_GCP_LOCATION {location!r} is not a Cloud KMS location (e.g. global, europe-west1)"
            )
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigurationError("HMD_GCP_TIMEOUT must be a positive number of seconds")
        if protection_level not in ("SOFTWARE", "HSM"):
            raise ConfigurationError("protection_level must be SOFTWARE or HSM")
        if endpoint.startswith("http://") and not (anonymous_credentials or credentials is not None):
            raise ConfigurationError(
                "a plain-http HMD_GCP_KMS_ENDPOINT is only for emulators: set HMD_GCP_ANONYMOUS_CREDENTIALS too"
            )
        self.project = project
        self.location = location
        self.key_ring = key_ring
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.protection_level = protection_level
        self.location_name = f"projects/{project}/locations/{location}"
        self.key_ring_name = f"{self.location_name}/keyRings/{key_ring}"

        sdk = require_sdk(SDK_MODULES, package=SDK_PACKAGE, user="the gcp KMS provider")
        self._sdk = sdk
        if credentials is None and anonymous_credentials:
            credentials = sdk.credentials.AnonymousCredentials()
        try:
            self._client = sdk.kms.KeyManagementServiceClient(
                transport="rest",
                client_options={"api_endpoint": endpoint} if endpoint else None,
                credentials=credentials,
            )
        except sdk.auth_exceptions.DefaultCredentialsError as exc:
            raise ConfigurationError(
                f"no Google credentials for Cloud KMS (Application Default Credentials): {exc}"
            ) from None
        self._retry = sdk.retry.Retry(
            predicate=self._is_transient, initial=0.1, maximum=2.0, multiplier=2.0, timeout=self.timeout
        )
        self._transient = (
            sdk.exceptions.ServiceUnavailable,
            sdk.exceptions.GatewayTimeout,
            sdk.exceptions.DeadlineExceeded,
            sdk.exceptions.InternalServerError,
            sdk.exceptions.TooManyRequests,
            sdk.exceptions.BadGateway,
            sdk.requests_exceptions.ConnectionError,
            sdk.requests_exceptions.Timeout,
            sdk.auth_exceptions.TransportError,
        )
        self._lock = threading.Lock()
        self._primary_hint: dict[str, int] = {}
        self._key_ring_ready = False

    @classmethod
    def from_config(cls, options: dict) -> GCPKMSProvider:
        """Build from the ``gcp`` entry of the provider settings (``HMD_GCP_*``)."""
        try:
            timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        except (TypeError, ValueError):
            raise ConfigurationError("HMD_GCP_TIMEOUT must be a number of seconds") from None
        return cls(
            project=options.get("project", ""),
            location=options.get("location") or "global",
            key_ring=options.get("key_ring", ""),
            endpoint=options.get("endpoint", ""),
            anonymous_credentials=bool(options.get("anonymous_credentials", False)),
            timeout=timeout,
            protection_level=options.get("protection_level", "SOFTWARE"),
        )

    def __repr__(self) -> str:
        return f"GCPKMSProvider(key_ring={self.key_ring_name!r}, endpoint={self.endpoint or 'default'!r})"

    # -- names ---------------------------------------------------------

    def _key_name(self, key_id: str) -> str:
        return f"{self.key_ring_name}/cryptoKeys/{key_id}"

    def _version_name(self, key_id: str, version: int) -> str:
        return f"{self._key_name(key_id)}/cryptoKeyVersions/{version}"

    def _version_number(self, key_id: str, version_name: str) -> int | None:
        """Return N if ``version_name`` is version N of ``key_id``, else ``None``."""
        prefix = self._key_name(key_id) + "/cryptoKeyVersions/"
        number = version_name[len(prefix) :] if version_name.startswith(prefix) else ""
        return int(number) if number.isdigit() and not number.startswith("0") else None

    @staticmethod
    def _require_key_id(key_id: object) -> str:
        if not isinstance(key_id, str) or not _RESOURCE_ID.match(key_id):
            raise KeyNotFound(f"{key_id!r} is not a Cloud KMS key id (1-63 letters, digits, _ and -)")
        return key_id

    @staticmethod
    def _require_version(version: object) -> int:
        if type(version) is not int or version < 1:
            raise KeyNotFound(f"{version!r} is not a key version number")
        return version

    # -- calling Cloud KMS ---------------------------------------------

    def _is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, self._transient)

    def _status_of(self, exc: BaseException) -> str:
        """The canonical status of a Google API error (the REST body names it; HTTP 400 is ambiguous)."""
        response = getattr(exc, "response", None)
        if response is not None:
            try:
                status = response.json()["error"]["status"]
            except Exception:  # not JSON, or not Google's error shape: fall back to the code
                status = None
            if isinstance(status, str) and status:
                return status
        grpc_code = getattr(exc, "grpc_status_code", None)
        if grpc_code is not None and getattr(grpc_code, "name", None):
            return grpc_code.name
        return _HTTP_STATUSES.get(getattr(exc, "code", None), "UNKNOWN")

    def _translate(self, rpc: str, exc: BaseException, overrides: dict[str, type[KMSError]]) -> KMSError | None:
        """Map an SDK/transport exception to ours; ``None`` if it is not one we know."""
        sdk = self._sdk
        if isinstance(exc, sdk.exceptions.RetryError):
            return ProviderUnavailable(f"Cloud KMS {rpc}: no answer within {self.timeout:g}s ({exc.cause or exc})")
        if isinstance(exc, sdk.exceptions.GoogleAPICallError):
            status = self._status_of(exc)
            error = overrides.get(status) or _STATUS_ERRORS.get(status, KMSError)
            if error is InvalidCiphertext:
                return InvalidCiphertext()
            return error(f"Cloud KMS {rpc}: {status}: {exc.message}")
        if isinstance(exc, (sdk.auth_exceptions.RefreshError, sdk.auth_exceptions.InvalidOperation)):
            # The server answered 401 and the credentials could not be refreshed.
            return AccessDenied(f"Cloud KMS {rpc}: UNAUTHENTICATED: credentials were refused ({exc})")
        if isinstance(exc, sdk.json_format.ParseError):
            return ProviderUnavailable(f"Cloud KMS {rpc}: the answer was not a readable Cloud KMS response")
        if isinstance(exc, sdk.auth_exceptions.DefaultCredentialsError):
            return ConfigurationError(f"Cloud KMS {rpc}: no usable Google credentials: {exc}")
        if isinstance(exc, (sdk.requests_exceptions.RequestException, sdk.auth_exceptions.TransportError)):
            where = self.endpoint or "cloudkms.googleapis.com"
            return ProviderUnavailable(f"Cloud KMS {rpc}: cannot reach {where}: {type(exc).__name__}")
        return None

    @contextmanager
    def _errors(self, rpc: str, overrides: dict[str, type[KMSError]] | None = None) -> Iterator[None]:
        try:
            yield
        except KMSError:
            raise
        except Exception as exc:
            translated = self._translate(rpc, exc, overrides or {})
            if translated is None:
                raise
            raise translated from None

    def _call(self, rpc: str, request: dict, *, retry: bool = True, overrides: dict | None = None):
        """Call ``client.<rpc>(request)`` with our timeout (and retry), errors translated."""
        method: Callable = getattr(self._client, rpc)
        with self._errors(rpc, overrides):
            return method(request=request, retry=self._retry if retry else None, timeout=self.timeout)

    # -- conversions -----------------------------------------------------

    def _version_info(self, key_id: str, version) -> KeyVersionInfo:
        number = self._version_number(key_id, version.name)
        if number is None:
            raise KMSError(f"Cloud KMS answered with {version.name!r}, not a version of {key_id!r}")
        return KeyVersionInfo(
            version=number,
            state=_VERSION_STATES.get(version.state.name, VersionState.DISABLED),
            created_at=_as_datetime(version.create_time),
            encrypt_count=None,
        )

    @staticmethod
    def _key_state(versions: tuple[KeyVersionInfo, ...]) -> KeyState:
        states = {info.state for info in versions}
        if VersionState.ENABLED in states:
            return KeyState.ENABLED
        if VersionState.DISABLED in states or not states:
            return KeyState.DISABLED
        if VersionState.DESTROY_SCHEDULED in states:
            return KeyState.PENDING_DELETION
        return KeyState.DESTROYED

    def _key_info(self, key_id: str, key, versions: tuple[KeyVersionInfo, ...]) -> KeyInfo:
        primary = self._version_number(key_id, key.primary.name) if key.primary and key.primary.name else None
        return KeyInfo(
            key_id=key_id,
            state=self._key_state(versions),
            primary_version=primary or 0,
            versions=tuple(sorted(versions, key=lambda info: info.version)),
            created_at=_as_datetime(key.create_time),
            description="",
        )

    # -- key lifecycle -------------------------------------------------

    def _create_key_ring(self) -> None:
        try:
            self._call(
                "create_key_ring",
                {"parent": self.location_name, "key_ring_id": self.key_ring, "key_ring": {}},
                retry=False,
                overrides={"ALREADY_EXISTS": _AlreadyExists},
            )
        except _AlreadyExists:
            pass  # another process created it meanwhile
        self._key_ring_ready = True

    def create_key(self, key_id: str, *, description: str = "") -> KeyInfo:
        if not isinstance(key_id, str) or not _RESOURCE_ID.match(key_id):
            raise ConfigurationError(f"invalid Cloud KMS key id {key_id!r}: 1-63 letters, digits, _ and -")
        kms = self._sdk.kms
        request = {
            "parent": self.key_ring_name,
            "crypto_key_id": key_id,
            "crypto_key": {
                "purpose": kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
                "version_template": {
                    "algorithm": kms.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
                    "protection_level": kms.ProtectionLevel[self.protection_level],
                },
                "labels": dict(KEY_LABELS),
            },
        }
        overrides = {"ALREADY_EXISTS": ConfigurationError}
        try:
            key = self._call("create_crypto_key", request, retry=False, overrides=overrides)
        except KeyNotFound:
            if self._key_ring_ready:
                raise
            self._create_key_ring()  # first use of this key ring
            key = self._call("create_crypto_key", request, retry=False, overrides=overrides)
        self._key_ring_ready = True
        versions = (self._version_info(key_id, key.primary),) if key.primary and key.primary.name else ()
        info = self._key_info(key_id, key, versions)
        if info.primary_version:
            self._set_primary_hint(key_id, info.primary_version)
        return info

    def describe_key(self, key_id: str) -> KeyInfo:
        self._require_key_id(key_id)
        key = self._call("get_crypto_key", {"name": self._key_name(key_id)})
        with self._errors("list_crypto_key_versions"):
            request = {"parent": self._key_name(key_id), "page_size": LIST_PAGE_SIZE}
            pager = self._call("list_crypto_key_versions", request)
            versions = tuple(self._version_info(key_id, version) for version in pager)
        return self._key_info(key_id, key, versions)

    def rotate_key(self, key_id: str) -> KeyVersionInfo:
        self._require_key_id(key_id)
        key_name = self._key_name(key_id)
        created = self._call("create_crypto_key_version", {"parent": key_name, "crypto_key_version": {}}, retry=False)
        created = self._wait_until_generated(created)
        info = self._version_info(key_id, created)
        self._call("update_crypto_key_primary_version", {"name": key_name, "crypto_key_version_id": str(info.version)})
        self._set_primary_hint(key_id, info.version)
        return info

    def set_primary_version(self, key_id: str, version: int) -> KeyInfo:
        """Make an existing, enabled version primary again (``UpdateCryptoKeyPrimaryVersion``).

        :raises KeyNotFound: no such key or version.
        :raises KeyDisabled: the version is not enabled.
        """
        self._require_key_id(key_id)
        self._require_version(version)
        request = {"name": self._key_name(key_id), "crypto_key_version_id": str(version)}
        self._call("update_crypto_key_primary_version", request)
        self._set_primary_hint(key_id, version)
        return self.describe_key(key_id)

    def _wait_until_generated(self, version):
        """HSM versions start PENDING_GENERATION; wait (within the timeout) until they are usable."""
        pending = self._sdk.kms.CryptoKeyVersion.CryptoKeyVersionState.PENDING_GENERATION
        deadline = time.monotonic() + self.timeout
        while version.state == pending:
            if time.monotonic() > deadline:
                raise ProviderUnavailable(f"Cloud KMS is still generating {version.name}; retry the rotation later")
            time.sleep(0.2)
            version = self._call("get_crypto_key_version", {"name": version.name})
        return version

    def set_key_version_state(self, key_id: str, version: int, state: VersionState) -> KeyVersionInfo:
        state = VersionState(state)
        self._require_key_id(key_id)
        self._require_version(version)
        if state is not VersionState.ENABLED:
            key = self._call("get_crypto_key", {"name": self._key_name(key_id)})
            if key.primary and self._version_number(key_id, key.primary.name) == version:
                raise KeyDisabled(f"version {version} of {key_id!r} is primary; rotate before retiring it")
        name = self._version_name(key_id, version)
        if state in (VersionState.ENABLED, VersionState.DISABLED):
            states = self._sdk.kms.CryptoKeyVersion.CryptoKeyVersionState
            request = {
                "crypto_key_version": {"name": name, "state": states[state.name]},
                "update_mask": {"paths": ["state"]},
            }
            result = self._call("update_crypto_key_version", request)
        else:
            result = self._call("destroy_crypto_key_version", {"name": name})
        return self._version_info(key_id, result)

    def restore_key_version(self, key_id: str, version: int) -> KeyVersionInfo:
        """Cancel the scheduled destruction of a version; it comes back DISABLED.

        :raises KeyNotFound: no such key or version.
        :raises KeyDisabled: the version is not scheduled for destruction (or already destroyed).
        """
        self._require_key_id(key_id)
        self._require_version(version)
        result = self._call("restore_crypto_key_version", {"name": self._version_name(key_id, version)})
        return self._version_info(key_id, result)

    # -- cryptography --------------------------------------------------

    def _set_primary_hint(self, key_id: str, version: int) -> None:
        with self._lock:
            self._primary_hint[key_id] = version

    def _encrypt_once(self, target: str, plaintext: bytes, aad: bytes):
        """One verified Encrypt call on ``target`` (a key or a version name)."""
        request = {
            "name": target,
            "plaintext": plaintext,
            "additional_authenticated_data": aad,
            "plaintext_crc32c": crc32c(plaintext),
            "additional_authenticated_data_crc32c": crc32c(aad),
        }
        for _ in range(INTEGRITY_ATTEMPTS):
            response = self._call("encrypt", request)
            if (
                response.verified_plaintext_crc32c
                and response.verified_additional_authenticated_data_crc32c
                and response.ciphertext_crc32c == crc32c(response.ciphertext)
            ):
                return response
        raise ProviderUnavailable(
            f"Cloud KMS encrypt: the response failed its CRC32C integrity checks {INTEGRITY_ATTEMPTS} times; discarded"
        )

    def encrypt(
        self, key_id: str, plaintext: bytes, *, encryption_context: EncryptionContext | None = None
    ) -> EncryptResult:
        self._require_key_id(key_id)
        if not isinstance(plaintext, (bytes, bytearray, memoryview)):
            raise TypeError("plaintext must be bytes")
        if len(plaintext) > MAX_PLAINTEXT:
            raise UnsupportedOperation(
                f"Cloud KMS encrypts at most {MAX_PLAINTEXT} bytes per call; use generate_data_key for larger data"
            )
        context = encode_context(encryption_context)
        inner = PLAINTEXT_MARKER + bytes(plaintext)
        with self._lock:
            believed = self._primary_hint.get(key_id, 1)

        # Ask for the key's primary; the header names the version we believe it is.
        header = HEADER.pack(key_id, believed)
        response = self._encrypt_once(self._key_name(key_id), inner, self._aad(header, context))
        used = self._version_number(key_id, response.name)
        if used is None:
            raise KMSError(f"Cloud KMS encrypted with {response.name!r}, not a version of {key_id!r}")
        if used != believed:
            # The primary moved (rotated elsewhere): redo it naming that version, so the header is true.
            self._set_primary_hint(key_id, used)
            header = HEADER.pack(key_id, used)
            target = self._version_name(key_id, used)
            response = self._encrypt_once(target, inner, self._aad(header, context))
            if response.name != target:
                raise KMSError(f"Cloud KMS encrypted with {response.name!r} although {target!r} was named; discarded")
        return EncryptResult(ciphertext=header + response.ciphertext, key_id=key_id, key_version=used)

    @staticmethod
    def _aad(header: bytes, context: bytes) -> bytes:
        aad = header + context
        if len(aad) > MAX_AAD:
            raise ValueError(f"the encryption context is too large for Cloud KMS's {MAX_AAD}-byte AAD limit")
        return aad

    def decrypt(self, ciphertext: bytes, *, encryption_context: EncryptionContext | None = None) -> DecryptResult:
        ciphertext = as_frame(ciphertext)
        key_id, version, header_end = HEADER.read(ciphertext)
        aad = ciphertext[:header_end] + encode_context(encryption_context)
        if len(aad) > MAX_AAD:
            raise InvalidCiphertext()
        wrapped = ciphertext[header_end:]
        request = {
            "name": self._key_name(key_id),
            "ciphertext": wrapped,
            "additional_authenticated_data": aad,
            "ciphertext_crc32c": crc32c(wrapped),
            "additional_authenticated_data_crc32c": crc32c(aad),
        }
        for _ in range(INTEGRITY_ATTEMPTS):
            response = self._call("decrypt", request, overrides=_DECRYPT_ERRORS)
            if response.plaintext_crc32c is not None and response.plaintext_crc32c == crc32c(response.plaintext):
                break
        else:
            raise ProviderUnavailable(
                f"Cloud KMS decrypt: the response failed its CRC32C integrity check {INTEGRITY_ATTEMPTS} times; "
                "discarded"
            )
        inner = response.plaintext
        if inner[:1] != PLAINTEXT_MARKER:
            raise InvalidCiphertext()
        return DecryptResult(plaintext=inner[1:], key_id=key_id, key_version=version)

    def generate_data_key(
        self,
        key_id: str,
        *,
        encryption_context: EncryptionContext | None = None,
        key_spec: str = "AES_256",
    ) -> DataKey:
        plaintext = bytearray(os.urandom(self.key_length(key_spec)))
        try:
            wrapped = self.encrypt(key_id, plaintext, encryption_context=encryption_context)
        except BaseException:
            plaintext[:] = bytes(len(plaintext))
            raise
        return DataKey(
            plaintext=plaintext, ciphertext=wrapped.ciphertext, key_id=key_id, key_version=wrapped.key_version
        )

    def health_check(self) -> HealthStatus:
        def probe() -> str:
            try:
                self._call("get_key_ring", {"name": self.key_ring_name})
            except KeyNotFound:
                return f"Cloud KMS reachable; key ring {self.key_ring_name} is not created yet (first key creates it)"
            return f"Cloud KMS key ring {self.key_ring_name} reachable"

        return self.timed_health(probe)

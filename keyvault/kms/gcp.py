"""Google Cloud KMS provider (``HMD_KMS_PROVIDER=gcp``), through ``google-cloud-kms``.

* One provider works in one key ring
  (``projects/{project}/locations/{location}/keyRings/{key_ring}``); a ``key_id``
  is a crypto key id there (``[a-zA-Z0-9_-]{1,63}``) and Cloud KMS's version
  numbers are ours. Keys cannot be deleted, so a key id is never reused.
* Cloud KMS ciphertexts do not name their version, so each is prefixed with the
  key header of :mod:`keyvault.kms.wire` (:data:`HEADER`: ASCII key id, version
  from 1); the header ‖ the canonical context is the Cloud KMS AAD. The sealed
  plaintext is a zero byte ‖ the caller's plaintext, so empty plaintexts work.
* ``encrypt`` names the version Cloud KMS reports it used (re-encrypting once
  when the primary moved elsewhere); every request and response is checked
  with CRC32C and a failed check is retried, then :class:`ProviderUnavailable`.
* Decrypt failures, a disabled or destroyed version included, are the opaque
  :class:`InvalidCiphertext`.

Operator's guide (lifecycle mapping, error table, retries, IAM roles, limits):
``docs/ops/kms-providers.md``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    RewrapItem,
    RewrapOutcome,
    VersionState,
)
from .bulk import DEFAULT_CONCURRENCY, concurrency_option, map_bounded
from .context import encode_context
from .errors import (
    AccessDenied,
    ConfigurationError,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
    KMSError,
    ProviderUnavailable,
    Throttled,
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
    "RESOURCE_EXHAUSTED": Throttled,
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


def _retry_after(exc: BaseException) -> float | None:
    """The delay a RESOURCE_EXHAUSTED answer asks for: its ``google.rpc.RetryInfo``, else ``Retry-After``."""
    response = getattr(exc, "response", None)
    try:
        details = response.json()["error"].get("details") or []
    except Exception:  # no JSON body, or not Google's error shape
        details = []
    for detail in details:
        if isinstance(detail, Mapping) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = str(detail.get("retryDelay") or "")
            try:
                return max(float(delay.removesuffix("s")), 0.0)
            except ValueError:
                break
    headers = getattr(response, "headers", None) or {}
    try:
        return max(float(headers.get("Retry-After") or ""), 0.0)
    except ValueError:
        return None


def _as_datetime(value: object) -> datetime:
    """Turn the SDK's timestamp (a datetime subclass, or None when unset) into a plain UTC datetime."""
    if not isinstance(value, datetime):
        return _EPOCH
    return datetime.fromtimestamp(value.timestamp(), UTC)


class GCPKMSProvider(KMSProvider):
    """KEKs held by Google Cloud KMS, one crypto key per ``key_id`` in one key ring."""

    name = "gcp"
    title = "Cloud KMS"
    OPTIONS = (
        Option("project", "HMD_GCP_PROJECT", ""),
        Option("location", "HMD_GCP_LOCATION", "global"),
        Option("key_ring", "HMD_GCP_KEY_RING", ""),
        Option("endpoint", "HMD_GCP_KMS_ENDPOINT", ""),
        Option("anonymous_credentials", "HMD_GCP_ANONYMOUS_CREDENTIALS", False, "bool"),
        Option("timeout", "HMD_GCP_TIMEOUT", DEFAULT_TIMEOUT, "float"),
        # Items rewrap_many keeps in flight (each a Decrypt then an Encrypt, both in the crypto request quota).
        Option("concurrency", "HMD_GCP_KMS_CONCURRENCY", DEFAULT_CONCURRENCY, "int"),
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
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        """Build a client for ``projects/{project}/locations/{location}/keyRings/{key_ring}``.

        :param endpoint: ``host[:port]`` or URL of another Cloud KMS endpoint (an
            emulator needs ``http://`` and ``anonymous_credentials``).
        :param timeout: seconds for each call, retries included.
        :param concurrency: items :meth:`rewrap_many` keeps in flight.
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
        self.concurrency = concurrency_option("HMD_GCP_KMS_CONCURRENCY", concurrency)
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
        self._size_connection_pool()
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
            concurrency=options.get("concurrency", DEFAULT_CONCURRENCY),
        )

    def _size_connection_pool(self) -> None:
        """Keep a pooled connection per request in flight (requests keeps 10 per host by default).

        The REST transport is one ``AuthorizedSession`` (requests), which Google's
        requests-based clients document as safe to share between threads.
        """
        session = getattr(getattr(self._client, "_transport", None), "_session", None)
        if session is None or self.concurrency <= 10:
            return
        from requests.adapters import HTTPAdapter

        for prefix in ("https://", "http://"):
            session.mount(prefix, HTTPAdapter(pool_connections=10, pool_maxsize=self.concurrency))

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
            if isinstance(exc.cause, sdk.exceptions.TooManyRequests):
                # Still throttled when the retries ran out of time.
                return Throttled(
                    f"Cloud KMS {rpc}: RESOURCE_EXHAUSTED for {self.timeout:g}s of retries: {exc.cause.message}",
                    retry_after=_retry_after(exc.cause),
                )
            return ProviderUnavailable(f"Cloud KMS {rpc}: no answer within {self.timeout:g}s ({exc.cause or exc})")
        if isinstance(exc, sdk.exceptions.GoogleAPICallError):
            status = self._status_of(exc)
            error = overrides.get(status) or _STATUS_ERRORS.get(status, KMSError)
            if error is InvalidCiphertext:
                return InvalidCiphertext()
            if error is Throttled:
                return Throttled(f"Cloud KMS {rpc}: {status}: {exc.message}", retry_after=_retry_after(exc))
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

    def rewrap_many(self, items: Sequence[RewrapItem], *, key_id: str | None = None) -> list[RewrapOutcome]:
        """Decrypt and re-encrypt each item (Cloud KMS has no server-side rewrap), ``concurrency`` in flight.

        :raises ProviderUnavailable: Cloud KMS is unreachable, or :class:`Throttled` once a
            RESOURCE_EXHAUSTED answer outlasts the retries; retry the batch later.
        """
        return map_bounded(
            lambda item: self.rewrap(item.ciphertext, encryption_context=item.encryption_context, key_id=key_id),
            items,
            concurrency=self.concurrency,
        )

    def health_check(self) -> HealthStatus:
        def probe() -> str:
            try:
                self._call("get_key_ring", {"name": self.key_ring_name})
            except KeyNotFound:
                return f"Cloud KMS reachable; key ring {self.key_ring_name} is not created yet (first key creates it)"
            return f"Cloud KMS key ring {self.key_ring_name} reachable"

        return self.timed_health(probe)

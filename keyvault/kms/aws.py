"""AWS KMS provider: symmetric KMS keys through boto3 (botocore), with a small Keyvault header.

* A ``key_id`` is a Keyvault name (resolved as ``alias/<name>``; ``create_key``
  creates the key and that alias), an alias, a key id or a key ARN; results
  report it exactly as the caller gave it.
* AWS ciphertexts do not say which backing-key version sealed them, so each is
  wrapped in a header (:class:`_Header`: format, payload kind, reference, key ARN,
  version; layout in ``keyvault/kms/README.md``) whose every field is also sent
  as encryption context under the reserved ``kv:`` keys, so AWS authenticates it.
  Callers may not use context keys starting with ``kv:``.
* Version *n* is 1 + the rotations ``ListKeyRotations`` lists; the version a
  ciphertext records is a lower bound of the material used, never higher.
* AWS cannot disable or destroy one version, so ``DISABLE_VERSION``,
  ``DESTROY_VERSION`` and ``SET_PRIMARY`` are not declared; key state is checked
  before every cryptographic call from a per-key cache of ``state_ttl`` seconds.
* Opening a ciphertext fails as the opaque :class:`InvalidCiphertext`, except
  :class:`ProviderUnavailable`, :class:`KeyDisabled` (the key) and an IAM denial.

Operator's guide (what maps to which AWS call, errors, IAM and key policies,
limits): ``docs/ops/kms-providers.md``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from .context import normalise_context
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
from . import wire
from .loading import require_sdk
from .options import Option
from .wire import FORMAT_VERSION

PAYLOAD_RAW = 0
PAYLOAD_EMPTY = 1
#: Sealed instead of an empty plaintext, which AWS refuses.
EMPTY_FILLER = b"\x00"
#: Encryption-context keys Keyvault reserves for the wrapper header.
CONTEXT_PREFIX = "kv:"
MAX_PLAINTEXT_BYTES = 4096
#: The tag every key Keyvault creates carries (value: the KEK's name). IAM policies condition
#: key management on it (``aws:ResourceTag/keyvault:name``, docs/ops/secrets.md).
NAME_TAG = "keyvault:name"
MIN_PENDING_DAYS, MAX_PENDING_DAYS, DEFAULT_PENDING_DAYS = 7, 30, 30
MIN_ROTATION_DAYS, MAX_ROTATION_DAYS, DEFAULT_ROTATION_DAYS = 90, 2560, 365
DEFAULT_STATE_TTL = 10.0
DEFAULT_ROTATION_WAIT = 30.0
#: Cached key descriptions kept at most; the cache is emptied when it would grow past this.
MAX_CACHED_KEYS = 1024

_MAX_REFERENCE = 2048  # AWS's longest KeyId (an ARN)
_KEY_UUID = re.compile(
    r"^(mrk-[0-9a-f]{32}|(mrk-)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$", re.IGNORECASE
)
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9/_-]{0,249}$")
_POLICY_DENIAL = "not authorized to perform"

_KEY_STATES = {
    "Enabled": KeyState.ENABLED,
    "Disabled": KeyState.DISABLED,
    "PendingDeletion": KeyState.PENDING_DELETION,
    "PendingReplicaDeletion": KeyState.PENDING_DELETION,
}
_VERSION_STATES = {
    KeyState.ENABLED: VersionState.ENABLED,
    KeyState.DISABLED: VersionState.DISABLED,
    KeyState.PENDING_DELETION: VersionState.DESTROY_SCHEDULED,
}

# AWS error codes by what they mean to Keyvault.
#: The request quota (shared per account and region by every cryptographic operation) is used up:
#: AWS KMS says ThrottlingException; the others are the spellings of AWS's SDKs and other services.
#: (LimitExceededException is a *resource* quota, e.g. too many keys, and stays a ConfigurationError.)
_THROTTLING_CODES = frozenset(
    {"ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded", "TooManyRequestsException"}
)
_UNAVAILABLE_CODES = frozenset(
    {
        "KMSInternalException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_DISABLED_CODES = frozenset({"DisabledException", "KMSInvalidStateException", "ConflictException"})
_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "MissingAuthenticationToken",
        "ExpiredTokenException",
        "ExpiredToken",
    }
)
_NOT_FOUND_CODES = frozenset({"NotFoundException", "InvalidArnException"})
_OPENING_CODES = frozenset(
    {
        "InvalidCiphertextException",
        "IncorrectKeyException",
        "InvalidKeyUsageException",
        "NotFoundException",
        "InvalidArnException",
        "ValidationException",
        "InvalidGrantTokenException",
    }
)
_CONFIGURATION_CODES = frozenset(
    {
        "AlreadyExistsException",
        "InvalidAliasNameException",
        "ValidationException",
        "LimitExceededException",
        "TagException",
        "MalformedPolicyDocumentException",
        "InvalidKeyUsageException",
    }
)


def _retry_after(response: dict) -> float | None:
    """Seconds from a ``Retry-After`` header of AWS's answer, ``None`` if it sent none (AWS KMS does not)."""
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders") or {}
    try:
        seconds = float(headers.get("retry-after") or "")
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


# -- the wrapper ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Header:
    """The Keyvault header in front of an AWS ciphertext blob."""

    payload: int
    reference: str
    key_arn: str
    version: int

    def pack(self) -> bytes:
        return b"".join(
            (
                wire.u8(FORMAT_VERSION),
                wire.u8(self.payload),
                wire.prefixed(self.reference.encode("utf-8"), 2),
                wire.prefixed(self.key_arn.encode("utf-8"), 2),
                wire.u32(self.version),
            )
        )

    def context(self) -> dict[str, str]:
        """The header as encryption-context pairs, so AWS authenticates every field."""
        return {
            "kv:format": str(FORMAT_VERSION),
            "kv:payload": "empty" if self.payload == PAYLOAD_EMPTY else "raw",
            "kv:key": self.reference,
            "kv:key-arn": self.key_arn,
            "kv:version": str(self.version),
        }

    @classmethod
    def unpack(cls, ciphertext: object) -> tuple[_Header, bytes]:
        """Split a wrapped ciphertext into header and AWS blob; ``InvalidCiphertext`` if malformed."""
        data = wire.as_frame(ciphertext)
        reader = wire.FrameReader(data)
        reader.u8(FORMAT_VERSION)
        payload = reader.u8(PAYLOAD_RAW, PAYLOAD_EMPTY)
        reference = reader.prefixed_text(2, "utf-8")
        key_arn = reader.prefixed_text(2, "utf-8")
        version = reader.u32(1)
        header_end = reader.offset
        blob = reader.rest(1)
        header = cls(payload=payload, reference=reference, key_arn=key_arn, version=version)
        # Only the canonical spelling of a header opens (one ciphertext, one byte string).
        if not key_arn.startswith("arn:") or header.pack() != data[:header_end]:
            raise InvalidCiphertext()
        return header, blob


# -- what we know about one key ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _KeyView:
    """DescribeKey + ListKeyRotations for one key, as fetched at ``fetched_at``."""

    arn: str
    #: The bare key id: AWS takes it wherever it takes the ARN (moto's lifecycle calls only take this).
    aws_key_id: str
    aws_state: str
    created_at: datetime
    description: str
    rotated_at: tuple[datetime, ...]
    fetched_at: float

    @property
    def current_version(self) -> int:
        return 1 + len(self.rotated_at)

    @property
    def state(self) -> KeyState:
        return _KEY_STATES.get(self.aws_state, KeyState.DISABLED)

    @property
    def enabled(self) -> bool:
        return self.aws_state == "Enabled"

    def versions(self) -> tuple[KeyVersionInfo, ...]:
        state = _VERSION_STATES[self.state]
        dates = (self.created_at, *self.rotated_at)
        return tuple(
            KeyVersionInfo(version=number, state=state, created_at=created, encrypt_count=None)
            for number, created in enumerate(dates, start=1)
        )

    def info(self, key_id: str) -> KeyInfo:
        return KeyInfo(
            key_id=key_id,
            state=self.state,
            primary_version=self.current_version,
            versions=self.versions(),
            created_at=self.created_at,
            description=self.description,
        )


@dataclass(frozen=True, slots=True)
class AutomaticRotation:
    """A key's automatic rotation setting as AWS reports it."""

    enabled: bool
    period_days: int | None = None
    next_rotation_at: datetime | None = None


_loader = None
_loader_lock = threading.Lock()


#: boto3 is the SDK Keyvault depends on (it pins the botocore used here); botocore's parts are used directly.
SDK_MODULES = {
    "boto3": "boto3",
    "botocore": "botocore",
    "config": "botocore.config",
    "exceptions": "botocore.exceptions",
    "loaders": "botocore.loaders",
    "session": "botocore.session",
}


def _new_session(botocore):
    """A fresh botocore session (own credentials and region lookup) sharing one model loader.

    A new boto3 ``Session`` re-reads and parses the service model and endpoint
    files, about a quarter of a second per client; the parsed data never changes,
    so every provider shares one loader.
    """
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
    session = botocore.session.Session()
    session.register_component("data_loader", _loader)
    return session


def _positive(name: str, value: object, kind: type = float) -> float | int:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"AWS KMS option {name} must be a number, not {value!r}") from None
    if isinstance(value, bool) or number <= 0:
        raise ConfigurationError(f"AWS KMS option {name} must be positive, not {value!r}")
    return number


def _non_negative(name: str, value: object) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"AWS KMS option {name} must be a number of seconds, not {value!r}") from None
    if isinstance(value, bool) or number < 0:
        raise ConfigurationError(f"AWS KMS option {name} must be 0 or more seconds, not {value!r}")
    return number


def _whole_days(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be a whole number of days from {low} to {high}, not {value!r}")
    return value


class AWSKMSProvider(KMSProvider):
    """Symmetric AWS KMS keys; see the module docstring for the design."""

    name = "aws"
    title = "AWS KMS"
    OPTIONS = (
        Option("region", "HMD_AWS_REGION", ""),
        Option("endpoint_url", "HMD_AWS_KMS_ENDPOINT_URL", ""),
        Option("connect_timeout", "HMD_AWS_CONNECT_TIMEOUT", 5.0, "float"),
        Option("read_timeout", "HMD_AWS_READ_TIMEOUT", 10.0, "float"),
        Option("max_attempts", "HMD_AWS_MAX_ATTEMPTS", 3, "int"),
        # Seconds a key's state/version record is cached, and the longest wait for a rotation to show.
        Option("state_ttl", "HMD_AWS_STATE_TTL", DEFAULT_STATE_TTL, "float"),
        Option("rotation_wait", "HMD_AWS_ROTATION_WAIT", DEFAULT_ROTATION_WAIT, "float"),
        # Requests rewrap_many keeps in flight (they count against the account's shared KMS request quota).
        Option("concurrency", "HMD_AWS_KMS_CONCURRENCY", DEFAULT_CONCURRENCY, "int"),
    )
    CONFIGURED_BY = ("HMD_AWS_REGION", "HMD_AWS_KMS_ENDPOINT_URL")
    capabilities = frozenset({Capability.DISABLE_KEY, Capability.NATIVE_REWRAP, Capability.DESTROY_KEY})

    def __init__(
        self,
        *,
        region: str = "",
        endpoint_url: str = "",
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
        state_ttl: float = DEFAULT_STATE_TTL,
        rotation_wait: float = DEFAULT_ROTATION_WAIT,
        concurrency: int = DEFAULT_CONCURRENCY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        botocore = require_sdk(SDK_MODULES, package="boto3", user="the AWS KMS provider").botocore
        self._errors = botocore.exceptions
        self.region = region or ""
        self.endpoint_url = endpoint_url or ""
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"AWS KMS endpoint_url must start with http:// or https://, not {endpoint_url!r}")
        self.connect_timeout = _positive("connect_timeout", connect_timeout)
        self.read_timeout = _positive("read_timeout", read_timeout)
        self.max_attempts = int(_positive("max_attempts", max_attempts, int))
        self.state_ttl = _non_negative("state_ttl", state_ttl)
        self.rotation_wait = _non_negative("rotation_wait", rotation_wait)
        self.concurrency = concurrency_option("HMD_AWS_KMS_CONCURRENCY", concurrency)
        self._clock = clock
        self._views: dict[str, _KeyView] = {}
        self._views_lock = threading.Lock()
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            # One pooled connection per request rewrap_many keeps in flight (botocore's default is 10).
            max_pool_connections=max(10, self.concurrency),
            user_agent_extra="keyvault",
        )
        try:
            self._client = _new_session(botocore).create_client(
                "kms", region_name=self.region or None, endpoint_url=self.endpoint_url or None, config=config
            )
        except self._errors.NoRegionError:
            raise ConfigurationError("AWS KMS needs a region: set HMD_AWS_REGION (or AWS_REGION)") from None
        except self._errors.BotoCoreError as exc:
            raise ConfigurationError(f"AWS KMS client could not be created: {exc}") from None

    @classmethod
    def from_config(cls, options: dict) -> AWSKMSProvider:
        """Build from the ``aws`` entry of the provider settings."""
        unknown = set(options) - {option.name for option in cls.OPTIONS}
        if unknown:
            raise ConfigurationError(f"unknown AWS KMS option(s): {', '.join(sorted(unknown))}")
        return cls(**options)

    def __repr__(self) -> str:
        where = self.endpoint_url or self.region or "default region"
        return f"AWSKMSProvider({where!r})"

    # -- calling AWS ---------------------------------------------------

    def _call(self, operation: str, *, opening: bool = False, **params) -> dict:
        """Call ``client.<operation>(**params)``, translating every SDK error."""
        try:
            return getattr(self._client, operation)(**params)
        except (self._errors.ClientError, self._errors.BotoCoreError) as exc:
            raise self._translate(exc, operation, opening=opening) from None

    def _translate(self, exc: Exception, operation: str, *, opening: bool = False) -> KMSError:
        """Map a boto3/botocore error to the Keyvault tree (docs/ops/kms-providers.md, "Errors")."""
        errors = self._errors
        if isinstance(exc, errors.ClientError):
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            message = " ".join(str(error.get("Message", "")).split())[:300]  # 5xx bodies can be whole HTML pages
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            text = f"AWS KMS {operation} failed: {code}: {message}".rstrip(": ")
            if code in _THROTTLING_CODES or status == 429:
                return Throttled(text, retry_after=_retry_after(exc.response))
            if code in _UNAVAILABLE_CODES or status >= 500:
                return ProviderUnavailable(text)
            if code in _DISABLED_CODES:
                return KeyDisabled(text)
            if code in _CREDENTIAL_CODES:
                return AccessDenied(text)
            if code == "AccessDeniedException":
                if opening and _POLICY_DENIAL not in message:
                    return InvalidCiphertext()
                return AccessDenied(text)
            if code in ("InvalidCiphertextException", "IncorrectKeyException") or (opening and code in _OPENING_CODES):
                return InvalidCiphertext()
            if code in _NOT_FOUND_CODES:
                return KeyNotFound(text)
            if code == "UnsupportedOperationException":
                return UnsupportedOperation(text)
            if code in _CONFIGURATION_CODES:
                return ConfigurationError(text)
            return KMSError(text)
        if isinstance(exc, (errors.ConnectionError, errors.HTTPClientError)):
            return ProviderUnavailable(f"AWS KMS {operation}: {exc}")
        if isinstance(exc, errors.ParamValidationError):
            return InvalidCiphertext() if opening else ConfigurationError(f"AWS KMS {operation}: {exc}")
        if isinstance(exc, (errors.NoCredentialsError, errors.PartialCredentialsError, errors.ProfileNotFound)):
            return ConfigurationError(f"AWS credentials are missing or incomplete: {exc}")
        if isinstance(exc, errors.NoRegionError):
            return ConfigurationError("AWS KMS needs a region: set HMD_AWS_REGION (or AWS_REGION)")
        return KMSError(f"AWS KMS {operation} failed: {type(exc).__name__}: {exc}")

    def _crypto(self, operation: str, key_arn: str, *, opening: bool = False, **params) -> dict:
        """A cryptographic call; a key found disabled or gone drops its cached state."""
        try:
            return self._call(operation, opening=opening, **params)
        except (KeyDisabled, KeyNotFound):
            self._forget(key_arn)
            raise

    # -- key references and cached state -------------------------------

    @staticmethod
    def _lookup(key_id: str) -> str:
        """Return what AWS calls the key ``key_id`` names (a name becomes ``alias/<name>``)."""
        if not isinstance(key_id, str):
            raise ConfigurationError(f"AWS KMS key ids are strings, not {type(key_id).__name__}")
        if key_id.startswith(("alias/", "arn:")) or _KEY_UUID.match(key_id):
            if len(key_id) > _MAX_REFERENCE:
                raise KeyNotFound("AWS KMS key reference is longer than 2048 characters")
            return key_id
        if _NAME.match(key_id) and not key_id.startswith("aws/"):
            return f"alias/{key_id}"
        raise KeyNotFound(f"{key_id!r} is not an AWS KMS key reference (a name, alias/name, key id or ARN)")

    def _fetch(self, lookup: str, previous: _KeyView | None) -> _KeyView:
        metadata = self._call("describe_key", KeyId=lookup)["KeyMetadata"]
        if metadata.get("KeyUsage") != "ENCRYPT_DECRYPT" or metadata.get("KeySpec", "SYMMETRIC_DEFAULT") != (
            "SYMMETRIC_DEFAULT"
        ):
            raise ConfigurationError(f"AWS KMS key {lookup!r} is not a symmetric encryption key (SYMMETRIC_DEFAULT)")
        arn = metadata["Arn"]
        try:
            rotated_at = self._rotations(arn)
        except KeyDisabled:
            # A key in a state that refuses the listing keeps the history we last saw.
            rotated_at = previous.rotated_at if previous is not None and previous.arn == arn else ()
        return _KeyView(
            arn=arn,
            aws_key_id=metadata["KeyId"],
            aws_state=metadata["KeyState"],
            created_at=_utc(metadata["CreationDate"]),
            description=metadata.get("Description", ""),
            rotated_at=rotated_at,
            fetched_at=self._clock(),
        )

    def _rotations(self, arn: str) -> tuple[datetime, ...]:
        dates: list[datetime] = []
        params = {"KeyId": arn, "Limit": 1000}
        while True:
            page = self._call("list_key_rotations", **params)
            dates += (_utc(rotation["RotationDate"]) for rotation in page.get("Rotations", ()))
            if not page.get("Truncated") or not page.get("NextMarker"):
                return tuple(sorted(dates))
            params["Marker"] = page["NextMarker"]

    def _view(self, lookup: str, *, fresh: bool = False) -> _KeyView:
        """Return the key's description, from the cache unless stale or ``fresh``."""
        with self._views_lock:
            cached = self._views.get(lookup)
        if not fresh and cached is not None and self._clock() - cached.fetched_at < self.state_ttl:
            return cached
        view = self._fetch(lookup, cached)
        if self.state_ttl > 0:
            with self._views_lock:
                if len(self._views) >= MAX_CACHED_KEYS:
                    self._views.clear()
                self._views[lookup] = view
        return view

    def _forget(self, key_arn: str) -> None:
        """Drop every cached description of the key ``key_arn``."""
        with self._views_lock:
            for lookup in [lookup for lookup, view in self._views.items() if view.arn == key_arn]:
                del self._views[lookup]

    def _usable(self, key_id: str) -> _KeyView:
        """The key's description, refusing with ``KeyDisabled`` unless it is Enabled."""
        view = self._view(self._lookup(key_id))
        if not view.enabled:
            raise KeyDisabled(f"AWS KMS key {key_id!r} is {view.aws_state}")
        return view

    def _sealing_view(self, header: _Header) -> _KeyView:
        """The description of the key a wrapper names, for opening it."""
        try:
            view = self._view(header.key_arn)
        except (KeyNotFound, ConfigurationError):
            raise InvalidCiphertext() from None
        if view.arn != header.key_arn:
            raise InvalidCiphertext()
        if not view.enabled:
            # Named by the ARN AWS confirmed, not by the (unauthenticated yet) reference.
            raise KeyDisabled(f"AWS KMS key {view.arn} is {view.aws_state}")
        return view

    def _check_version(self, header: _Header, view: _KeyView) -> None:
        """Refuse an (authentic) wrapper that names a version no listing knows."""
        if header.version > view.current_version:
            view = self._view(header.key_arn, fresh=True)
            if header.version > view.current_version:
                raise InvalidCiphertext()

    # -- contexts and plaintexts ----------------------------------------

    @staticmethod
    def _caller_context(encryption_context: EncryptionContext | None, *, opening: bool) -> dict[str, str]:
        try:
            context = normalise_context(encryption_context)
        except (TypeError, ValueError) as exc:
            if opening:
                raise InvalidCiphertext() from None
            raise ConfigurationError(f"invalid encryption context: {exc}") from None
        reserved = sorted(key for key in context if key.lower().startswith(CONTEXT_PREFIX))
        if reserved:
            if opening:
                raise InvalidCiphertext()
            raise ConfigurationError(
                f"encryption context keys starting with {CONTEXT_PREFIX!r} are reserved by Keyvault: {reserved}"
            )
        return context

    @staticmethod
    def _plaintext(plaintext: object) -> bytes:
        if not isinstance(plaintext, (bytes, bytearray, memoryview)):
            raise ConfigurationError(f"plaintext must be bytes, not {type(plaintext).__name__}")
        data = bytes(plaintext)
        if len(data) > MAX_PLAINTEXT_BYTES:
            raise UnsupportedOperation(
                f"AWS KMS encrypts at most {MAX_PLAINTEXT_BYTES} bytes; use generate_data_key for larger data"
            )
        return data

    # -- key lifecycle -------------------------------------------------

    def create_key(self, key_id: str, *, description: str = "") -> KeyInfo:
        if (
            not isinstance(key_id, str)
            or not _NAME.match(key_id)
            or key_id.startswith(("aws/", "alias/"))
            or _KEY_UUID.match(key_id)
        ):
            raise ConfigurationError(
                f"invalid AWS KMS key name {key_id!r}: 1-250 characters of letters, digits and / _ -, "
                "not starting with aws/ or alias/ and not shaped like a key id"
            )
        if not isinstance(description, str):
            raise ConfigurationError("description must be a string")
        alias = f"alias/{key_id}"
        try:
            self._call("describe_key", KeyId=alias)
        except KeyNotFound:
            pass
        else:
            raise ConfigurationError(f"AWS KMS key {key_id!r} already exists ({alias})")
        metadata = self._call(
            "create_key",
            Description=description,
            KeyUsage="ENCRYPT_DECRYPT",
            KeySpec="SYMMETRIC_DEFAULT",
            Tags=[{"TagKey": NAME_TAG, "TagValue": key_id}],
        )["KeyMetadata"]
        try:
            self._call("create_alias", AliasName=alias, TargetKeyId=metadata["KeyId"])
        except KMSError as exc:
            # Someone took the name between our check and now: do not leave a nameless key behind.
            try:
                self._call("schedule_key_deletion", KeyId=metadata["KeyId"], PendingWindowInDays=MIN_PENDING_DAYS)
            except KMSError:
                pass
            if isinstance(exc, ConfigurationError):
                raise ConfigurationError(f"AWS KMS key {key_id!r} already exists ({alias})") from None
            raise
        return self._view(alias, fresh=True).info(key_id)

    def describe_key(self, key_id: str) -> KeyInfo:
        return self._view(self._lookup(key_id), fresh=True).info(key_id)

    def rotate_key(self, key_id: str) -> KeyVersionInfo:
        lookup = self._lookup(key_id)
        view = self._view(lookup, fresh=True)
        if not view.enabled:
            raise KeyDisabled(f"AWS KMS key {key_id!r} is {view.aws_state}; only Enabled keys rotate")
        before = view.current_version
        try:
            self._call("rotate_key_on_demand", KeyId=view.aws_key_id)
        finally:
            self._forget(view.arn)
        deadline = time.monotonic() + self.rotation_wait
        delay = 0.1
        while True:
            view = self._view(lookup, fresh=True)
            if view.current_version > before:
                return view.versions()[-1]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Still running at AWS: this is the number it gets once ListKeyRotations shows it.
                return KeyVersionInfo(version=before + 1, state=VersionState.ENABLED, created_at=datetime.now(UTC))
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)

    def set_key_version_state(self, key_id: str, version: int, state: VersionState) -> KeyVersionInfo:
        raise UnsupportedOperation(
            "AWS KMS cannot enable, disable or destroy one backing-key version: rewrap to the current "
            "version, then disable or schedule deletion of the whole key"
        )

    def set_key_state(self, key_id: str, state: KeyState) -> KeyInfo:
        try:
            state = KeyState(state)
        except ValueError:
            raise ConfigurationError(f"unknown key state {state!r}") from None
        if state is KeyState.PENDING_DELETION:
            raise UnsupportedOperation("use schedule_key_deletion to schedule an AWS KMS key for deletion")
        if state is KeyState.DESTROYED:
            raise UnsupportedOperation("use destroy_key to destroy an AWS KMS key")
        view = self._view(self._lookup(key_id), fresh=True)
        if state is KeyState.ENABLED:
            target, source, operation = "Enabled", "Disabled", "enable_key"
        else:
            target, source, operation = "Disabled", "Enabled", "disable_key"
        if view.aws_state == target:
            return view.info(key_id)
        if view.aws_state != source:
            hint = "; cancel_key_deletion first" if view.state is KeyState.PENDING_DELETION else ""
            raise KeyDisabled(f"AWS KMS key {key_id!r} is {view.aws_state}{hint}")
        try:
            self._call(operation, KeyId=view.aws_key_id)
        finally:
            self._forget(view.arn)
        return self.describe_key(key_id)

    def schedule_key_deletion(self, key_id: str, *, pending_days: int = DEFAULT_PENDING_DAYS) -> datetime:
        """Schedule the key's deletion after ``pending_days`` (7-30); every crypto call fails meanwhile.

        :returns: when AWS will delete the key.
        :raises ConfigurationError: ``pending_days`` outside 7-30.
        :raises KeyDisabled: the key is already pending deletion.
        :raises KeyNotFound, ProviderUnavailable, AccessDenied: as usual.
        """
        pending_days = _whole_days("pending_days", pending_days, MIN_PENDING_DAYS, MAX_PENDING_DAYS)
        view = self._view(self._lookup(key_id), fresh=True)
        if view.state is KeyState.PENDING_DELETION:
            raise KeyDisabled(f"AWS KMS key {key_id!r} is already pending deletion")
        try:
            response = self._call("schedule_key_deletion", KeyId=view.aws_key_id, PendingWindowInDays=pending_days)
        finally:
            self._forget(view.arn)
        return _utc(response["DeletionDate"])

    def cancel_key_deletion(self, key_id: str) -> KeyInfo:
        """Cancel a scheduled deletion; the key comes back **Disabled** (AWS's rule).

        :raises KeyDisabled: the key is not pending deletion.
        """
        view = self._view(self._lookup(key_id), fresh=True)
        if view.state is not KeyState.PENDING_DELETION:
            raise KeyDisabled(f"AWS KMS key {key_id!r} is {view.aws_state}, not pending deletion")
        try:
            self._call("cancel_key_deletion", KeyId=view.aws_key_id)
        finally:
            self._forget(view.arn)
        return self.describe_key(key_id)

    def destroy_key(self, key_id: str) -> None:
        """Schedule deletion with AWS's minimum window of 7 days (cancellable until then)."""
        self.schedule_key_deletion(key_id, pending_days=MIN_PENDING_DAYS)

    def enable_automatic_rotation(self, key_id: str, *, period_days: int = DEFAULT_ROTATION_DAYS) -> AutomaticRotation:
        """Let AWS rotate the key every ``period_days`` (90-2560); on-demand rotations do not shift it.

        :raises ConfigurationError: ``period_days`` outside 90-2560.
        :raises KeyDisabled: the key is not Enabled.
        """
        period_days = _whole_days("period_days", period_days, MIN_ROTATION_DAYS, MAX_ROTATION_DAYS)
        view = self._usable(key_id)
        self._call("enable_key_rotation", KeyId=view.aws_key_id, RotationPeriodInDays=period_days)
        return self.automatic_rotation(key_id)

    def disable_automatic_rotation(self, key_id: str) -> AutomaticRotation:
        """Stop automatic rotation (existing versions are kept, as always)."""
        view = self._usable(key_id)
        self._call("disable_key_rotation", KeyId=view.aws_key_id)
        return self.automatic_rotation(key_id)

    def automatic_rotation(self, key_id: str) -> AutomaticRotation:
        """Return the key's automatic rotation setting."""
        view = self._view(self._lookup(key_id))
        status = self._call("get_key_rotation_status", KeyId=view.aws_key_id)
        enabled = bool(status.get("KeyRotationEnabled"))
        next_date = status.get("NextRotationDate")
        return AutomaticRotation(
            enabled=enabled,
            period_days=status.get("RotationPeriodInDays") if enabled else None,
            next_rotation_at=_utc(next_date) if enabled and next_date else None,
        )

    # -- cryptography --------------------------------------------------

    def encrypt(
        self, key_id: str, plaintext: bytes, *, encryption_context: EncryptionContext | None = None
    ) -> EncryptResult:
        context = self._caller_context(encryption_context, opening=False)
        data = self._plaintext(plaintext)
        view = self._usable(key_id)
        payload = PAYLOAD_RAW if data else PAYLOAD_EMPTY
        header = _Header(payload=payload, reference=key_id, key_arn=view.arn, version=view.current_version)
        response = self._crypto(
            "encrypt",
            view.arn,
            KeyId=view.arn,
            Plaintext=data or EMPTY_FILLER,
            EncryptionContext={**context, **header.context()},
        )
        if response.get("KeyId") != view.arn:
            raise KMSError("AWS KMS encrypted under another key than the one asked for")
        ciphertext = header.pack() + response["CiphertextBlob"]
        return EncryptResult(ciphertext=ciphertext, key_id=key_id, key_version=header.version)

    def decrypt(self, ciphertext: bytes, *, encryption_context: EncryptionContext | None = None) -> DecryptResult:
        header, blob = _Header.unpack(ciphertext)
        context = self._caller_context(encryption_context, opening=True)
        view = self._sealing_view(header)
        response = self._crypto(
            "decrypt",
            header.key_arn,
            opening=True,
            CiphertextBlob=blob,
            KeyId=header.key_arn,
            EncryptionContext={**context, **header.context()},
        )
        if response.get("KeyId") != header.key_arn:
            raise InvalidCiphertext()
        self._check_version(header, view)
        plaintext = response["Plaintext"]
        if header.payload == PAYLOAD_EMPTY:
            if plaintext != EMPTY_FILLER:
                raise InvalidCiphertext()
            plaintext = b""
        return DecryptResult(plaintext=plaintext, key_id=header.reference, key_version=header.version)

    def generate_data_key(
        self,
        key_id: str,
        *,
        encryption_context: EncryptionContext | None = None,
        key_spec: str = "AES_256",
    ) -> DataKey:
        length = self.key_length(key_spec)
        context = self._caller_context(encryption_context, opening=False)
        view = self._usable(key_id)
        header = _Header(payload=PAYLOAD_RAW, reference=key_id, key_arn=view.arn, version=view.current_version)
        response = self._crypto(
            "generate_data_key",
            view.arn,
            KeyId=view.arn,
            KeySpec=key_spec,
            EncryptionContext={**context, **header.context()},
        )
        plaintext = bytearray(response["Plaintext"])
        if len(plaintext) != length or response.get("KeyId") != view.arn:
            plaintext[:] = bytes(len(plaintext))
            raise KMSError("AWS KMS returned a data key that does not match the request")
        return DataKey(
            plaintext=plaintext,
            ciphertext=header.pack() + response["CiphertextBlob"],
            key_id=key_id,
            key_version=header.version,
        )

    def rewrap(
        self,
        ciphertext: bytes,
        *,
        encryption_context: EncryptionContext | None = None,
        key_id: str | None = None,
    ) -> EncryptResult:
        """Move a ciphertext to the current version of ``key_id`` (default: its own key) with ``ReEncrypt``."""
        header, blob = _Header.unpack(ciphertext)
        context = self._caller_context(encryption_context, opening=True)
        source = self._sealing_view(header)
        target_id = header.reference if key_id is None else key_id
        target = self._usable(target_id)
        new_header = _Header(
            payload=header.payload, reference=target_id, key_arn=target.arn, version=target.current_version
        )
        response = self._crypto(
            "re_encrypt",
            header.key_arn,
            opening=True,
            CiphertextBlob=blob,
            SourceKeyId=header.key_arn,
            SourceEncryptionContext={**context, **header.context()},
            DestinationKeyId=target.arn,
            DestinationEncryptionContext={**context, **new_header.context()},
        )
        if response.get("SourceKeyId") != header.key_arn:
            raise InvalidCiphertext()
        if response.get("KeyId") != target.arn:
            raise KMSError("AWS KMS re-encrypted under another key than the one asked for")
        self._check_version(header, source)
        return EncryptResult(
            ciphertext=new_header.pack() + response["CiphertextBlob"], key_id=target_id, key_version=new_header.version
        )

    def rewrap_many(self, items: Sequence[RewrapItem], *, key_id: str | None = None) -> list[RewrapOutcome]:
        """``ReEncrypt`` each item, ``concurrency`` requests in flight (boto3 clients are thread-safe).

        The keys' state is fetched once before the requests start, so the
        first requests do not each ask for it.

        :raises ProviderUnavailable: AWS KMS is unreachable, or :class:`Throttled` once botocore's
            retries of a throttled request are used up; retry the batch later.
        """
        self._warm_views(items, key_id)
        return map_bounded(
            lambda item: self.rewrap(item.ciphertext, encryption_context=item.encryption_context, key_id=key_id),
            items,
            concurrency=self.concurrency,
        )

    def _warm_views(self, items: Sequence[RewrapItem], key_id: str | None) -> None:
        """Fetch the state of every key the batch names (errors are left for the items to meet)."""
        if self.state_ttl <= 0:
            return  # nothing is cached: every request asks anyway
        # The source key by the ARN its header names, the target by the reference rewrap looks up.
        lookups: set[str] = set()
        references = {key_id} if key_id is not None else set()
        for item in items:
            try:
                header, _ = _Header.unpack(item.ciphertext)
            except InvalidCiphertext:
                continue
            lookups.add(header.key_arn)
            if key_id is None:
                references.add(header.reference)
        for reference in references:
            try:
                lookups.add(self._lookup(reference))
            except KMSError:
                pass
        for lookup in lookups:
            try:
                self._view(lookup)
            except ProviderUnavailable:
                raise
            except KMSError:
                pass

    def health_check(self) -> HealthStatus:
        where = self.endpoint_url or self._client.meta.region_name

        def probe() -> str:
            try:
                self._client.list_keys(Limit=1)
            except self._errors.ClientError as exc:
                error = exc.response.get("Error", {})
                if error.get("Code") == "AccessDeniedException":
                    return f"AWS KMS at {where} answers; credentials accepted (kms:ListKeys not granted)"
                raise self._translate(exc, "list_keys") from None
            except self._errors.BotoCoreError as exc:
                raise self._translate(exc, "list_keys") from None
            return f"AWS KMS at {where} answers; credentials accepted"

        return self.timed_health(probe)


__all__ = ["AWSKMSProvider", "AutomaticRotation"]

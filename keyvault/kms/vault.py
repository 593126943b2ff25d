"""HashiCorp Vault / OpenBao Transit provider: KEKs that never leave Vault.

* Every KEK is a Transit key of type ``aes256-gcm96`` with ``derived=true``:
  the encryption context is bound as the key-derivation context (base64 of
  :func:`keyvault.kms.context.encode_context`), so ``rewrap`` stays server-side.
* Vault's key versions are ours; ``latest_version`` is the primary. Retiring is
  ``min_decryption_version`` ("every version below N"), so only the oldest
  enabled version can be disabled and only the newest disabled one re-enabled;
  destroying is ``trim``.
* A ciphertext is a format byte and the key name (:mod:`keyvault.kms.wire`) ‖
  Vault's ``vault:v<N>:<base64>`` string, parsed strictly by
  :func:`unpack_ciphertext`; the version is read only from that string.
* Decrypt failures, "too old" (a retired version) included, are the opaque
  :class:`InvalidCiphertext`; ``encrypt`` checks the key exists first so Vault
  never creates one. :func:`policy_hcl` is the Vault policy this provider needs.

Operator's guide (authentication, errors, limits, the policy): ``docs/ops/kms-providers.md``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
from . import wire
from .loading import require_sdk
from .options import Option
from .wire import FORMAT_VERSION

KEY_TYPE = "aes256-gcm96"
#: Items per ``batch_input`` request (``HMD_VAULT_BATCH_SIZE``). Each item is four JSON strings and
#: OpenBao refuses a body of more than 1,000 by default ("high complexity"): 249 items at most.
DEFAULT_BATCH_SIZE = 200
#: The largest ``HMD_VAULT_BATCH_SIZE`` accepted, for servers whose JSON limits were raised.
MAX_BATCH_SIZE = 10_000
#: What Vault/OpenBao say when a request body is over their JSON or size limits.
_TOO_BIG = ("high complexity", "too large")
#: How long a successful existence check of a key is trusted by ``encrypt``.
KEY_CHECK_SECONDS = 300.0
#: Vault's shortest ``auto_rotate_period`` (0 switches auto-rotation off).
MIN_AUTO_ROTATE_PERIOD = timedelta(hours=1)
#: Creation time reported where Vault no longer lists it (retired versions).
UNKNOWN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
#: Replace a logged-in token after this share of its lease.
RELOGIN_AT = 0.8
HEALTH_PROBE_KEY = "keyvault-health-probe"

# Vault's key-name route pattern (\w(([\w-.]+)?\w)?) in ASCII, at most 255 bytes.
_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,253}[A-Za-z0-9_])?")
_VAULT_CIPHERTEXT = re.compile(r"vault:v([1-9][0-9]{0,9}):([A-Za-z0-9+/]+={0,2})")
_MOUNT = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")
_MAX_VERSION = 2**31 - 1
_MIN_SEALED_BYTES = 12 + 16  # GCM nonce + tag
_TOO_OLD = "disallowed by policy"

TRANSIT_POLICY = """\
# Key lifecycle: create (Vault checks "update" for it), describe,
# delete.
path "{mount}/keys/+" {{
  capabilities = ["read", "update", "delete"]
}}
path "{mount}/keys/+/rotate" {{
  capabilities = ["update"]
}}
# min_decryption_version, min_encryption_version, auto_rotate_period,
# deletion_allowed.
path "{mount}/keys/+/config" {{
  capabilities = ["update"]
}}
# Destroying versions (irreversible).
path "{mount}/keys/+/trim" {{
  capabilities = ["update"]
}}
# No "create" here: Vault must not create a missing key on encrypt.
path "{mount}/encrypt/+" {{
  capabilities = ["update"]
}}
path "{mount}/decrypt/+" {{
  capabilities = ["update"]
}}
path "{mount}/rewrap/+" {{
  capabilities = ["update"]
}}
# Plaintext data keys for envelope encryption (generate_data_key).
path "{mount}/datakey/plaintext/+" {{
  capabilities = ["update"]
}}
"""


def policy_hcl(mount: str = "transit") -> str:
    """Return the Vault policy (HCL) this provider needs on the Transit ``mount``."""
    return TRANSIT_POLICY.format(mount=mount.strip("/"))


# -- ciphertext format ---------------------------------------------------


def pack_ciphertext(key_name: str, vault_ciphertext: str) -> bytes:
    """Return our ciphertext bytes: format byte, key name, Vault's ciphertext string.

    :raises KMSError: Vault returned a ciphertext this module cannot read back.
    """
    return _packed(key_name, vault_ciphertext).ciphertext


def _packed(key_name: str, vault_ciphertext: str) -> EncryptResult:
    """:func:`pack_ciphertext`, with the version read back from it (one parse)."""
    blob = wire.u8(FORMAT_VERSION) + wire.prefixed(key_name.encode("ascii")) + vault_ciphertext.encode("ascii")
    try:
        version = unpack_ciphertext(blob)[1]
    except InvalidCiphertext:
        raise KMSError(f"vault returned a ciphertext for {key_name!r} in an unexpected format") from None
    return EncryptResult(ciphertext=blob, key_id=key_name, key_version=version)


def unpack_ciphertext(blob: bytes) -> tuple[str, int, str]:
    """Return ``(key name, version, Vault ciphertext string)`` from our ciphertext bytes.

    :raises InvalidCiphertext: anything but a canonical ciphertext of this format.
    """
    reader = wire.FrameReader(wire.as_frame(blob))
    reader.u8(FORMAT_VERSION)
    name = reader.prefixed_text(1, "ascii")
    vault_ciphertext = reader.text(reader.remaining, "ascii")
    match = _VAULT_CIPHERTEXT.fullmatch(vault_ciphertext)
    if not _NAME.fullmatch(name) or match is None:
        raise InvalidCiphertext()
    version = int(match[1])
    body = match[2]
    try:
        sealed = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCiphertext() from None
    # Go's decoder ignores stray padding bits; only the canonical spelling is accepted,
    # so no two byte strings open to the same Vault ciphertext.
    if version > _MAX_VERSION or len(sealed) < _MIN_SEALED_BYTES or base64.b64encode(sealed).decode() != body:
        raise InvalidCiphertext()
    return name, version, vault_ciphertext


def _context(encryption_context: EncryptionContext | None) -> str:
    return base64.b64encode(encode_context(encryption_context)).decode("ascii")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header (Vault sends whole seconds), ``None`` if absent or unreadable."""
    try:
        seconds = float(headers.get("Retry-After") or "")
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


# -- authentication ------------------------------------------------------


@dataclass(frozen=True)
class TokenAuth:
    """A Vault token used as given (renewed, if at all, outside Keyvault)."""

    token: str = field(repr=False)
    method = "token"
    can_login = False

    def login(self, client) -> dict:
        raise ConfigurationError("a static vault token cannot log in again; renew or replace HMD_VAULT_TOKEN")


@dataclass(frozen=True)
class AppRoleAuth:
    """AppRole credentials; ``secret_id`` may be empty for roles with ``bind_secret_id=false``."""

    role_id: str
    secret_id: str = field(default="", repr=False)
    mount: str = "approle"
    method = "approle"
    can_login = True

    def login(self, client) -> dict:
        return client.auth.approle.login(role_id=self.role_id, secret_id=self.secret_id or None, mount_point=self.mount)


@dataclass(frozen=True)
class KubernetesAuth:
    """A Kubernetes service account: the JWT is re-read at every login (kubelet rotates it)."""

    role: str
    jwt_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    mount: str = "kubernetes"
    method = "kubernetes"
    can_login = True

    def login(self, client) -> dict:
        try:
            jwt = Path(self.jwt_path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the Kubernetes service-account token {self.jwt_path} "
                f"(HMD_VAULT_KUBERNETES_JWT_PATH): {exc.strerror}"
            ) from None
        if not jwt:
            raise ConfigurationError(f"the Kubernetes service-account token {self.jwt_path} is empty")
        return client.auth.kubernetes.login(role=self.role, jwt=jwt, mount_point=self.mount)


VaultAuth = TokenAuth | AppRoleAuth | KubernetesAuth


@dataclass(frozen=True, slots=True)
class VaultKeySettings:
    """The Vault-specific settings of one Transit key."""

    latest_version: int
    min_decryption_version: int
    min_encryption_version: int
    min_available_version: int
    auto_rotate_period: timedelta
    deletion_allowed: bool
    derived: bool
    key_type: str


class _VaultRefusal(KMSError):
    """Vault answered 400 or 404; callers translate it for their operation."""

    def __init__(self, status: int, errors: list[str], body: dict) -> None:
        super().__init__(f"vault answered HTTP {status}: {'; '.join(errors) or 'no detail'}")
        self.status = status
        self.errors = errors
        self.body = body

    def says(self, fragment: str) -> bool:
        return any(fragment in error for error in self.errors)


SDK_MODULES = {"hvac": "hvac", "hvac_errors": "hvac.exceptions", "http_errors": "requests.exceptions"}


class VaultTransitProvider(KMSProvider):
    """KEKs in HashiCorp Vault's (or OpenBao's) Transit engine; see the module docstring."""

    name = "vault"
    title = "Vault Transit"
    OPTIONS = (
        Option("addr", "HMD_VAULT_ADDR", ""),
        Option("token", "HMD_VAULT_TOKEN", ""),
        Option("role_id", "HMD_VAULT_ROLE_ID", ""),
        Option("secret_id", "HMD_VAULT_SECRET_ID", ""),
        Option("kubernetes_role", "HMD_VAULT_KUBERNETES_ROLE", ""),
        Option("kubernetes_jwt_path", "HMD_VAULT_KUBERNETES_JWT_PATH", "/var/run/secrets/kubernetes.io/serviceaccount/token"),
        Option("namespace", "HMD_VAULT_NAMESPACE", ""),
        Option("mount", "HMD_VAULT_TRANSIT_MOUNT", "transit"),
        Option("ca_cert", "HMD_VAULT_CACERT", ""),
        Option("timeout", "HMD_VAULT_TIMEOUT", 10.0, "float"),
        # Ciphertexts per transit/rewrap request in rewrap_many.
        Option("batch_size", "HMD_VAULT_BATCH_SIZE", DEFAULT_BATCH_SIZE, "int"),
    )
    CONFIGURED_BY = ("HMD_VAULT_ADDR",)
    capabilities = frozenset(
        {
            Capability.DISABLE_VERSION,
            Capability.DESTROY_VERSION,
            Capability.NATIVE_REWRAP,
            Capability.DESTROY_KEY,
        }
    )

    def __init__(
        self,
        addr: str,
        auth: VaultAuth,
        *,
        mount: str = "transit",
        namespace: str = "",
        ca_cert: str = "",
        timeout: float = 10.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        sdk = require_sdk(SDK_MODULES, package="hvac", user="the vault KMS provider")
        hvac, self._hvac_errors, self._http_errors = sdk.hvac, sdk.hvac_errors, sdk.http_errors
        addr = (addr or "").rstrip("/")
        if not addr.startswith(("http://", "https://")):
            raise ConfigurationError(f"HMD_VAULT_ADDR must be an http(s):// URL, not {addr!r}")
        mount = (mount or "").strip("/")
        if not _MOUNT.fullmatch(mount):
            raise ConfigurationError(f"invalid Transit mount path {mount!r} (HMD_VAULT_TRANSIT_MOUNT)")
        if not isinstance(auth, (TokenAuth, AppRoleAuth, KubernetesAuth)):
            raise ConfigurationError("vault auth must be TokenAuth, AppRoleAuth or KubernetesAuth")
        if isinstance(auth, TokenAuth) and not auth.token:
            raise ConfigurationError("the vault token is empty (HMD_VAULT_TOKEN)")
        if isinstance(auth, AppRoleAuth) and not auth.role_id:
            raise ConfigurationError("the AppRole role_id is empty (HMD_VAULT_ROLE_ID)")
        if timeout <= 0:
            raise ConfigurationError("the vault timeout must be a positive number of seconds (HMD_VAULT_TIMEOUT)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ConfigurationError(
                f"HMD_VAULT_BATCH_SIZE must be a whole number from 1 to {MAX_BATCH_SIZE}, not {batch_size!r}"
            )
        if ca_cert and not Path(ca_cert).is_file():
            raise ConfigurationError(f"the vault CA bundle {ca_cert} does not exist (HMD_VAULT_CACERT)")
        self.addr = addr
        self.mount = mount
        self.auth = auth
        #: Items per rewrap request; lowered for good if the server refuses a batch as too big.
        self.batch_size = batch_size
        # token="" keeps hvac from falling back to VAULT_TOKEN or ~/.vault-token.
        self._client = hvac.Client(
            url=addr,
            token=auth.token if isinstance(auth, TokenAuth) else "",
            verify=ca_cert or True,
            timeout=timeout,
            namespace=namespace or None,
        )
        self._login_lock = threading.Lock()
        self._token_deadline = 0.0
        self._checked_keys: dict[str, float] = {}

    @classmethod
    def from_config(cls, options: dict) -> VaultTransitProvider:
        """Build from the ``vault`` entry of the provider settings (``HMD_VAULT_*``)."""
        token = options.get("token") or ""
        role_id = options.get("role_id") or ""
        kubernetes_role = options.get("kubernetes_role") or ""
        given = (("token", token), ("role_id", role_id), ("kubernetes_role", kubernetes_role))
        chosen = [name for name, value in given if value]
        if len(chosen) != 1:
            raise ConfigurationError(
                "the vault provider needs exactly one of HMD_VAULT_TOKEN, HMD_VAULT_ROLE_ID (+ HMD_VAULT_SECRET_ID) "
                f"or HMD_VAULT_KUBERNETES_ROLE; got {', '.join(chosen) or 'none'}"
            )
        if token:
            auth: VaultAuth = TokenAuth(token)
        elif role_id:
            auth = AppRoleAuth(role_id, options.get("secret_id") or "")
        else:
            jwt_path = options.get("kubernetes_jwt_path") or KubernetesAuth.jwt_path
            auth = KubernetesAuth(kubernetes_role, jwt_path)
        raw_timeout = options.get("timeout")
        try:
            timeout = 10.0 if raw_timeout in (None, "") else float(raw_timeout)
        except (TypeError, ValueError):
            raise ConfigurationError("HMD_VAULT_TIMEOUT must be a number of seconds") from None
        batch_size = options.get("batch_size")
        if batch_size in (None, ""):
            batch_size = DEFAULT_BATCH_SIZE
        elif isinstance(batch_size, str) and batch_size.strip().isdigit():
            batch_size = int(batch_size)  # checked with the other settings in __init__
        return cls(
            options.get("addr") or "",
            auth,
            mount=options.get("mount") or "transit",
            namespace=options.get("namespace") or "",
            ca_cert=options.get("ca_cert") or "",
            timeout=timeout,
            batch_size=batch_size,
        )

    def __repr__(self) -> str:
        return f"VaultTransitProvider(addr={self.addr!r}, mount={self.mount!r}, auth={self.auth.method})"

    # -- transport -------------------------------------------------------

    def _login(self) -> None:
        errors = self._hvac_errors
        self._client.token = ""  # an expired token must not ride along on the login request
        try:
            response = self.auth.login(self._client)
        except self._http_errors.SSLError:
            raise self._tls_error() from None
        except self._http_errors.RequestException as exc:
            raise ProviderUnavailable(f"vault at {self.addr} is unreachable ({type(exc).__name__})") from None
        except (errors.InvalidRequest, errors.Forbidden, errors.Unauthorized) as exc:
            detail = "; ".join(exc.errors or []) or exc.args[0]
            raise AccessDenied(f"vault refused the {self.auth.method} login: {detail}") from None
        except errors.InvalidPath:
            raise ConfigurationError(
                f"no {self.auth.method} auth method is mounted at auth/{self.auth.mount} on {self.addr}"
            ) from None
        except errors.VaultError as exc:
            raise ProviderUnavailable(f"vault {self.auth.method} login failed: {type(exc).__name__}") from None
        lease = float((response.get("auth") or {}).get("lease_duration") or 0)
        self._token_deadline = time.monotonic() + lease * RELOGIN_AT if lease > 0 else float("inf")

    def _ensure_token(self) -> None:
        if not self.auth.can_login:
            return
        with self._login_lock:
            if not self._client.token or time.monotonic() >= self._token_deadline:
                self._login()

    def _tls_error(self) -> ConfigurationError:
        return ConfigurationError(f"TLS verification of {self.addr} failed; check HMD_VAULT_CACERT")

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        """Send one request and return its JSON body (``{}`` when empty).

        :raises _VaultRefusal: HTTP 400 or 404 (the caller knows what it means).
        :raises AccessDenied, ProviderUnavailable, ConfigurationError: everything else.
        """
        relogged = False
        while True:
            self._ensure_token()
            try:
                response = self._client.adapter.request(method, f"/v1/{path}", json=payload, raise_exception=False)
            except self._http_errors.SSLError:
                raise self._tls_error() from None
            except self._http_errors.RequestException as exc:
                raise ProviderUnavailable(f"vault at {self.addr} is unreachable ({type(exc).__name__})") from None
            if isinstance(response, dict):
                return response
            status = response.status_code
            if status in (200, 204):
                return {}
            try:
                body = response.json()
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            errors = [" ".join(str(error).split()) for error in body.get("errors") or []]
            if status == 403 and self.auth.can_login and not relogged:
                relogged = True  # the token may have expired or been revoked: log in once more
                with self._login_lock:
                    self._client.token = ""
                continue
            if status in (401, 403):
                raise AccessDenied(f"vault denied {path}: {'; '.join(errors) or 'permission denied'}")
            if status == 404 and any("no handler for route" in error for error in errors):
                raise ConfigurationError(
                    f"vault at {self.addr} has nothing mounted for {path} (HMD_VAULT_TRANSIT_MOUNT?)"
                )
            if status in (400, 404):
                raise _VaultRefusal(status, errors, body)
            if status == 429:
                # A rate-limit quota (sys/quotas/rate-limit): back off, as from a cloud KMS's throttling.
                raise Throttled(
                    f"vault at {self.addr} answered HTTP 429: {'; '.join(errors) or 'rate limit quota exceeded'}",
                    retry_after=_retry_after(response.headers),
                )
            if status >= 500:
                detail = "; ".join(errors) or ("sealed" if body.get("sealed") else "unavailable")
                raise ProviderUnavailable(f"vault at {self.addr} answered HTTP {status}: {detail}")
            raise KMSError(f"vault at {self.addr} answered HTTP {status} to {path}")

    # -- keys --------------------------------------------------------------

    def _name(self, key_id: str) -> str:
        """Return ``key_id`` if it can name a Transit key; an invalid name names no key."""
        if not isinstance(key_id, str) or not _NAME.fullmatch(key_id):
            raise KeyNotFound(f"vault key {key_id!r} does not exist (not a valid Transit key name)")
        return key_id

    def _read_key(self, name: str) -> dict:
        try:
            data = self._request("GET", f"{self.mount}/keys/{name}").get("data") or {}
        except _VaultRefusal as refusal:
            if refusal.status == 404:
                self._checked_keys.pop(name, None)
                raise KeyNotFound(f"vault key {name!r} does not exist") from None
            raise KMSError(f"vault refused to read key {name!r}: {'; '.join(refusal.errors)}") from None
        return data

    def _usable_key(self, name: str) -> str:
        """Check (cached) that key ``name`` exists and is a derived AES-GCM key."""
        name = self._name(name)
        if self._checked_keys.get(name, 0.0) > time.monotonic():
            return name
        data = self._read_key(name)
        if data.get("type") != KEY_TYPE or not data.get("derived"):
            raise ConfigurationError(
                f"vault key {name!r} is a {data.get('type')} key with derived={data.get('derived')}; "
                f"Keyvault needs derived {KEY_TYPE} keys (create them with create_key)"
            )
        self._checked_keys[name] = time.monotonic() + KEY_CHECK_SECONDS
        return name

    def _forget(self, name: str) -> None:
        self._checked_keys.pop(name, None)

    @staticmethod
    def _settings(data: dict) -> VaultKeySettings:
        return VaultKeySettings(
            latest_version=int(data["latest_version"]),
            min_decryption_version=int(data.get("min_decryption_version") or 1),
            min_encryption_version=int(data.get("min_encryption_version") or 0),
            min_available_version=int(data.get("min_available_version") or 0),
            auto_rotate_period=timedelta(seconds=int(data.get("auto_rotate_period") or 0)),
            deletion_allowed=bool(data.get("deletion_allowed")),
            derived=bool(data.get("derived")),
            key_type=str(data.get("type")),
        )

    @staticmethod
    def _created_at(value: object) -> datetime:
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
        return UNKNOWN_TIME  # asymmetric key types report a dict; we never create those

    def _key_info(self, name: str, data: dict) -> KeyInfo:
        settings = self._settings(data)
        created = {int(number): self._created_at(value) for number, value in (data.get("keys") or {}).items()}
        versions = tuple(
            KeyVersionInfo(
                version=number,
                state=self._version_state(settings, number),
                created_at=created.get(number, UNKNOWN_TIME),
            )
            for number in range(1, settings.latest_version + 1)
        )
        return KeyInfo(
            key_id=name,
            state=KeyState.ENABLED,
            primary_version=settings.latest_version,
            versions=versions,
            created_at=created.get(1, UNKNOWN_TIME),
        )

    @staticmethod
    def _version_state(settings: VaultKeySettings, number: int) -> VersionState:
        if number < settings.min_available_version:
            return VersionState.DESTROYED
        if number < settings.min_decryption_version:
            return VersionState.DISABLED
        return VersionState.ENABLED

    def _configure(self, name: str, payload: dict) -> None:
        try:
            self._request("POST", f"{self.mount}/keys/{name}/config", payload)
        except _VaultRefusal as refusal:
            if refusal.says("could be found") or refusal.status == 404:
                self._forget(name)
                raise KeyNotFound(f"vault key {name!r} does not exist") from None
            raise ConfigurationError(f"vault refused to configure key {name!r}: {'; '.join(refusal.errors)}") from None

    def create_key(self, key_id: str, *, description: str = "") -> KeyInfo:
        """Create a derived ``aes256-gcm96`` key; ``description`` is not stored by Vault."""
        if not isinstance(key_id, str) or not _NAME.fullmatch(key_id):
            raise ConfigurationError(
                f"invalid vault key name {key_id!r}: 1-255 letters, digits, _ . -, "
                "starting and ending with a letter, digit or _"
            )
        try:
            self._read_key(key_id)
        except KeyNotFound:
            pass
        else:
            raise ConfigurationError(f"vault key {key_id!r} already exists")
        try:
            self._request("POST", f"{self.mount}/keys/{key_id}", {"type": KEY_TYPE, "derived": True})
        except _VaultRefusal as refusal:
            raise ConfigurationError(f"vault refused to create key {key_id!r}: {'; '.join(refusal.errors)}") from None
        data = self._read_key(key_id)
        self._checked_keys[key_id] = time.monotonic() + KEY_CHECK_SECONDS
        return self._key_info(key_id, data)

    def describe_key(self, key_id: str) -> KeyInfo:
        name = self._name(key_id)
        return self._key_info(name, self._read_key(name))

    def key_settings(self, key_id: str) -> VaultKeySettings:
        """Return Vault's own settings of the key (min versions, auto-rotation, ...)."""
        return self._settings(self._read_key(self._name(key_id)))

    def rotate_key(self, key_id: str) -> KeyVersionInfo:
        name = self._name(key_id)
        try:
            data = self._request("POST", f"{self.mount}/keys/{name}/rotate").get("data")
        except _VaultRefusal as refusal:
            if refusal.says("not found") or refusal.status == 404:
                self._forget(name)
                raise KeyNotFound(f"vault key {name!r} does not exist") from None
            raise KMSError(f"vault refused to rotate key {name!r}: {'; '.join(refusal.errors)}") from None
        if not data or "latest_version" not in data:  # older Vault answers 204
            data = self._read_key(name)
        info = self._key_info(name, data)
        return info.version(info.primary_version)

    def set_key_version_state(self, key_id: str, version: int, state: VersionState) -> KeyVersionInfo:
        """Map our per-version states onto Vault's "everything below N" bounds.

        DISABLED works for the oldest enabled version, ENABLED for the newest
        disabled one, DESTROYED for the oldest remaining one; other requests
        would change more versions than asked and raise ``UnsupportedOperation``.
        """
        state = VersionState(state)
        if state is VersionState.DESTROY_SCHEDULED:
            raise UnsupportedOperation("vault trims versions at once and cannot schedule it; use DESTROYED")
        name = self._name(key_id)
        settings = self._settings(self._read_key(name))
        if not isinstance(version, int) or not 1 <= version <= settings.latest_version:
            raise KeyNotFound(f"vault key {name!r} has no version {version}")
        current = self._version_state(settings, version)
        if state is not VersionState.ENABLED and version == settings.latest_version:
            raise KeyDisabled(f"version {version} of {name!r} is primary; rotate before retiring it")
        if current is VersionState.DESTROYED and state is not VersionState.DESTROYED:
            raise KeyDisabled(f"version {version} of {name!r} is destroyed and cannot come back")
        if current is not state:
            if state is VersionState.ENABLED:
                self._enable_version(name, settings, version)
            elif state is VersionState.DISABLED:
                self._disable_version(name, settings, version)
            else:
                self._destroy_version(name, settings, version)
        return self.describe_key(name).version(version)

    def _enable_version(self, name: str, settings: VaultKeySettings, version: int) -> None:
        newest_disabled = settings.min_decryption_version - 1
        if version != newest_disabled:
            raise UnsupportedOperation(
                f"vault can only re-enable the newest disabled version of {name!r} ({newest_disabled}): "
                f"min_decryption_version={version} would also enable versions {version + 1}..{newest_disabled}"
            )
        self._configure(name, {"min_decryption_version": version})

    def _disable_version(self, name: str, settings: VaultKeySettings, version: int) -> None:
        if version != settings.min_decryption_version:
            raise UnsupportedOperation(
                f"vault retires versions oldest first: disable versions "
                f"{settings.min_decryption_version}..{version - 1} of {name!r} before version {version} "
                "(min_decryption_version disables every version below it)"
            )
        self._retire(name, settings, version + 1)

    def _retire(self, name: str, settings: VaultKeySettings, min_decryption: int) -> None:
        payload = {"min_decryption_version": min_decryption}
        # Vault insists min_encryption_version is 0 or >= min_decryption_version; it only
        # limits explicit key_version requests, which this provider never makes.
        if settings.min_encryption_version and settings.min_encryption_version < min_decryption:
            payload["min_encryption_version"] = min_decryption
        self._configure(name, payload)

    def _destroy_version(self, name: str, settings: VaultKeySettings, version: int) -> None:
        oldest = max(settings.min_available_version, 1)
        if version != oldest:
            raise UnsupportedOperation(
                f"vault destroys (trims) versions oldest first: "
                f"destroy versions {oldest}..{version - 1} of {name!r} first"
            )
        keep_from = version + 1
        payload = {}
        if settings.min_decryption_version < keep_from:
            payload["min_decryption_version"] = keep_from
        if settings.min_encryption_version < keep_from:
            payload["min_encryption_version"] = keep_from  # trim requires it to be set
        if payload:
            self._configure(name, payload)
        try:
            self._request("POST", f"{self.mount}/keys/{name}/trim", {"min_available_version": keep_from})
        except _VaultRefusal as refusal:
            raise KMSError(f"vault refused to trim key {name!r}: {'; '.join(refusal.errors)}") from None

    def retire_versions_below(self, key_id: str, version: int) -> VaultKeySettings:
        """Disable every version below ``version`` at once (Vault's ``min_decryption_version``).

        ``version`` may also be lower than now, re-enabling versions down to it.

        :raises KeyNotFound: no such key or version.
        :raises KeyDisabled: versions below ``version`` include destroyed ones to re-enable.
        """
        name = self._name(key_id)
        settings = self._settings(self._read_key(name))
        if not isinstance(version, int) or not 1 <= version <= settings.latest_version:
            raise KeyNotFound(f"vault key {name!r} has no version {version}")
        if version < settings.min_available_version:
            raise KeyDisabled(f"versions below {settings.min_available_version} of {name!r} are destroyed")
        self._retire(name, settings, version)
        return self.key_settings(name)

    def set_min_encryption_version(self, key_id: str, version: int) -> VaultKeySettings:
        """Set Vault's ``min_encryption_version`` (0 = latest only limits nothing).

        :raises ConfigurationError: not 0 and not between ``min_decryption_version`` and the latest version.
        """
        name = self._name(key_id)
        settings = self._settings(self._read_key(name))
        if not isinstance(version, int) or (
            version != 0 and not settings.min_decryption_version <= version <= settings.latest_version
        ):
            raise ConfigurationError(
                f"min_encryption_version of {name!r} must be 0 or between {settings.min_decryption_version} "
                f"and {settings.latest_version}, not {version!r}"
            )
        self._configure(name, {"min_encryption_version": version})
        return self.key_settings(name)

    def set_auto_rotate_period(self, key_id: str, period: timedelta) -> VaultKeySettings:
        """Let Vault rotate the key itself every ``period`` (``timedelta(0)`` switches it off).

        :raises ConfigurationError: ``period`` is not a whole number of seconds, 0 or at least one hour.
        """
        if not isinstance(period, timedelta):
            raise ConfigurationError(f"auto_rotate_period must be a timedelta, not {type(period).__name__}")
        seconds = period.total_seconds()
        if seconds != int(seconds) or seconds < 0 or timedelta(0) < period < MIN_AUTO_ROTATE_PERIOD:
            raise ConfigurationError(
                f"auto_rotate_period must be 0 (off) or at least one hour in whole seconds, not {period}"
            )
        name = self._name(key_id)
        self._configure(name, {"auto_rotate_period": f"{int(seconds)}s"})
        return self.key_settings(name)

    def destroy_key(self, key_id: str) -> None:
        """Allow deletion and delete the key with every version. Irreversible."""
        name = self._name(key_id)
        self._configure(name, {"deletion_allowed": True})
        self._forget(name)
        try:
            self._request("DELETE", f"{self.mount}/keys/{name}")
        except _VaultRefusal as refusal:
            if refusal.says("not found"):
                raise KeyNotFound(f"vault key {name!r} does not exist") from None
            raise KMSError(f"vault refused to delete key {name!r}: {'; '.join(refusal.errors)}") from None

    # -- cryptography ----------------------------------------------------

    def _encrypt_refusal(self, name: str, refusal: _VaultRefusal) -> KMSError:
        if refusal.says("not found"):
            self._forget(name)
            return KeyNotFound(f"vault key {name!r} does not exist")
        if refusal.says("soft") or refusal.says(_TOO_OLD):
            return KeyDisabled(f"vault key {name!r} may not encrypt: {'; '.join(refusal.errors)}")
        return KMSError(f"vault refused to use key {name!r}: {'; '.join(refusal.errors)}")

    def _crypto_call(self, name: str, path: str, payload: dict) -> dict:
        """Encrypt-side call; a 403 on a key deleted meanwhile becomes ``KeyNotFound``."""
        try:
            return self._request("POST", path, payload).get("data") or {}
        except _VaultRefusal as refusal:
            raise self._encrypt_refusal(name, refusal) from None
        except AccessDenied:
            # Without "create" on encrypt/ Vault answers 403 for a key that is gone.
            self._forget(name)
            self._read_key(name)
            raise

    def encrypt(
        self, key_id: str, plaintext: bytes, *, encryption_context: EncryptionContext | None = None
    ) -> EncryptResult:
        name = self._usable_key(key_id)
        payload = {"plaintext": base64.b64encode(plaintext).decode("ascii"), "context": _context(encryption_context)}
        data = self._crypto_call(name, f"{self.mount}/encrypt/{name}", payload)
        return _packed(name, data.get("ciphertext") or "")

    def generate_data_key(
        self,
        key_id: str,
        *,
        encryption_context: EncryptionContext | None = None,
        key_spec: str = "AES_256",
    ) -> DataKey:
        length = self.key_length(key_spec)
        name = self._usable_key(key_id)
        payload = {"bits": length * 8, "context": _context(encryption_context)}
        data = self._crypto_call(name, f"{self.mount}/datakey/plaintext/{name}", payload)
        plaintext = bytearray(base64.b64decode(data.get("plaintext") or ""))
        if len(plaintext) != length:
            plaintext[:] = bytes(len(plaintext))
            raise KMSError(f"vault returned a data key of the wrong length for {name!r}")
        sealed = _packed(name, data.get("ciphertext") or "")
        return DataKey(plaintext=plaintext, ciphertext=sealed.ciphertext, key_id=name, key_version=sealed.key_version)

    def _open(self, operation: str, ciphertext: bytes, encryption_context: EncryptionContext | None):
        name, version, vault_ciphertext = unpack_ciphertext(ciphertext)
        payload = {"ciphertext": vault_ciphertext, "context": _context(encryption_context)}
        try:
            data = self._request("POST", f"{self.mount}/{operation}/{name}", payload).get("data") or {}
        except _VaultRefusal:
            # Every refusal, "too old" (below min_decryption_version) included, is the one opaque error:
            # Vault checks the version before it authenticates the ciphertext (README: "What a failed
            # decrypt reveals").
            raise InvalidCiphertext() from None
        return name, version, data

    def decrypt(self, ciphertext: bytes, *, encryption_context: EncryptionContext | None = None) -> DecryptResult:
        name, version, data = self._open("decrypt", ciphertext, encryption_context)
        try:
            plaintext = base64.b64decode(data.get("plaintext") or "", validate=True)
        except (binascii.Error, ValueError):
            raise KMSError(f"vault returned a malformed plaintext for {name!r}") from None
        return DecryptResult(plaintext=plaintext, key_id=name, key_version=version)

    def rewrap(
        self,
        ciphertext: bytes,
        *,
        encryption_context: EncryptionContext | None = None,
        key_id: str | None = None,
    ) -> EncryptResult:
        """Re-encrypt inside Vault under the key's latest version.

        Vault rewraps only within one key; to move to another ``key_id`` this
        decrypts and encrypts inside this object (the plaintext never reaches
        the caller, but it does cross the wire twice).
        """
        name = unpack_ciphertext(ciphertext)[0]
        if key_id is not None and key_id != name:
            return super().rewrap(ciphertext, encryption_context=encryption_context, key_id=key_id)
        name, _, data = self._open("rewrap", ciphertext, encryption_context)
        return _packed(name, data.get("ciphertext") or "")

    def rewrap_many(self, items: Sequence[RewrapItem], *, key_id: str | None = None) -> list[RewrapOutcome]:
        """Rewrap inside Vault with ``transit/rewrap/<key>`` and ``batch_input``, ``batch_size`` per request.

        Items are grouped by the key their ciphertext names and each moves to
        that key's latest version, with the context handled exactly as
        :meth:`rewrap` does (the key-derivation ``context``). Vault judges every
        item on its own; an item it refuses is :class:`InvalidCiphertext`, as
        from :meth:`rewrap`. Items bound for another ``key_id`` than their own
        go through :meth:`rewrap` one by one (Vault rewraps only within a key).
        A batch the server refuses as too big is split and the smaller size kept.

        :raises ProviderUnavailable: Vault is unreachable, sealed or throttling; retry the batch.
        """
        results: list = [None] * len(items)
        groups: dict[str, list[tuple[int, dict]]] = {}
        for index, item in enumerate(items):
            try:
                name, _, vault_ciphertext = unpack_ciphertext(item.ciphertext)
                if key_id is not None and key_id != name:
                    results[index] = self.rewrap(item.ciphertext, encryption_context=item.encryption_context, key_id=key_id)
                    continue
                entry = {"ciphertext": vault_ciphertext, "context": _context(item.encryption_context)}
            except ProviderUnavailable:
                raise
            except KMSError as exc:
                results[index] = exc
                continue
            groups.setdefault(name, []).append((index, entry))
        for name, entries in groups.items():
            start = 0
            while start < len(entries):
                chunk = entries[start : start + self.batch_size]
                for (index, _), outcome in zip(chunk, self._rewrap_chunk(name, [entry for _, entry in chunk]), strict=True):
                    results[index] = outcome
                start += len(chunk)
        return results

    def _rewrap_chunk(self, name: str, entries: list[dict]) -> list[RewrapOutcome]:
        """One ``batch_input`` request (split in halves if Vault finds it too big); an outcome per entry."""
        try:
            body = self._request("POST", f"{self.mount}/rewrap/{name}", {"batch_input": entries})
        except _VaultRefusal as refusal:
            # HashiCorp Vault answers 400 when items fail, with the per-item results in the body.
            body = refusal.body
            if not (body.get("data") or {}).get("batch_results"):
                if len(entries) > 1 and any(refusal.says(fragment) for fragment in _TOO_BIG):
                    self.batch_size = min(self.batch_size, len(entries) // 2)
                    half = len(entries) // 2
                    return self._rewrap_chunk(name, entries[:half]) + self._rewrap_chunk(name, entries[half:])
                # An unknown key: each ciphertext naming it is invalid, as rewrap says.
                return [InvalidCiphertext() for _ in entries]
        except ProviderUnavailable:
            raise
        except KMSError as exc:  # AccessDenied, ...: each item met it (the contract of rewrap_many)
            return [copy.copy(exc) for _ in entries]
        results = (body.get("data") or {}).get("batch_results") or []
        if len(results) != len(entries):
            return [KMSError(f"vault answered {len(results)} results for a rewrap batch of {len(entries)}") for _ in entries]
        return [self._rewrapped(name, result) for result in results]

    @staticmethod
    def _rewrapped(name: str, result: object) -> RewrapOutcome:
        """One item of ``batch_results``: the new ciphertext, or the opaque error :meth:`rewrap` gives."""
        if not isinstance(result, Mapping) or result.get("error") or not result.get("ciphertext"):
            return InvalidCiphertext()
        try:
            return _packed(name, str(result["ciphertext"]))
        except KMSError as exc:
            return exc

    # -- health ------------------------------------------------------------

    def health_check(self) -> HealthStatus:
        def probe() -> str:
            health = self._request("GET", "sys/health?standbyok=true&perfstandbyok=true")
            try:
                self._read_key(HEALTH_PROBE_KEY)
            except KeyNotFound:
                pass  # expected: the read proves token, policy and mount
            version = health.get("version", "?")
            return f"vault {version} at {self.addr}: unsealed, token accepted, {self.mount}/ reachable"

        return self.timed_health(probe)

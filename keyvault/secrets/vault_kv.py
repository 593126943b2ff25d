"""HashiCorp Vault / OpenBao KV version 2 as a secret source (hvac).

A path is ``<secret path>[#field]`` inside the KV v2 mount (``HMD_VAULT_KV_MOUNT``,
default ``secret``): ``payments/db#password`` is field ``password`` of the KV
secret ``payments/db``; without ``#`` the field is ``value``. Versions are KV
versions, which cover the whole KV secret (every field): writing one field
reads the current data, replaces that field and writes a new version with
``cas`` = the version read, so a concurrent writer makes us fail with
:class:`SecretConflict` instead of silently dropping their change.

``delete_version`` **destroys** the version (``PUT <mount>/destroy/<path>``),
it does not soft-delete it: a retired credential must not be recoverable with
``undelete`` by anyone holding that capability. Destroyed versions are still
listed by Vault, with state ``"destroyed"``; soft-deleted ones (done outside
Keyvault) show ``"deleted"``. The current version cannot be destroyed here.

Authentication reuses the Vault KMS provider's settings and classes: a token,
AppRole or Kubernetes service account (``HMD_VAULT_*``).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from keyvault.kms.loading import require_sdk

from .base import (
    CurrentVersionError,
    SecretAccessDenied,
    SecretConflict,
    SecretNotFound,
    SecretSource,
    SecretSourceConfigurationError,
    SecretSourceError,
    SecretSourceUnavailable,
    SecretVersion,
    SecretVersionInfo,
    require_path,
    require_value,
    split_field,
)

DEFAULT_FIELD = "value"
RELOGIN_AT = 0.8  # log in again after 80% of the token's lease


SDK_MODULES = {"hvac": "hvac", "http_errors": "requests.exceptions"}


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        # Vault gives nanoseconds ("2024-01-01T00:00:00.123456789Z"); Python takes microseconds.
        head, _, frac = value.rstrip("Z").partition(".")
        return datetime.fromisoformat(head + (f".{frac[:6]}" if frac else "")).replace(tzinfo=UTC)
    except ValueError:
        return None


class VaultKVSource(SecretSource):
    """Secrets in a Vault/OpenBao KV v2 mount; see the module docstring."""

    name = "vault"

    def __init__(
        self, addr: str, auth, *, mount: str = "secret", namespace: str = "", ca_cert: str = "", timeout: float = 10.0
    ) -> None:
        from keyvault.kms.vault import AppRoleAuth, KubernetesAuth, TokenAuth

        sdk = require_sdk(SDK_MODULES, package="hvac", user="the vault secret source", error=SecretSourceConfigurationError)
        hvac, self._http_errors = sdk.hvac, sdk.http_errors
        addr = (addr or "").rstrip("/")
        if not addr.startswith(("http://", "https://")):
            raise SecretSourceConfigurationError(f"HMD_VAULT_ADDR must be an http(s):// URL, not {addr!r}")
        mount = (mount or "").strip("/")
        if not mount or any(not part for part in mount.split("/")):
            raise SecretSourceConfigurationError(f"invalid KV mount path {mount!r} (HMD_VAULT_KV_MOUNT)")
        if not isinstance(auth, (TokenAuth, AppRoleAuth, KubernetesAuth)):
            raise SecretSourceConfigurationError("vault auth must be TokenAuth, AppRoleAuth or KubernetesAuth")
        if isinstance(auth, TokenAuth) and not auth.token:
            raise SecretSourceConfigurationError("the vault token is empty (HMD_VAULT_TOKEN)")
        if ca_cert and not Path(ca_cert).is_file():
            raise SecretSourceConfigurationError(f"the vault CA bundle {ca_cert} does not exist (HMD_VAULT_CACERT)")
        self.addr, self.mount, self.auth = addr, mount, auth
        self._hvac = hvac
        self._connection = {"url": addr, "verify": ca_cert or True, "timeout": timeout, "namespace": namespace or None}
        self._client = self._new_client(auth.token if isinstance(auth, TokenAuth) else "")
        self._login_lock = threading.Lock()
        self._token_deadline = 0.0

    @classmethod
    def from_config(cls, options: dict) -> VaultKVSource:
        """Build from the ``vault`` entry of ``SECRET_SOURCES`` (the ``HMD_VAULT_*`` variables)."""
        from keyvault.kms.errors import KMSError
        from keyvault.kms.vault import VaultTransitProvider

        try:
            # Same auth rules as the Transit provider; only the auth object is taken from it.
            transit = VaultTransitProvider.from_config({**options, "mount": "transit"})
        except KMSError as exc:
            raise SecretSourceConfigurationError(str(exc).replace("vault provider", "vault secret source")) from None
        try:
            timeout = float(options.get("timeout") or 10.0)
        except (TypeError, ValueError):
            raise SecretSourceConfigurationError("HMD_VAULT_TIMEOUT must be a number of seconds") from None
        return cls(
            options.get("addr") or "",
            transit.auth,
            mount=options.get("mount") or "secret",
            namespace=options.get("namespace") or "",
            ca_cert=options.get("ca_cert") or "",
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return f"VaultKVSource(addr={self.addr!r}, mount={self.mount!r}, auth={self.auth.method})"

    # -- transport -------------------------------------------------------

    def _ensure_token(self) -> None:
        if not self.auth.can_login:
            return
        with self._login_lock:
            if self._client.token and time.monotonic() < self._token_deadline:
                return
            from keyvault.kms.errors import KMSError

            self._client.token = ""
            try:
                response = self.auth.login(self._client)
            except self._http_errors.RequestException as exc:
                raise SecretSourceUnavailable(f"vault at {self.addr} is unreachable ({type(exc).__name__})") from None
            except KMSError as exc:
                raise SecretSourceConfigurationError(str(exc)) from None
            except Exception as exc:  # hvac.exceptions.*: a refused login
                raise SecretAccessDenied(f"vault refused the {self.auth.method} login ({type(exc).__name__})") from None
            lease = float((response.get("auth") or {}).get("lease_duration") or 0)
            self._token_deadline = time.monotonic() + lease * RELOGIN_AT if lease > 0 else float("inf")

    def _request(self, method: str, api_path: str, payload: dict | None = None, *, what: str) -> tuple[int, dict]:
        """Send one request; return ``(status, body)`` for 2xx, 400 and 404.

        :raises SecretAccessDenied, SecretSourceUnavailable, SecretSourceConfigurationError:
        """
        self._ensure_token()
        try:
            response = self._client.adapter.request(method, f"/v1/{api_path}", json=payload, raise_exception=False)
        except self._http_errors.SSLError:
            raise SecretSourceConfigurationError(f"TLS verification of {self.addr} failed; check HMD_VAULT_CACERT") from None
        except self._http_errors.RequestException as exc:
            raise SecretSourceUnavailable(f"vault at {self.addr} is unreachable ({type(exc).__name__})") from None
        if isinstance(response, dict):
            return 200, response
        status = response.status_code
        try:
            body = response.json() if response.content else {}
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        errors = "; ".join(" ".join(str(e).split()) for e in body.get("errors") or [])
        if status in (401, 403):
            raise SecretAccessDenied(f"vault denied {what}: {errors or 'permission denied'}")
        if status == 404 and "no handler for route" in errors:
            raise SecretSourceConfigurationError(f"vault at {self.addr} has no KV mount at {self.mount}/ (HMD_VAULT_KV_MOUNT?)")
        if status == 429 or status >= 500:
            raise SecretSourceUnavailable(f"vault at {self.addr} answered HTTP {status} to {what}: {errors or 'unavailable'}")
        if status < 300 or status in (400, 404):
            return status, body
        raise SecretSourceError(f"vault at {self.addr} answered HTTP {status} to {what}")

    def _new_client(self, token: str = ""):
        # token="" keeps hvac from falling back to VAULT_TOKEN or ~/.vault-token.
        return self._hvac.Client(token=token, **self._connection)

    def api(self, method: str, api_path: str, payload: dict | None = None, *, what: str) -> tuple[int, dict]:
        """One request to any path of this Vault, with this source's own login.

        For executors that administer Vault itself (``rotation.executors.approle``); returns
        ``(status, body)`` for 2xx, 400 and 404.

        :raises SecretAccessDenied, SecretSourceUnavailable, SecretSourceConfigurationError:
        """
        return self._request(method, api_path.lstrip("/"), payload, what=what)

    def try_login(self, auth) -> dict:
        """Log in with ``auth`` (e.g. an AppRole secret id) on a client of its own, then revoke that token.

        Proves a credential works without keeping what it gave; returns the login's ``auth``
        block (policies, lease), never used to send anything else.

        :raises SecretAccessDenied: Vault refused the login.
        :raises SecretSourceUnavailable: Vault is unreachable.
        """
        client = self._new_client()
        try:
            response = auth.login(client)
        except self._http_errors.RequestException as exc:
            raise SecretSourceUnavailable(f"vault at {self.addr} is unreachable ({type(exc).__name__})") from None
        except Exception as exc:  # hvac.exceptions.*: a refused login
            detail = "; ".join(getattr(exc, "errors", None) or []) or type(exc).__name__
            raise SecretAccessDenied(f"vault refused the {auth.method} login: {detail}") from None
        login = response.get("auth") or {}
        client.token = login.get("client_token") or ""
        if client.token:
            try:
                client.auth.token.revoke_self()
            except Exception:  # noqa: BLE001 - the proof stands; the token expires with its TTL
                pass
        return {key: value for key, value in login.items() if key not in ("client_token", "accessor")}

    def _url(self, kind: str, path: str) -> str:
        return f"{self.mount}/{kind}/{quote(path, safe='/')}"

    def _split(self, path: str) -> tuple[str, str]:
        base, field_name = split_field(require_path(path), DEFAULT_FIELD)
        base = base.strip("/")
        if not base or any(part in ("", ".", "..") for part in base.split("/")):
            raise SecretNotFound("a vault secret path has non-empty parts and no '.' or '..'")
        return base, field_name

    # -- the contract --------------------------------------------------------

    def _metadata(self, base: str) -> dict:
        status, body = self._request("GET", self._url("metadata", base), what=f"metadata of {base!r}")
        if status == 404:
            raise SecretNotFound(f"no vault secret {self.mount}/{base}")
        return body.get("data") or {}

    def read(self, path: str, *, version: str | None = None) -> SecretVersion:
        base, field_name = self._split(path)
        url = self._url("data", base)
        if version is not None:
            if not str(version).isdigit() or int(version) < 1:
                raise SecretNotFound("vault KV versions are positive integers")
            url += f"?version={int(version)}"
        status, body = self._request("GET", url, what=f"read of {base!r}")
        data = (body.get("data") or {}) if status == 200 else {}
        values = data.get("data")
        metadata = data.get("metadata") or {}
        if status != 200 or not isinstance(values, dict):
            which = f"version {version} of " if version else ""
            raise SecretNotFound(f"no {which}vault secret {self.mount}/{base} (missing, deleted or destroyed)")
        value = values.get(field_name)
        if not isinstance(value, str):
            raise SecretNotFound(f"vault secret {self.mount}/{base} has no text field {field_name!r}")
        number = str(metadata.get("version"))
        current = version is None or self._metadata(base).get("current_version") == int(number)
        created = _parse_time(metadata.get("created_time"))
        return SecretVersion(path=path, version=number, value=value, created_at=created, current=current)

    def write(self, path: str, value: str) -> SecretVersion:
        base, field_name = self._split(path)
        require_value(value)
        status, body = self._request("GET", self._url("data", base), what=f"read of {base!r}")
        data = (body.get("data") or {}) if status == 200 else {}
        existing = data.get("data") if isinstance(data.get("data"), dict) else {}
        if status == 200:
            cas = int((data.get("metadata") or {}).get("version") or 0)
        else:
            # Missing, or the current version deleted/destroyed: CAS against the metadata's current version.
            try:
                cas = int(self._metadata(base).get("current_version") or 0)
            except SecretNotFound:
                cas = 0
        payload = {"data": {**existing, field_name: value}, "options": {"cas": cas}}
        status, body = self._request("POST", self._url("data", base), payload, what=f"write of {base!r}")
        if status == 400:
            errors = " ".join(str(e) for e in body.get("errors") or [])
            if "check-and-set" in errors:
                raise SecretConflict(f"vault secret {self.mount}/{base} changed while we wrote it; read it again")
            raise SecretSourceError(f"vault refused the write of {self.mount}/{base}: {errors or 'bad request'}")
        if status == 404:
            raise SecretNotFound(f"vault has no KV v2 path {self.mount}/{base}")
        metadata = body.get("data") or {}
        return SecretVersion(
            path=path, version=str(metadata.get("version")), value=value,
            created_at=_parse_time(metadata.get("created_time")), current=True,
        )

    def list_versions(self, path: str) -> list[SecretVersionInfo]:
        base, _ = self._split(path)
        metadata = self._metadata(base)
        current = metadata.get("current_version")
        infos = []
        for number, info in sorted((metadata.get("versions") or {}).items(), key=lambda item: int(item[0])):
            state = "destroyed" if info.get("destroyed") else "deleted" if info.get("deletion_time") else "enabled"
            created = _parse_time(info.get("created_time"))
            infos.append(SecretVersionInfo(number, created, current=int(number) == current, state=state))
        return infos

    def delete_version(self, path: str, version: str) -> None:
        base, _ = self._split(path)
        if not str(version).isdigit():
            raise SecretNotFound("vault KV versions are positive integers")
        metadata = self._metadata(base)
        if str(int(version)) not in (metadata.get("versions") or {}):
            raise SecretNotFound(f"vault secret {self.mount}/{base} has no version {int(version)}")
        if int(version) == metadata.get("current_version"):
            raise CurrentVersionError(f"version {version} of {self.mount}/{base} is current; write a new version first")
        status, body = self._request(
            "PUT", self._url("destroy", base), {"versions": [int(version)]}, what=f"destroy of {base!r}"
        )
        if status >= 300:
            raise SecretSourceError(f"vault refused to destroy version {version} of {self.mount}/{base}")

    def health_check(self) -> tuple[bool, str]:
        try:
            status, body = self._request("GET", "sys/health", what="health")
        except SecretSourceError as exc:
            return False, str(exc)
        if body.get("sealed"):
            return False, f"vault at {self.addr} is sealed"
        return True, f"vault {body.get('version', '')} at {self.addr}, KV mount {self.mount}/".replace("  ", " ")

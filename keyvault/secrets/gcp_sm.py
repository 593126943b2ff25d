"""Google Cloud Secret Manager as a secret source (google-cloud-secret-manager, REST transport).

A path is a secret id (project from ``HMD_GCP_PROJECT``) or a full name
``projects/<p>/secrets/<s>``, optionally ``#field`` for one field of a payload
holding a JSON object. Versions are Secret Manager's version numbers ("1",
"2"…); the current version is ``latest``, the most recently added one.

* ``write`` creates the secret on first use (automatic replication), then
  ``addVersion`` with the payload's CRC32C, so the service refuses a payload
  damaged on the way.
* ``read`` accesses ``versions/<n>`` (or ``versions/latest``) and checks the
  payload against the ``dataCrc32c`` the service returned: a mismatch is
  :class:`SecretSourceUnavailable` (damaged in transit; retry), never a value.
* ``list_versions`` is oldest first (the service lists newest first), state
  ``enabled`` / ``disabled`` / ``destroyed``.
* ``delete_version`` **destroys** the version (its payload is discarded for
  good; the version stays listed as ``destroyed``). The latest cannot be destroyed here.

Like the Cloud KMS provider the client always uses the REST transport; a
plain-http ``HMD_GCP_SECRETMANAGER_ENDPOINT`` (an emulator) needs
``HMD_GCP_ANONYMOUS_CREDENTIALS=true``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime

from keyvault.kms.loading import require_sdk

from .base import (
    CurrentVersionError,
    SecretAccessDenied,
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

SDK_PACKAGE = "google-cloud-secret-manager"
_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_FULL_NAME = re.compile(r"^projects/(?P<project>[^/]+)/secrets/(?P<secret>[A-Za-z0-9_-]{1,255})$")
_STATUS_ERRORS: dict[str, type[SecretSourceError]] = {
    "NOT_FOUND": SecretNotFound,
    "FAILED_PRECONDITION": SecretNotFound,  # accessing a disabled or destroyed version
    "PERMISSION_DENIED": SecretAccessDenied,
    "UNAUTHENTICATED": SecretAccessDenied,
    "UNAVAILABLE": SecretSourceUnavailable,
    "DEADLINE_EXCEEDED": SecretSourceUnavailable,
    "INTERNAL": SecretSourceUnavailable,
    "RESOURCE_EXHAUSTED": SecretSourceUnavailable,
}
_HTTP_STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED"}


SDK_MODULES = {
    "sm": "google.cloud.secretmanager_v1",
    "exceptions": "google.api_core.exceptions",
    "auth_exceptions": "google.auth.exceptions",
    "credentials": "google.auth.credentials",
    "requests_exceptions": "requests.exceptions",
}


def _crc32c(data: bytes) -> int:
    from keyvault.kms.gcp import crc32c

    return crc32c(data)


def _as_datetime(value: object) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return datetime(*value.timetuple()[:6], value.microsecond, tzinfo=UTC)


class GCPSecretManagerSource(SecretSource):
    """Secrets in Google Cloud Secret Manager; see the module docstring."""

    name = "gcp"

    def __init__(
        self,
        project: str = "",
        *,
        endpoint: str = "",
        anonymous_credentials: bool = False,
        credentials=None,
        timeout: float = 10.0,
    ) -> None:
        if not project:
            raise SecretSourceConfigurationError("the gcp secret source needs a project: set HMD_GCP_PROJECT")
        try:
            timeout = float(timeout)
        except (TypeError, ValueError):
            raise SecretSourceConfigurationError("HMD_GCP_TIMEOUT must be a number of seconds") from None
        if timeout <= 0:
            raise SecretSourceConfigurationError("HMD_GCP_TIMEOUT must be a positive number of seconds")
        if endpoint.startswith("http://") and not (anonymous_credentials or credentials is not None):
            raise SecretSourceConfigurationError(
                "a plain-http HMD_GCP_SECRETMANAGER_ENDPOINT is only for emulators: set HMD_GCP_ANONYMOUS_CREDENTIALS too"
            )
        self.project, self.endpoint, self.timeout = project, endpoint, timeout
        sdk = require_sdk(SDK_MODULES, package=SDK_PACKAGE, user="the gcp secret source", error=SecretSourceConfigurationError)
        self._sdk = sdk
        if credentials is None and anonymous_credentials:
            credentials = sdk.credentials.AnonymousCredentials()
        try:
            self._client = sdk.sm.SecretManagerServiceClient(
                transport="rest",
                client_options={"api_endpoint": endpoint} if endpoint else None,
                credentials=credentials,
            )
        except sdk.auth_exceptions.DefaultCredentialsError as exc:
            raise SecretSourceConfigurationError(
                f"no Google credentials for Secret Manager (Application Default Credentials): {exc}"
            ) from None

    @classmethod
    def from_config(cls, options: dict) -> GCPSecretManagerSource:
        options = dict(options)
        project = options.pop("project", "")
        try:
            return cls(project, **options)
        except TypeError as exc:
            raise SecretSourceConfigurationError(f"gcp secret source: {exc}") from None

    def __repr__(self) -> str:
        return f"GCPSecretManagerSource(project={self.project!r}, endpoint={self.endpoint or 'default'!r})"

    # -- calling Google ----------------------------------------------------

    def _status_of(self, exc) -> str:
        response = getattr(exc, "response", None)
        if response is not None:
            try:
                status = response.json()["error"]["status"]
            except Exception:  # not Google's error JSON: fall back to the HTTP code
                status = None
            if isinstance(status, str) and status:
                return status
        return _HTTP_STATUSES.get(getattr(exc, "code", None), "UNKNOWN")

    def _call(self, rpc: str, request: dict):
        method: Callable = getattr(self._client, rpc)
        sdk = self._sdk
        try:
            return method(request=request, timeout=self.timeout)
        except sdk.exceptions.RetryError as exc:  # the SDK's default retry gave up on a transient error
            raise SecretSourceUnavailable(f"Secret Manager {rpc}: no answer within {self.timeout:g}s ({exc.cause})") from None
        except sdk.exceptions.GoogleAPICallError as exc:
            status = self._status_of(exc)
            error = _STATUS_ERRORS.get(status, SecretSourceError)
            raise error(f"Secret Manager {rpc}: {status}: {exc.message}") from None
        except (sdk.auth_exceptions.RefreshError, sdk.auth_exceptions.DefaultCredentialsError) as exc:
            raise SecretAccessDenied(f"Secret Manager {rpc}: credentials were refused ({type(exc).__name__})") from None
        except (sdk.requests_exceptions.RequestException, sdk.auth_exceptions.TransportError) as exc:
            where = self.endpoint or "secretmanager.googleapis.com"
            raise SecretSourceUnavailable(f"Secret Manager {rpc}: cannot reach {where}: {type(exc).__name__}") from None
        except ValueError:  # an answer that is not Google's JSON
            raise SecretSourceUnavailable(f"Secret Manager {rpc}: the answer was not a Secret Manager response") from None

    # -- names -------------------------------------------------------------

    def _split(self, path: str) -> tuple[str, str | None]:
        """``(secret resource name, JSON field or None)``."""
        base, field_name = split_field(require_path(path))
        if _SECRET_ID.match(base):
            return f"projects/{self.project}/secrets/{base}", field_name
        if _FULL_NAME.match(base):
            return base, field_name
        raise SecretNotFound("a gcp secret is a secret id ([A-Za-z0-9_-]) or projects/<p>/secrets/<id>")

    @staticmethod
    def _number(version_name: str) -> str:
        return version_name.rpartition("/")[2]

    @staticmethod
    def _version_id(version: object) -> str:
        if isinstance(version, int) or (isinstance(version, str) and version.isdigit() and int(version) >= 1):
            return str(int(version))
        raise SecretNotFound("gcp secret versions are positive integers")

    # -- the contract -----------------------------------------------------------

    def _access(self, secret: str, version: str) -> tuple[str, str]:
        response = self._call("access_secret_version", {"name": f"{secret}/versions/{version}"})
        data = bytes(response.payload.data)
        claimed = response.payload.data_crc32c if "data_crc32c" in response.payload else None
        if claimed is None or _crc32c(data) != claimed:
            raise SecretSourceUnavailable(f"Secret Manager returned a payload for {secret} that fails its CRC32C check")
        try:
            return self._number(response.name), data.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretSourceError(f"secret {secret} holds binary data, not UTF-8 text") from None

    def read(self, path: str, *, version: str | None = None) -> SecretVersion:
        secret, field_name = self._split(path)
        number, text = self._access(secret, "latest" if version is None else self._version_id(version))
        if field_name is not None:
            try:
                value = json.loads(text).get(field_name)
            except (ValueError, AttributeError):
                value = None
            if not isinstance(value, str):
                raise SecretNotFound(f"secret {secret} has no JSON text field {field_name!r}")
        else:
            value = text
        info = self._call("get_secret_version", {"name": f"{secret}/versions/{number}"})
        if version is None:
            latest = number
        else:
            latest = self._number(self._call("get_secret_version", {"name": f"{secret}/versions/latest"}).name)
        return SecretVersion(
            path=path, version=number, value=value, created_at=_as_datetime(info.create_time), current=number == latest
        )

    def write(self, path: str, value: str) -> SecretVersion:
        secret, field_name = self._split(path)
        require_value(value)
        text = value
        if field_name is not None:
            try:
                document = json.loads(self._access(secret, "latest")[1])
            except SecretNotFound:
                document = {}
            except ValueError:
                document = None
            if not isinstance(document, dict):
                raise SecretSourceError(f"secret {secret} is not a JSON object; cannot set field {field_name!r}")
            text = json.dumps({**document, field_name: value})
        data = text.encode("utf-8")
        request = {"parent": secret, "payload": {"data": data, "data_crc32c": _crc32c(data)}}
        try:
            created = self._call("add_secret_version", request)
        except SecretNotFound:
            parent, _, secret_id = secret.rpartition("/secrets/")
            try:
                self._call(
                    "create_secret",
                    {"parent": parent, "secret_id": secret_id, "secret": {"replication": {"automatic": {}}}},
                )
            except SecretSourceError as exc:
                if "ALREADY_EXISTS" not in str(exc):  # created meanwhile by someone else: fine
                    raise
            created = self._call("add_secret_version", request)
        return SecretVersion(
            path=path,
            version=self._number(created.name),
            value=value,
            created_at=_as_datetime(created.create_time),
            current=True,
        )

    def _versions(self, secret: str) -> list:
        pager = self._call("list_secret_versions", {"parent": secret})
        try:
            return sorted(pager, key=lambda v: int(self._number(v.name)))
        except self._sdk.exceptions.GoogleAPICallError as exc:  # a later page failed
            raise _STATUS_ERRORS.get(self._status_of(exc), SecretSourceError)(f"Secret Manager list: {exc.message}") from None

    def list_versions(self, path: str) -> list[SecretVersionInfo]:
        secret, _ = self._split(path)
        versions = self._versions(secret)
        if not versions:
            raise SecretNotFound(f"secret {secret} has no versions")
        latest = self._number(versions[-1].name)
        return [
            SecretVersionInfo(
                version=self._number(v.name),
                created_at=_as_datetime(v.create_time),
                current=self._number(v.name) == latest,
                state=v.state.name.lower(),
            )
            for v in versions
        ]

    def delete_version(self, path: str, version: str) -> None:
        secret, _ = self._split(path)
        number = self._version_id(version)
        versions = [self._number(v.name) for v in self._versions(secret)]
        if number not in versions:
            raise SecretNotFound(f"secret {secret} has no version {number}")
        if number == versions[-1]:
            raise CurrentVersionError(f"version {number} of {secret} is the latest; add a new version first")
        self._call("destroy_secret_version", {"name": f"{secret}/versions/{number}"})

    def health_check(self) -> tuple[bool, str]:
        try:
            self._call("list_secrets", {"parent": f"projects/{self.project}", "page_size": 1})
        except SecretSourceError as exc:
            return False, str(exc)
        return True, f"Secret Manager project {self.project} at {self.endpoint or 'secretmanager.googleapis.com'}"

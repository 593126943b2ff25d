"""Kubernetes Secrets through the API server (``/api/v1/namespaces/{ns}/secrets/{name}``).

A path is ``[namespace/]name[#key]``: one key of one Secret (key ``value``
when none is given; namespace ``HMD_K8S_NAMESPACE``, else the pod's own from
the service-account folder, else ``default``). For Secrets *mounted* into the
pod, use the ``file`` source instead: it reads the kubelet's layout and follows
its ``..data`` symlink swaps.

Kubernetes keeps no history: :meth:`list_versions` returns only the current
version, whose id is the Secret's ``resourceVersion``; reading any other
version, or deleting one, is :class:`SecretNotFound`. :meth:`write` replaces
the Secret with ``PUT`` carrying the ``resourceVersion`` it read (optimistic
concurrency: someone else's change in between is HTTP 409, raised as
:class:`SecretConflict`), and creates it with ``POST`` when it does not exist.
Other keys of the Secret are kept.

The bearer token is read from ``HMD_K8S_TOKEN_PATH`` (the projected
service-account token, which the kubelet rotates) on every request, through
the change-aware file cache. No SDK: plain HTTPS with ``urllib``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import ssl
import urllib.error
import urllib.request
from datetime import datetime
from urllib.parse import quote

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
from .files import read_text_cached

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_KEY = "value"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


class KubernetesSecretSource(SecretSource):
    """Keys of Kubernetes Secrets through the API; see the module docstring."""

    name = "k8s"

    def __init__(
        self,
        api_url: str = "https://kubernetes.default.svc",
        *,
        namespace: str = "",
        token_path: str = f"{SERVICE_ACCOUNT_DIR}/token",
        ca_cert: str = "",
        timeout: float = 10.0,
    ) -> None:
        api_url = (api_url or "").rstrip("/")
        if not api_url.startswith(("http://", "https://")):
            raise SecretSourceConfigurationError(f"HMD_K8S_API_URL must be an http(s):// URL, not {api_url!r}")
        if not namespace:
            try:
                namespace = read_text_cached(f"{SERVICE_ACCOUNT_DIR}/namespace")[0].strip()
            except SecretSourceError:
                namespace = "default"
        if not _NAMESPACE.match(namespace):
            raise SecretSourceConfigurationError(f"HMD_K8S_NAMESPACE {namespace!r} is not a namespace name")
        try:
            self.timeout = float(timeout)
        except (TypeError, ValueError):
            raise SecretSourceConfigurationError("HMD_K8S_TIMEOUT must be a number of seconds") from None
        if not ca_cert and os.path.exists(f"{SERVICE_ACCOUNT_DIR}/ca.crt"):
            ca_cert = f"{SERVICE_ACCOUNT_DIR}/ca.crt"
        if ca_cert and not os.path.isfile(ca_cert):
            raise SecretSourceConfigurationError(f"the Kubernetes CA bundle {ca_cert} does not exist (HMD_K8S_CACERT)")
        self.api_url, self.namespace, self.token_path = api_url, namespace, token_path
        self._ssl = ssl.create_default_context(cafile=ca_cert or None) if api_url.startswith("https://") else None

    def __repr__(self) -> str:
        return f"KubernetesSecretSource({self.api_url!r}, namespace={self.namespace!r})"

    # -- HTTP --------------------------------------------------------------

    def _token(self) -> str:
        try:
            token = read_text_cached(self.token_path)[0].strip()
        except SecretNotFound:
            raise SecretSourceConfigurationError(
                f"no Kubernetes service-account token at {self.token_path} (HMD_K8S_TOKEN_PATH)"
            ) from None
        if not token:
            raise SecretSourceConfigurationError(f"the Kubernetes token file {self.token_path} is empty")
        return token

    def _request(self, method: str, url_path: str, body: dict | None = None, *, auth: bool = True) -> tuple[int, dict]:
        """Return ``(status, JSON)`` for 2xx, 404 and 409; raise the rest as typed errors."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.api_url}{url_path}", data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", f"Bearer {self._token()}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._ssl) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except ssl.SSLError:
            raise SecretSourceConfigurationError(f"TLS verification of {self.api_url} failed; check HMD_K8S_CACERT") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SecretSourceUnavailable(f"the Kubernetes API at {self.api_url} is unreachable ({type(reason).__name__})") from None
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        answer = answer if isinstance(answer, dict) else {}
        message = str(answer.get("message") or "")[:300]
        if status in (401, 403):
            raise SecretAccessDenied(f"the Kubernetes API refused {method} {url_path}: {message or status}")
        if status == 429 or status >= 500:
            raise SecretSourceUnavailable(f"the Kubernetes API answered HTTP {status}: {message}")
        if status < 300 or status in (404, 409):
            return status, answer
        raise SecretSourceError(f"the Kubernetes API answered HTTP {status} to {method} {url_path}: {message}")

    # -- paths -------------------------------------------------------------

    def _split(self, path: str) -> tuple[str, str, str]:
        base, key = split_field(require_path(path), DEFAULT_KEY)
        namespace, _, name = base.rpartition("/")
        namespace = namespace or self.namespace
        if not _NAMESPACE.match(namespace) or not _NAME.match(name) or not _KEY.match(key):
            raise SecretNotFound("a k8s secret path is [namespace/]name[#key] with Kubernetes names")
        return namespace, name, key

    @staticmethod
    def _url(namespace: str, name: str | None = None) -> str:
        base = f"/api/v1/namespaces/{quote(namespace)}/secrets"
        return f"{base}/{quote(name)}" if name else base

    def _get(self, namespace: str, name: str) -> dict | None:
        status, secret = self._request("GET", self._url(namespace, name))
        return secret if status == 200 else None

    # -- the contract --------------------------------------------------------

    def read(self, path: str, *, version: str | None = None) -> SecretVersion:
        namespace, name, key = self._split(path)
        secret = self._get(namespace, name)
        if secret is None:
            raise SecretNotFound(f"no Kubernetes Secret {namespace}/{name}")
        metadata = secret.get("metadata") or {}
        current = str(metadata.get("resourceVersion"))
        if version is not None and str(version) != current:
            raise SecretNotFound(f"Kubernetes keeps only the current version of {namespace}/{name}")
        encoded = (secret.get("data") or {}).get(key)
        if encoded is None:
            raise SecretNotFound(f"Kubernetes Secret {namespace}/{name} has no key {key!r}")
        try:
            value = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise SecretSourceError(f"key {key!r} of {namespace}/{name} is not base64 UTF-8 text") from None
        return SecretVersion(path=path, version=current, value=value, created_at=None, current=True)

    def write(self, path: str, value: str) -> SecretVersion:
        namespace, name, key = self._split(path)
        require_value(value)
        encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")
        secret = self._get(namespace, name)
        if secret is None:
            body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                    "type": "Opaque", "data": {key: encoded}}
            status, stored = self._request("POST", self._url(namespace), body)
        else:
            body = {**secret, "data": {**(secret.get("data") or {}), key: encoded}}
            # metadata.resourceVersion rides along: the API server refuses it if the Secret changed since.
            status, stored = self._request("PUT", self._url(namespace, name), body)
        if status == 409:
            raise SecretConflict(f"Kubernetes Secret {namespace}/{name} changed while we wrote it; read it again")
        if status == 404:
            raise SecretConflict(f"Kubernetes Secret {namespace}/{name} was deleted while we wrote it")
        version = str((stored.get("metadata") or {}).get("resourceVersion"))
        return SecretVersion(path=path, version=version, value=value, created_at=None, current=True)

    def list_versions(self, path: str) -> list[SecretVersionInfo]:
        namespace, name, key = self._split(path)
        secret = self._get(namespace, name)
        if secret is None or key not in (secret.get("data") or {}):
            raise SecretNotFound(f"no key {key!r} in Kubernetes Secret {namespace}/{name}")
        metadata = secret.get("metadata") or {}
        created = _parse_time(metadata.get("creationTimestamp"))
        return [SecretVersionInfo(str(metadata.get("resourceVersion")), created, current=True)]

    def delete_version(self, path: str, version: str) -> None:
        namespace, name, _ = self._split(path)
        current = self.list_versions(path)[0].version
        if str(version) == current:
            raise CurrentVersionError(f"{namespace}/{name} has only its current version; write a new value instead")
        raise SecretNotFound(f"Kubernetes keeps only the current version of {namespace}/{name}")

    def health_check(self) -> tuple[bool, str]:
        try:
            _, answer = self._request("GET", "/version", auth=False)
        except SecretSourceError as exc:
            return False, str(exc)
        return True, f"Kubernetes {answer.get('gitVersion', '?')} at {self.api_url}, namespace {self.namespace}"

"""A small Kubernetes API server for Secrets, for tests: the real endpoints' JSON, no cluster.

Serves, on ``http://127.0.0.1:<port>``, what the Kubernetes API reference
(https://kubernetes.io/docs/reference/kubernetes-api/config-and-storage-resources/secret-v1/)
documents for core/v1 Secrets:

* ``GET /api/v1/namespaces/{ns}/secrets/{name}`` — the Secret (``kind``,
  ``apiVersion``, ``metadata`` with ``uid``, ``resourceVersion``,
  ``creationTimestamp``; ``type``; ``data`` values base64).
* ``PUT /api/v1/namespaces/{ns}/secrets/{name}`` — replace. With
  ``metadata.resourceVersion`` it is a conditional update: a stale one is
  ``409 Conflict`` ("the object has been modified"); without one the update is
  unconditional. Secrets cannot be created by PUT (404), the body's name and
  namespace must match the URL (400), ``stringData`` is merged into ``data``.
* ``POST /api/v1/namespaces/{ns}/secrets`` — create; an existing name is
  ``409 AlreadyExists``.
* ``GET /version`` — the server version (what health checks call).

Errors are ``Status`` objects (``{"kind": "Status", "apiVersion": "v1",
"status": "Failure", "message", "reason", "details", "code"}``) as the API
server sends them. Every request but ``/version`` needs ``Authorization:
Bearer <token>`` with a token from :attr:`K8sAPIServer.tokens` (token ->
namespaces it may use, ``"*"`` for all); a missing/unknown token is 401, a
namespace outside the token's list is 403 Forbidden. ``resourceVersion`` is
one server-wide counter, as etcd's revision is.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_SECRET = re.compile(r"^/api/v1/namespaces/(?P<ns>[a-z0-9-]+)/secrets/(?P<name>[^/]+)$")
_COLLECTION = re.compile(r"^/api/v1/namespaces/(?P<ns>[a-z0-9-]+)/secrets$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


class _Failure(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _not_found(name: str) -> _Failure:
    return _Failure(404, "NotFound", f'secrets "{name}" not found', {"name": name, "kind": "secrets"})


class K8sAPIServer:
    """Secrets of a pretend cluster; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.tokens: dict[str, set[str]] = {}
        self._secrets: dict[tuple[str, str], dict] = {}
        self._revision = 1000
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> K8sAPIServer:
        if self._server is None:
            server = _Server((self.host, self.port), _Handler)
            server.api = self
            self.port = server.server_address[1]
            self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()
            self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> K8sAPIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add_token(self, namespaces: set[str] | str = "*") -> str:
        token = uuid.uuid4().hex
        self.tokens[token] = {namespaces} if isinstance(namespaces, str) else set(namespaces)
        return token

    # -- direct access for tests (what kubectl would do) -----------------------------

    def put_secret(self, namespace: str, name: str, data: dict[str, str]) -> dict:
        """Create or replace a Secret outside the API (an operator with kubectl)."""
        with self._lock:
            existing = self._secrets.get((namespace, name))
            body = {"metadata": {"name": name, "namespace": namespace}, "data": _encode(data)}
            return self._store(namespace, name, body, existing)

    def secret(self, namespace: str, name: str) -> dict | None:
        with self._lock:
            stored = self._secrets.get((namespace, name))
            return json.loads(json.dumps(stored)) if stored else None

    # -- HTTP ------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, body: bytes, authorization: str) -> tuple[int, dict]:
        path = unquote(urlsplit(raw_path).path)
        try:
            if path == "/version" and method == "GET":
                return 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-keyvault-test", "platform": "linux/amd64"}
            token = authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None
            if token not in self.tokens:
                raise _Failure(401, "Unauthorized", "Unauthorized")
            match = _SECRET.match(path) or _COLLECTION.match(path)
            if match is None:
                raise _Failure(404, "NotFound", "the server could not find the requested resource")
            namespace, name = match.group("ns"), match.groupdict().get("name")
            verb = {"GET": "get", "PUT": "update", "POST": "create"}.get(method)
            if verb is None or (name is None) != (method == "POST"):
                raise _Failure(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            allowed = self.tokens[token]
            if "*" not in allowed and namespace not in allowed:
                subject = f"secrets \"{name}\" is forbidden: " if name else "secrets is forbidden: "
                raise _Failure(
                    403,
                    "Forbidden",
                    f'{subject}User "system:serviceaccount:{namespace}:keyvault" cannot {verb} resource "secrets" '
                    f'in API group "" in the namespace "{namespace}"',
                    {"name": name or "", "kind": "secrets"},
                )
            payload = None
            if method in ("PUT", "POST"):
                try:
                    payload = json.loads(body)
                except ValueError:
                    raise _Failure(400, "BadRequest", "the body of the request was in an unknown format") from None
                if not isinstance(payload, dict):
                    raise _Failure(400, "BadRequest", "the body of the request was in an unknown format")
            with self._lock:
                if method == "GET":
                    stored = self._secrets.get((namespace, name))
                    if stored is None:
                        raise _not_found(name)
                    return 200, stored
                if method == "POST":
                    name = (payload.get("metadata") or {}).get("name") or ""
                    if (namespace, name) in self._secrets:
                        raise _Failure(409, "AlreadyExists", f'secrets "{name}" already exists', {"name": name, "kind": "secrets"})
                    return 201, self._store(namespace, name, payload, None)
                stored = self._secrets.get((namespace, name))
                if stored is None:
                    raise _not_found(name)
                metadata = payload.get("metadata") or {}
                if metadata.get("name") != name:
                    raise _Failure(
                        400, "BadRequest", f"the name of the object ({metadata.get('name')}) does not match the name on the URL ({name})"
                    )
                if metadata.get("namespace", namespace) != namespace:
                    raise _Failure(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request")
                wanted = metadata.get("resourceVersion")
                if wanted and wanted != stored["metadata"]["resourceVersion"]:
                    raise _Failure(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on secrets "{name}": the object has been modified; '
                        "please apply your changes to the latest version and try again",
                        {"name": name, "kind": "secrets"},
                    )
                return 200, self._store(namespace, name, payload, stored)
        except _Failure as failure:
            return failure.code, failure.status()

    def _store(self, namespace: str, name: str, payload: dict, existing: dict | None) -> dict:
        if not _DNS_SUBDOMAIN.match(name or "") or len(name) > 253:
            raise _Failure(422, "Invalid", f'Secret "{name}" is invalid: metadata.name: Invalid value: "{name}"',
                           {"name": name, "kind": "Secret"})
        data = dict(payload.get("data") or {})
        for key, value in data.items():
            if not _KEY.match(key):
                raise _Failure(422, "Invalid", f'Secret "{name}" is invalid: data[{key}]: Invalid value: "{key}"',
                               {"name": name, "kind": "Secret"})
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise _Failure(400, "BadRequest", f"illegal base64 data in data[{key}]") from None
        for key, value in (payload.get("stringData") or {}).items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        self._revision += 1
        metadata = {
            "name": name,
            "namespace": namespace,
            "uid": existing["metadata"]["uid"] if existing else str(uuid.uuid4()),
            "resourceVersion": str(self._revision),
            "creationTimestamp": existing["metadata"]["creationTimestamp"]
            if existing
            else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        stored = {"kind": "Secret", "apiVersion": "v1", "metadata": metadata, "type": payload.get("type") or "Opaque"}
        if data:
            stored["data"] = data
        self._secrets[(namespace, name)] = stored
        return stored


def _encode(data: dict[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: K8sAPIServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, answer = self.server.api.handle(self.command, self.path, body, self.headers.get("Authorization", ""))
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # bodies carry secret data

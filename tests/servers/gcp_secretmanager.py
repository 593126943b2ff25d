"""An emulator of the Google Cloud Secret Manager v1 REST API, for tests.

This is **an emulator of the documented API, written from Google's public REST
reference** (https://cloud.google.com/secret-manager/docs/reference/rest and the
field documentation shipped in ``google-cloud-secret-manager``). It is not
Google's code and proves nothing about Google's servers beyond what that
reference says; it lets the real client, over its real REST transport, run on
127.0.0.1 without a Google account.

Implemented (global secrets only, no ``locations/`` variants):

* ``projects.secrets``: create (``POST .../secrets?secretId=``, body a Secret
  with ``replication``), get, list (paged), delete.
* ``:addVersion`` (``payload.data`` base64, optional ``payload.dataCrc32c``
  checked against the data: a mismatch is ``INVALID_ARGUMENT``).
* ``versions``: get, list (paged, newest first, as the service lists them),
  ``:access`` (``payload.data`` + ``payload.dataCrc32c``; ``latest`` = the most
  recently created version), ``:disable``, ``:enable``, ``:destroy`` (the payload
  is discarded; ``destroyTime`` set).

JSON as Google maps it: camelCase, bytes base64, int64 (``dataCrc32c``) as
decimal strings, RFC 3339 times, enums as names or as numbers when the client
asks with ``$alt=json;enum-encoding=int`` (the Python client does). Errors are
``{"error": {"code": <http>, "message": ..., "status": "NOT_FOUND"}}``:
missing resources ``NOT_FOUND`` (404), a secret that exists ``ALREADY_EXISTS``
(409), accessing a disabled or destroyed version and enabling a destroyed one
``FAILED_PRECONDITION`` (400), bad ids and payloads ``INVALID_ARGUMENT`` (400).
Resource names keep the project id the caller used (the real service answers
with the project *number*).

Test hooks: :meth:`SecretManagerEmulator.fail_next` answers the next requests
with an error status, :meth:`~SecretManagerEmulator.corrupt_next_payload` flips
one bit of the next accessed payload (keeping its CRC32C, to prove the client
checks it), :meth:`~SecretManagerEmulator.stop` / :meth:`~SecretManagerEmulator.start`
simulate an outage on the same port. A bearer token, when sent, is ignored
unless :attr:`~SecretManagerEmulator.denied_token` names it (then
``PERMISSION_DENIED``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from tests.servers.gcp_kms import HTTP_STATUS, crc32c

MAX_PAYLOAD = 64 * 1024  # documented: "The secret payload of the SecretVersion ... must be no larger than 64KiB"
DEFAULT_PAGE_SIZE = 25000
MAX_PAGE_SIZE = 25000
STATE = {"STATE_UNSPECIFIED": 0, "ENABLED": 1, "DISABLED": 2, "DESTROYED": 3}
_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")

_PROJECT = r"projects/(?P<project>[^/:]+)"
_SECRET = rf"{_PROJECT}/secrets/(?P<secret>[^/:]+)"
_VERSION = rf"{_SECRET}/versions/(?P<version>[^/:]+)"


class ApiError(Exception):
    """A Secret Manager error answer: canonical status name and message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict:
        return {"error": {"code": HTTP_STATUS[self.status], "message": self.message, "status": self.status}}


@dataclass
class _Version:
    number: int
    data: bytes | None
    created: float
    state: str = "ENABLED"
    destroyed: float | None = None
    client_checksum: bool = False


@dataclass
class _Secret:
    name: str
    created: float
    replication: dict
    labels: dict
    versions: list[_Version] = field(default_factory=list)


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class SecretManagerEmulator:
    """Secret Manager v1 REST on ``http://127.0.0.1:<port>``, served from a thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._secrets: dict[str, _Secret] = {}
        self._failures: list[list] = []  # [status, remaining]
        self._corrupt = 0
        self.denied_token: str | None = None
        #: ``(http method, path)`` of every request, oldest first.
        self.calls: list[tuple[str, str]] = []

    # -- lifecycle -------------------------------------------------------

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the emulator has not been started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> SecretManagerEmulator:
        if self._server is None:
            server = _Server((self.host, self.port), _Handler)
            server.emulator = self
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
            if self._thread is not None:
                self._thread.join(timeout=5)

    def __enter__(self) -> SecretManagerEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- test hooks --------------------------------------------------------

    def fail_next(self, status: str, times: int = 1) -> None:
        if status not in HTTP_STATUS:
            raise ValueError(f"unknown status {status!r}")
        with self._lock:
            self._failures.append([status, times])

    def corrupt_next_payload(self, times: int = 1) -> None:
        with self._lock:
            self._corrupt += times

    # -- dispatch ----------------------------------------------------------

    _ROUTES = [
        ("POST", re.compile(rf"^{_PROJECT}/secrets$"), "createSecret"),
        ("GET", re.compile(rf"^{_PROJECT}/secrets$"), "listSecrets"),
        ("GET", re.compile(rf"^{_SECRET}$"), "getSecret"),
        ("DELETE", re.compile(rf"^{_SECRET}$"), "deleteSecret"),
        ("POST", re.compile(rf"^{_SECRET}:addVersion$"), "addSecretVersion"),
        ("GET", re.compile(rf"^{_SECRET}/versions$"), "listSecretVersions"),
        ("GET", re.compile(rf"^{_VERSION}$"), "getSecretVersion"),
        ("GET", re.compile(rf"^{_VERSION}:access$"), "accessSecretVersion"),
        ("POST", re.compile(rf"^{_VERSION}:disable$"), "disableSecretVersion"),
        ("POST", re.compile(rf"^{_VERSION}:enable$"), "enableSecretVersion"),
        ("POST", re.compile(rf"^{_VERSION}:destroy$"), "destroySecretVersion"),
    ]

    def handle(self, method: str, raw_path: str, body: bytes, authorization: str = "") -> tuple[int, dict]:
        split = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        path = unquote(split.path)
        ints = "enum-encoding=int" in query.get("$alt", "")
        try:
            if not path.startswith("/v1/"):
                raise ApiError("NOT_FOUND", f"The requested URL {path} was not found on this server.")
            resource = path[len("/v1/") :]
            for route_method, pattern, rpc in self._ROUTES:
                match = pattern.match(resource)
                if match and route_method == method:
                    break
            else:
                raise ApiError("UNIMPLEMENTED", f"the emulator does not implement {method} {path}")
            self.calls.append((method, path))
            if self.denied_token and authorization == f"Bearer {self.denied_token}":
                raise ApiError("PERMISSION_DENIED", "Permission denied on resource (or it may not exist).")
            try:
                payload = json.loads(body) if body else {}
            except ValueError:
                raise ApiError("INVALID_ARGUMENT", "Invalid JSON payload received.") from None
            if not isinstance(payload, dict):
                raise ApiError("INVALID_ARGUMENT", "Invalid JSON payload received.")
            with self._lock:
                for failure in self._failures:
                    if failure[1] > 0:
                        failure[1] -= 1
                        raise ApiError(failure[0], f"injected {failure[0]} (emulator fault)")
                answer = getattr(self, "_rpc_" + rpc)(match.groupdict(), query, payload)
            if ints:
                answer = _int_enums(answer)
            return 200, answer
        except ApiError as error:
            return HTTP_STATUS[error.status], error.body()

    # -- resources -----------------------------------------------------------

    def _secret(self, params: dict) -> _Secret:
        name = f"projects/{params['project']}/secrets/{params['secret']}"
        secret = self._secrets.get(name)
        if secret is None:
            raise ApiError("NOT_FOUND", f"Secret [{name}] not found or has no versions.")
        return secret

    def _version(self, params: dict) -> tuple[_Secret, _Version]:
        secret = self._secret(params)
        wanted = params["version"]
        if wanted == "latest":
            if not secret.versions:
                raise ApiError("NOT_FOUND", f"Secret [{secret.name}] not found or has no versions.")
            return secret, secret.versions[-1]
        if not wanted.isdigit() or wanted != str(int(wanted)) or int(wanted) < 1:
            raise ApiError("INVALID_ARGUMENT", f"Invalid secret version id: {wanted}")
        for version in secret.versions:
            if version.number == int(wanted):
                return secret, version
        raise ApiError("NOT_FOUND", f"Secret Version [{secret.name}/versions/{wanted}] not found.")

    @staticmethod
    def _secret_json(secret: _Secret) -> dict:
        answer = {
            "name": secret.name,
            "replication": secret.replication,
            "createTime": _timestamp(secret.created),
            "etag": f'"{int(secret.created * 1e6):x}"',
        }
        if secret.labels:
            answer["labels"] = secret.labels
        return answer

    @staticmethod
    def _version_json(secret: _Secret, version: _Version) -> dict:
        answer = {
            "name": f"{secret.name}/versions/{version.number}",
            "createTime": _timestamp(version.created),
            "state": version.state,
            "replicationStatus": {"automatic": {}},
            "etag": f'"{int(version.created * 1e6):x}{version.state[0]}"',
            "clientSpecifiedPayloadChecksum": version.client_checksum,
        }
        if version.destroyed is not None:
            answer["destroyTime"] = _timestamp(version.destroyed)
        return answer

    @staticmethod
    def _page(items: list, query: dict, key: str) -> dict:
        try:
            size = int(query.get("pageSize") or DEFAULT_PAGE_SIZE)
            start = int(query.get("pageToken") or 0)
        except ValueError:
            raise ApiError("INVALID_ARGUMENT", "Invalid pageSize or pageToken.") from None
        if size < 0 or start < 0:
            raise ApiError("INVALID_ARGUMENT", "pageSize must not be negative.")
        size = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        answer = {key: items[start : start + size], "totalSize": len(items)} if items else {}
        if start + size < len(items):
            answer["nextPageToken"] = str(start + size)
        return answer

    # -- RPCs ------------------------------------------------------------------

    def _rpc_createSecret(self, params: dict, query: dict, payload: dict) -> dict:
        secret_id = query.get("secretId", "")
        if not _SECRET_ID.match(secret_id):
            raise ApiError("INVALID_ARGUMENT", "secret_id must match [a-zA-Z0-9_-]{1,255}.")
        replication = payload.get("replication")
        if not isinstance(replication, dict) or not (set(replication) & {"automatic", "userManaged"}):
            raise ApiError("INVALID_ARGUMENT", "Secret.replication is required.")
        name = f"projects/{params['project']}/secrets/{secret_id}"
        if name in self._secrets:
            raise ApiError("ALREADY_EXISTS", f"Secret [{name}] already exists.")
        secret = _Secret(name=name, created=time.time(), replication=replication, labels=payload.get("labels") or {})
        self._secrets[name] = secret
        return self._secret_json(secret)

    def _rpc_listSecrets(self, params: dict, query: dict, payload: dict) -> dict:
        prefix = f"projects/{params['project']}/secrets/"
        items = [self._secret_json(s) for n, s in sorted(self._secrets.items()) if n.startswith(prefix)]
        return self._page(items, query, "secrets")

    def _rpc_getSecret(self, params: dict, query: dict, payload: dict) -> dict:
        return self._secret_json(self._secret(params))

    def _rpc_deleteSecret(self, params: dict, query: dict, payload: dict) -> dict:
        del self._secrets[self._secret(params).name]
        return {}

    def _rpc_addSecretVersion(self, params: dict, query: dict, payload: dict) -> dict:
        secret = self._secret(params)
        body = payload.get("payload")
        if not isinstance(body, dict) or not isinstance(body.get("data"), str):
            raise ApiError("INVALID_ARGUMENT", "SecretPayload.data is required.")
        try:
            data = base64.b64decode(body["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("INVALID_ARGUMENT", "Invalid value at 'payload.data' (TYPE_BYTES).") from None
        if len(data) > MAX_PAYLOAD:
            raise ApiError("INVALID_ARGUMENT", "Secret Payload cannot be larger than 65536 bytes.")
        claimed = body.get("dataCrc32c")
        if claimed is not None:
            try:
                claimed = int(claimed)
            except (TypeError, ValueError):
                raise ApiError("INVALID_ARGUMENT", "Invalid value at 'payload.data_crc32c' (TYPE_INT64).") from None
            if claimed != crc32c(data):
                raise ApiError("INVALID_ARGUMENT", "Checksum mismatch: the provided data_crc32c does not match the data.")
        number = secret.versions[-1].number + 1 if secret.versions else 1
        version = _Version(number=number, data=data, created=time.time(), client_checksum=claimed is not None)
        secret.versions.append(version)
        return self._version_json(secret, version)

    def _rpc_listSecretVersions(self, params: dict, query: dict, payload: dict) -> dict:
        if query.get("filter"):
            raise ApiError("UNIMPLEMENTED", "the emulator does not implement list filters")
        secret = self._secret(params)
        items = [self._version_json(secret, v) for v in reversed(secret.versions)]  # newest first
        return self._page(items, query, "versions")

    def _rpc_getSecretVersion(self, params: dict, query: dict, payload: dict) -> dict:
        return self._version_json(*self._version(params))

    def _rpc_accessSecretVersion(self, params: dict, query: dict, payload: dict) -> dict:
        secret, version = self._version(params)
        if version.state != "ENABLED":
            raise ApiError(
                "FAILED_PRECONDITION", f"Secret Version [{secret.name}/versions/{version.number}] is in {version.state} state."
            )
        data = version.data or b""
        answer_data = data
        if self._corrupt > 0 and data:
            self._corrupt -= 1
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0x01
            answer_data = bytes(damaged)
        return {
            "name": f"{secret.name}/versions/{version.number}",
            "payload": {"data": base64.b64encode(answer_data).decode("ascii"), "dataCrc32c": str(crc32c(data))},
        }

    def _set_state(self, params: dict, state: str) -> dict:
        secret, version = self._version(params)
        if version.state == "DESTROYED" and state != "DESTROYED":
            raise ApiError("FAILED_PRECONDITION", f"Secret Version [{secret.name}/versions/{version.number}] is destroyed.")
        version.state = state
        if state == "DESTROYED" and version.destroyed is None:
            version.data = None
            version.destroyed = time.time()
        return self._version_json(secret, version)

    def _rpc_disableSecretVersion(self, params: dict, query: dict, payload: dict) -> dict:
        return self._set_state(params, "DISABLED")

    def _rpc_enableSecretVersion(self, params: dict, query: dict, payload: dict) -> dict:
        return self._set_state(params, "ENABLED")

    def _rpc_destroySecretVersion(self, params: dict, query: dict, payload: dict) -> dict:
        return self._set_state(params, "DESTROYED")


def _int_enums(value):
    if isinstance(value, dict):
        return {k: STATE[v] if k == "state" and isinstance(v, str) else _int_enums(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_int_enums(item) for item in value]
    return value


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    emulator: SecretManagerEmulator


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so stopping the server really cuts clients off.
    protocol_version = "HTTP/1.0"
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, answer = self.server.emulator.handle(
            self.command, self.path, body, self.headers.get("Authorization", "")
        )
        data = json.dumps(answer).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # bodies carry secret payloads; never print requests

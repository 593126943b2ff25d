"""An emulator of the Google Cloud KMS v1 REST API, for tests.

This is **an emulator of the documented API, written from Google's public REST
reference** (https://cloud.google.com/kms/docs/reference/rest, and the field
documentation shipped in the ``google-cloud-kms`` client). It is not Google's
code and proves nothing about Google's servers beyond what that reference says;
it exists so the real ``google-cloud-kms`` client, over its real REST transport,
can be exercised on 127.0.0.1 without a Google account.

What it implements (symmetric ``ENCRYPT_DECRYPT`` keys only):

* ``keyRings``: create, get, list.
* ``cryptoKeys``: create (``cryptoKeyId``, ``skipInitialVersionCreation``), get,
  list, ``:encrypt`` (on a key: its primary; or on a named version),
  ``:decrypt``, ``:updatePrimaryVersion``.
* ``cryptoKeyVersions``: create, get, list (paged), patch (``updateMask=state``,
  ENABLED <-> DISABLED only), ``:destroy`` (-> DESTROY_SCHEDULED, DESTROYED once
  ``destroyTime`` passes on the emulator's clock), ``:restore`` (-> DISABLED).

Faithful to Google's JSON mapping: camelCase fields, bytes as base64, int64
CRC32C values as decimal strings, RFC 3339 ``createTime``/``destroyTime``,
enums as names, or as numbers when the client asks with
``$alt=json;enum-encoding=int`` (the Python client does). Errors are
``{"error": {"code": <http>, "message": ..., "status": "NOT_FOUND"}}`` with
Google's gRPC-to-HTTP code mapping (FAILED_PRECONDITION and INVALID_ARGUMENT
are both HTTP 400; only ``status`` tells them apart).

Encryption is real AES-256-GCM with the request's additional authenticated
data. The emulator's ciphertext layout (4-byte version tag, 12-byte nonce,
ciphertext and tag) is its own: Google's is opaque and undocumented.

Where the reference is silent the emulator picks the stricter reading and says
so: an empty ``plaintext`` is refused (the field is documented as required, and
proto3 cannot tell empty bytes from unset); a disabled primary is allowed (the
key then cannot encrypt).

Test hooks: :meth:`CloudKMSEmulator.fail_next` answers the next requests with an
error status, :meth:`~CloudKMSEmulator.garble_next` with an HTML page instead of
JSON, :meth:`~CloudKMSEmulator.corrupt_next` damages one field of the
next responses (to prove the client checks CRC32C), :meth:`~CloudKMSEmulator.stop`
and :meth:`~CloudKMSEmulator.start` simulate an outage on the same port, and
:meth:`~CloudKMSEmulator.advance` moves the emulator's clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAX_PLAINTEXT = 64 * 1024
MAX_AAD = 64 * 1024
MAX_CIPHERTEXT = 64 * 1024 + 800  # Google documents "at most 64KiB plus overhead"; generous here.
DEFAULT_DESTROY_SCHEDULED_SECONDS = 30 * 24 * 3600
MIN_DESTROY_SCHEDULED_SECONDS = 24 * 3600
MAX_DESTROY_SCHEDULED_SECONDS = 120 * 24 * 3600
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_TAG_BYTES = 4
_NONCE_BYTES = 12
_GCM_TAG_BYTES = 16

# Enum tables of google.cloud.kms.v1 (name -> number), as in the published protos.
PURPOSE = {"CRYPTO_KEY_PURPOSE_UNSPECIFIED": 0, "ENCRYPT_DECRYPT": 1}
VERSION_STATE = {
    "CRYPTO_KEY_VERSION_STATE_UNSPECIFIED": 0,
    "ENABLED": 1,
    "DISABLED": 2,
    "DESTROYED": 3,
    "DESTROY_SCHEDULED": 4,
    "PENDING_GENERATION": 5,
}
PROTECTION_LEVEL = {"PROTECTION_LEVEL_UNSPECIFIED": 0, "SOFTWARE": 1, "HSM": 2, "EXTERNAL": 3, "EXTERNAL_VPC": 4}
ALGORITHM = {"CRYPTO_KEY_VERSION_ALGORITHM_UNSPECIFIED": 0, "GOOGLE_SYMMETRIC_ENCRYPTION": 1}

# Google's mapping of canonical error codes to HTTP statuses.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

_ID = r"[a-zA-Z0-9_-]{1,63}"
_RESOURCE_ID = re.compile(rf"^{_ID}$")
_PARENT = r"projects/(?P<project>[^/:]+)/locations/(?P<location>[^/:]+)"
_RING = _PARENT + r"/keyRings/(?P<ring>[^/:]+)"
_KEY = _RING + r"/cryptoKeys/(?P<key>[^/:]+)"
_VERSION = _KEY + r"/cryptoKeyVersions/(?P<version>[^/:]+)"

_DECRYPT_FAILED = "Decryption failed: verify that 'name' refers to the correct CryptoKey."


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: deliberately not the provider's table-driven code."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


class ApiError(Exception):
    """A Cloud KMS error answer: canonical status name and message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.status]

    def body(self) -> dict:
        return {"error": {"code": self.http_status, "message": self.message, "status": self.status}}


@dataclass
class _Version:
    number: int
    tag: bytes
    material: bytes | None
    state: str
    create_time: float
    destroy_time: float | None = None
    destroy_event_time: float | None = None


@dataclass
class _Key:
    name: str
    create_time: float
    protection_level: str
    destroy_scheduled_seconds: int
    labels: dict
    primary: int | None = None
    versions: dict[int, _Version] = field(default_factory=dict)


@dataclass
class _Fault:
    kind: str  # "fail", "garble" or "corrupt"
    what: str  # status name, or the response field to damage
    remaining: int
    methods: frozenset[str] | None  # RPC names ("encrypt", "decrypt", ...) or every RPC


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, field_name: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{field_name}': expected base64 bytes.")
    text = value.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{field_name}': invalid base64.") from None


def _int64(value: object, field_name: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)  # proto3 JSON: int64 as a decimal string, numbers accepted
    except (TypeError, ValueError):
        raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{field_name}': expected int64.") from None
    if isinstance(value, bool) or not 0 <= number < 2**63:
        raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{field_name}'.")
    return number


def _enum(value: object, table: dict[str, int], field_name: str) -> str:
    if isinstance(value, str) and value in table:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        for name, number in table.items():
            if number == value:
                return name
    raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{field_name}' ({value!r}).")


def _duration_seconds(value: object, field_name: str) -> int:
    match = re.fullmatch(r"(\d+)(?:\.(\d{1,9}))?s", value) if isinstance(value, str) else None
    if not match:
        raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{field_name}': expected a duration like '86400s'.")
    return int(match.group(1))


class CloudKMSEmulator:
    """A Cloud KMS v1 REST emulator on ``http://127.0.0.1:<port>``, served from a thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. After the
    first start the port is kept, so ``stop(); start()`` is an outage followed by
    recovery at the same address.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._rings: dict[str, float] = {}
        self._keys: dict[str, _Key] = {}
        self._faults: list[_Fault] = []
        self._clock_offset = 0.0
        #: ``(http method, path, rpc name)`` of recent requests, oldest first.
        self.calls: deque[tuple[str, str, str]] = deque(maxlen=10_000)

    # -- lifecycle -----------------------------------------------------

    @property
    def url(self) -> str:
        """The endpoint to give the client, e.g. ``http://127.0.0.1:34567``."""
        if not self.port:
            raise RuntimeError("the emulator has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> CloudKMSEmulator:
        """Listen (on the same port as before, after a :meth:`stop`) and serve from a thread."""
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), _Handler)
        server.emulator = self
        self.port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"cloudkms-emulator-{self.port}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop listening; state (keys, versions) survives for a later :meth:`start`."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> CloudKMSEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- test hooks ----------------------------------------------------

    def garble_next(self, times: int = 1, *, methods: set[str] | None = None) -> None:
        """Answer the next ``times`` matching requests with HTTP 200 and an HTML page (a confused proxy)."""
        with self._lock:
            self._faults.append(_Fault("garble", "html", times, frozenset(methods) if methods else None))

    def fail_next(self, status: str, times: int = 1, *, methods: set[str] | None = None) -> None:
        """Answer the next ``times`` matching requests with error ``status`` (e.g. ``"UNAVAILABLE"``)."""
        if status not in HTTP_STATUS:
            raise ValueError(f"unknown status {status!r}")
        with self._lock:
            self._faults.append(_Fault("fail", status, times, frozenset(methods) if methods else None))

    def corrupt_next(self, response_field: str, times: int = 1, *, methods: set[str] | None = None) -> None:
        """Damage ``response_field`` in the next ``times`` responses that carry it.

        CRC32C fields get a wrong value, ``verified*`` flags become false, bytes
        fields get one bit flipped (their checksum left as it was), and ``name``
        names another version of the key (the previous one, or the next for version 1).
        """
        with self._lock:
            self._faults.append(_Fault("corrupt", response_field, times, frozenset(methods) if methods else None))

    def reset_faults(self) -> None:
        """Forget every pending fault."""
        with self._lock:
            self._faults.clear()

    def advance(self, seconds: float) -> None:
        """Move the emulator's clock forward (scheduled destructions fall due)."""
        with self._lock:
            self._clock_offset += seconds

    def now(self) -> float:
        return time.time() + self._clock_offset

    # -- request handling ------------------------------------------------

    _ROUTES: list[tuple[str, re.Pattern, str]] = [
        ("POST", re.compile(rf"^{_PARENT}/keyRings$"), "createKeyRing"),
        ("GET", re.compile(rf"^{_PARENT}/keyRings$"), "listKeyRings"),
        ("GET", re.compile(rf"^{_RING}$"), "getKeyRing"),
        ("POST", re.compile(rf"^{_RING}/cryptoKeys$"), "createCryptoKey"),
        ("GET", re.compile(rf"^{_RING}/cryptoKeys$"), "listCryptoKeys"),
        ("GET", re.compile(rf"^{_KEY}$"), "getCryptoKey"),
        ("POST", re.compile(rf"^{_KEY}:encrypt$"), "encrypt"),
        ("POST", re.compile(rf"^{_VERSION}:encrypt$"), "encrypt"),
        ("POST", re.compile(rf"^{_KEY}:decrypt$"), "decrypt"),
        ("POST", re.compile(rf"^{_KEY}:updatePrimaryVersion$"), "updatePrimaryVersion"),
        ("POST", re.compile(rf"^{_KEY}/cryptoKeyVersions$"), "createCryptoKeyVersion"),
        ("GET", re.compile(rf"^{_KEY}/cryptoKeyVersions$"), "listCryptoKeyVersions"),
        ("GET", re.compile(rf"^{_VERSION}$"), "getCryptoKeyVersion"),
        ("PATCH", re.compile(rf"^{_VERSION}$"), "updateCryptoKeyVersion"),
        ("POST", re.compile(rf"^{_VERSION}:destroy$"), "destroyCryptoKeyVersion"),
        ("POST", re.compile(rf"^{_VERSION}:restore$"), "restoreCryptoKeyVersion"),
    ]

    def handle(self, method: str, raw_path: str, body: bytes) -> tuple[int, dict | str]:
        """Serve one request; returns ``(http status, JSON body)`` (or an HTML string when garbled)."""
        split = urlsplit(raw_path)
        query = {name: values[-1] for name, values in parse_qs(split.query, keep_blank_values=True).items()}
        path = unquote(split.path)
        ints = "enum-encoding=int" in query.get("$alt", "")
        rpc = "unknown"
        try:
            if not path.startswith("/v1/"):
                raise ApiError("NOT_FOUND", f"The requested URL {path} was not found on this server.")
            resource = path[len("/v1/") :]
            for route_method, pattern, name in self._ROUTES:
                match = pattern.match(resource)
                if match and route_method == method:
                    rpc = name
                    break
            else:
                raise ApiError("UNIMPLEMENTED", f"the emulator does not implement {method} {path}")
            self.calls.append((method, path, rpc))
            try:
                payload = json.loads(body) if body else {}
            except ValueError:
                raise ApiError("INVALID_ARGUMENT", "Invalid JSON payload received.") from None
            if not isinstance(payload, dict):
                raise ApiError("INVALID_ARGUMENT", "Invalid JSON payload received.")
            with self._lock:
                if self._take_fault("garble", rpc):
                    return 200, "<html><body>Service temporarily rerouted</body></html>"
                self._maybe_fail(rpc)
                answer = getattr(self, "_rpc_" + rpc)(match.groupdict(), query, payload)
                answer = self._maybe_corrupt(rpc, answer)
            return 200, self._encode_enums(answer, ints)
        except ApiError as error:
            return error.http_status, error.body()

    def _take_fault(self, kind: str, rpc: str) -> _Fault | None:
        for fault in self._faults:
            if fault.kind == kind and fault.remaining > 0 and (fault.methods is None or rpc in fault.methods):
                fault.remaining -= 1
                return fault
        return None

    def _maybe_fail(self, rpc: str) -> None:
        fault = self._take_fault("fail", rpc)
        if fault is not None:
            raise ApiError(fault.what, f"injected {fault.what} (emulator fault)")

    def _maybe_corrupt(self, rpc: str, answer: dict) -> dict:
        for fault in self._faults:
            if (
                fault.kind == "corrupt"
                and fault.remaining > 0
                and fault.what in answer
                and (fault.methods is None or rpc in fault.methods)
            ):
                fault.remaining -= 1
                answer = dict(answer)
                answer[fault.what] = self._damage(fault.what, answer[fault.what])
        self._faults = [fault for fault in self._faults if fault.remaining > 0]
        return answer

    @staticmethod
    def _damage(name: str, value):
        if name.startswith("verified"):
            return False
        if name.endswith("Crc32c"):
            return str((int(value) + 1) % 2**32)
        if name == "name":  # another version of the same key: the previous one, or the next
            prefix, _, number = value.rpartition("/")
            other = int(number) - 1 if int(number) > 1 else int(number) + 1
            return f"{prefix}/{other}"
        raw = bytearray(base64.b64decode(value))
        if raw:
            raw[len(raw) // 2] ^= 0x01
        else:
            raw = bytearray(b"\x00")
        return _b64(bytes(raw))

    @staticmethod
    def _encode_enums(answer: dict, ints: bool) -> dict:
        if not ints:
            return answer
        tables = {
            "state": VERSION_STATE,
            "purpose": PURPOSE,
            "protectionLevel": PROTECTION_LEVEL,
            "algorithm": ALGORITHM,
        }

        def convert(value):
            if isinstance(value, dict):
                return {k: tables[k][v] if k in tables and isinstance(v, str) else convert(v) for k, v in value.items()}
            if isinstance(value, list):
                return [convert(item) for item in value]
            return value

        return convert(answer)

    # -- resources ------------------------------------------------------

    def _ring_name(self, params: dict) -> str:
        return f"projects/{params['project']}/locations/{params['location']}/keyRings/{params['ring']}"

    def _key_name(self, params: dict) -> str:
        return f"{self._ring_name(params)}/cryptoKeys/{params['key']}"

    def _ring(self, params: dict) -> str:
        name = self._ring_name(params)
        if name not in self._rings:
            raise ApiError("NOT_FOUND", f"KeyRing {name} not found.")
        return name

    def _key(self, params: dict) -> _Key:
        name = self._key_name(params)
        key = self._keys.get(name)
        if key is None:
            raise ApiError("NOT_FOUND", f"CryptoKey {name} not found.")
        self._settle(key)
        return key

    def _version(self, params: dict) -> tuple[_Key, _Version]:
        key = self._key(params)
        raw = params["version"]
        if not raw.isdigit():
            raise ApiError("INVALID_ARGUMENT", f"Invalid CryptoKeyVersion id {raw!r}.")
        version = key.versions.get(int(raw))
        if version is None:
            raise ApiError("NOT_FOUND", f"CryptoKeyVersion {key.name}/cryptoKeyVersions/{raw} not found.")
        return key, version

    def _settle(self, key: _Key) -> None:
        """Destroy the versions whose scheduled destruction time has passed."""
        now = self.now()
        for version in key.versions.values():
            due = version.destroy_time is not None and version.destroy_time <= now
            if version.state == "DESTROY_SCHEDULED" and due:
                version.state = "DESTROYED"
                version.material = None
                version.destroy_event_time = version.destroy_time

    def _new_version(self, key: _Key) -> _Version:
        number = max(key.versions, default=0) + 1
        tags = {version.tag for version in key.versions.values()}
        tag = os.urandom(_TAG_BYTES)
        while tag in tags:
            tag = os.urandom(_TAG_BYTES)
        version = _Version(number=number, tag=tag, material=os.urandom(32), state="ENABLED", create_time=self.now())
        key.versions[number] = version
        return version

    def _version_json(self, key: _Key, version: _Version) -> dict:
        body = {
            "name": f"{key.name}/cryptoKeyVersions/{version.number}",
            "state": version.state,
            "protectionLevel": key.protection_level,
            "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION",
            "createTime": _timestamp(version.create_time),
            "generateTime": _timestamp(version.create_time),
        }
        if version.destroy_time is not None:
            body["destroyTime"] = _timestamp(version.destroy_time)
        if version.destroy_event_time is not None:
            body["destroyEventTime"] = _timestamp(version.destroy_event_time)
        return body

    def _key_json(self, key: _Key) -> dict:
        body = {
            "name": key.name,
            "purpose": "ENCRYPT_DECRYPT",
            "createTime": _timestamp(key.create_time),
            "versionTemplate": {"protectionLevel": key.protection_level, "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"},
            "destroyScheduledDuration": f"{key.destroy_scheduled_seconds}s",
        }
        if key.primary is not None:
            body["primary"] = self._version_json(key, key.versions[key.primary])
        if key.labels:
            body["labels"] = dict(key.labels)
        return body

    @staticmethod
    def _page(items: list, query: dict, field_name: str) -> dict:
        try:
            size = int(query.get("pageSize") or DEFAULT_PAGE_SIZE)
            start = int(query.get("pageToken") or 0)
        except ValueError:
            raise ApiError("INVALID_ARGUMENT", "Invalid pageSize or pageToken.") from None
        if size < 0 or start < 0 or start > len(items):
            raise ApiError("INVALID_ARGUMENT", "Invalid pageSize or pageToken.")
        size = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        body: dict = {field_name: items[start : start + size], "totalSize": len(items)}
        if start + size < len(items):
            body["nextPageToken"] = str(start + size)
        if not body[field_name]:
            del body[field_name]  # proto3 JSON leaves empty repeated fields out
        return body

    @staticmethod
    def _refuse_filters(query: dict) -> None:
        if query.get("filter") or query.get("orderBy"):
            raise ApiError("UNIMPLEMENTED", "the emulator does not implement filter or orderBy")

    # -- RPCs: key rings ------------------------------------------------

    def _rpc_createKeyRing(self, params: dict, query: dict, payload: dict) -> dict:
        ring_id = query.get("keyRingId", "")
        if not _RESOURCE_ID.match(ring_id):
            raise ApiError("INVALID_ARGUMENT", "keyRingId must match [a-zA-Z0-9_-]{1,63}.")
        name = self._ring_name({**params, "ring": ring_id})
        if name in self._rings:
            raise ApiError("ALREADY_EXISTS", f"KeyRing {name} already exists.")
        self._rings[name] = self.now()
        return {"name": name, "createTime": _timestamp(self._rings[name])}

    def _rpc_listKeyRings(self, params: dict, query: dict, payload: dict) -> dict:
        self._refuse_filters(query)
        prefix = f"projects/{params['project']}/locations/{params['location']}/keyRings/"
        rings = [
            {"name": name, "createTime": _timestamp(created)}
            for name, created in sorted(self._rings.items())
            if name.startswith(prefix)
        ]
        return self._page(rings, query, "keyRings")

    def _rpc_getKeyRing(self, params: dict, query: dict, payload: dict) -> dict:
        name = self._ring(params)
        return {"name": name, "createTime": _timestamp(self._rings[name])}

    # -- RPCs: crypto keys ----------------------------------------------

    def _rpc_createCryptoKey(self, params: dict, query: dict, payload: dict) -> dict:
        key_id = query.get("cryptoKeyId", "")
        if not _RESOURCE_ID.match(key_id):
            raise ApiError("INVALID_ARGUMENT", "cryptoKeyId must match [a-zA-Z0-9_-]{1,63}.")
        ring = self._ring(params)
        purpose = _enum(payload.get("purpose", 0), PURPOSE, "crypto_key.purpose")
        if purpose != "ENCRYPT_DECRYPT":
            raise ApiError(
                "INVALID_ARGUMENT", "crypto_key.purpose is required; the emulator implements ENCRYPT_DECRYPT"
            )
        template = payload.get("versionTemplate") or {}
        algorithm = _enum(template.get("algorithm", 1), ALGORITHM, "crypto_key.version_template.algorithm")
        if algorithm != "GOOGLE_SYMMETRIC_ENCRYPTION":
            raise ApiError("INVALID_ARGUMENT", "ENCRYPT_DECRYPT keys need GOOGLE_SYMMETRIC_ENCRYPTION")
        protection = _enum(
            template.get("protectionLevel", 1), PROTECTION_LEVEL, "crypto_key.version_template.protection_level"
        )
        if protection not in ("SOFTWARE", "HSM"):
            raise ApiError("UNIMPLEMENTED", f"the emulator does not implement {protection} keys")
        if "destroyScheduledDuration" in payload:
            seconds = _duration_seconds(payload["destroyScheduledDuration"], "crypto_key.destroy_scheduled_duration")
            if not MIN_DESTROY_SCHEDULED_SECONDS <= seconds <= MAX_DESTROY_SCHEDULED_SECONDS:
                raise ApiError("INVALID_ARGUMENT", "destroy_scheduled_duration must be between 24 hours and 120 days.")
        else:
            seconds = DEFAULT_DESTROY_SCHEDULED_SECONDS
        name = f"{ring}/cryptoKeys/{key_id}"
        if name in self._keys:
            raise ApiError("ALREADY_EXISTS", f"CryptoKey {name} already exists.")
        labels = payload.get("labels") or {}
        key = _Key(
            name=name,
            create_time=self.now(),
            protection_level=protection,
            destroy_scheduled_seconds=seconds,
            labels=labels,
        )
        if query.get("skipInitialVersionCreation", "false").lower() != "true":
            key.primary = self._new_version(key).number
        self._keys[name] = key
        return self._key_json(key)

    def _rpc_listCryptoKeys(self, params: dict, query: dict, payload: dict) -> dict:
        self._refuse_filters(query)
        ring = self._ring(params)
        keys = [self._key_json(key) for name, key in sorted(self._keys.items()) if name.startswith(ring + "/")]
        return self._page(keys, query, "cryptoKeys")

    def _rpc_getCryptoKey(self, params: dict, query: dict, payload: dict) -> dict:
        return self._key_json(self._key(params))

    def _rpc_updatePrimaryVersion(self, params: dict, query: dict, payload: dict) -> dict:
        key = self._key(params)
        raw = payload.get("cryptoKeyVersionId", "")
        if not isinstance(raw, str) or not raw.isdigit():
            raise ApiError("INVALID_ARGUMENT", "crypto_key_version_id is required.")
        version = key.versions.get(int(raw))
        if version is None:
            raise ApiError("NOT_FOUND", f"CryptoKeyVersion {key.name}/cryptoKeyVersions/{raw} not found.")
        if version.state != "ENABLED":
            raise ApiError(
                "FAILED_PRECONDITION",
                f"{key.name}/cryptoKeyVersions/{raw} is not enabled, current state is: {version.state}.",
            )
        key.primary = version.number
        return self._key_json(key)

    # -- RPCs: versions ---------------------------------------------------

    def _rpc_createCryptoKeyVersion(self, params: dict, query: dict, payload: dict) -> dict:
        key = self._key(params)
        return self._version_json(key, self._new_version(key))

    def _rpc_listCryptoKeyVersions(self, params: dict, query: dict, payload: dict) -> dict:
        self._refuse_filters(query)
        key = self._key(params)
        versions = [self._version_json(key, key.versions[n]) for n in sorted(key.versions)]
        return self._page(versions, query, "cryptoKeyVersions")

    def _rpc_getCryptoKeyVersion(self, params: dict, query: dict, payload: dict) -> dict:
        key, version = self._version(params)
        return self._version_json(key, version)

    def _rpc_updateCryptoKeyVersion(self, params: dict, query: dict, payload: dict) -> dict:
        key, version = self._version(params)
        mask = [part for part in query.get("updateMask", "").split(",") if part]
        if not mask:
            raise ApiError("INVALID_ARGUMENT", "update_mask is required.")
        if mask != ["state"]:
            raise ApiError("INVALID_ARGUMENT", f"update_mask may only contain 'state', got {','.join(mask)}.")
        target = _enum(payload.get("state", 0), VERSION_STATE, "crypto_key_version.state")
        if target not in ("ENABLED", "DISABLED"):
            raise ApiError("INVALID_ARGUMENT", "crypto_key_version.state may only be set to ENABLED or DISABLED.")
        if version.state not in ("ENABLED", "DISABLED"):
            raise ApiError(
                "FAILED_PRECONDITION",
                f"{key.name}/cryptoKeyVersions/{version.number} is in state {version.state}"
                f" and cannot be {target.lower()}.",
            )
        version.state = target
        return self._version_json(key, version)

    def _rpc_destroyCryptoKeyVersion(self, params: dict, query: dict, payload: dict) -> dict:
        key, version = self._version(params)
        if version.state not in ("ENABLED", "DISABLED"):
            raise ApiError(
                "FAILED_PRECONDITION",
                f"{key.name}/cryptoKeyVersions/{version.number} is in state {version.state} and cannot be destroyed.",
            )
        version.state = "DESTROY_SCHEDULED"
        version.destroy_time = self.now() + key.destroy_scheduled_seconds
        return self._version_json(key, version)

    def _rpc_restoreCryptoKeyVersion(self, params: dict, query: dict, payload: dict) -> dict:
        key, version = self._version(params)
        if version.state != "DESTROY_SCHEDULED":
            raise ApiError(
                "FAILED_PRECONDITION",
                f"{key.name}/cryptoKeyVersions/{version.number} is in state {version.state}, not DESTROY_SCHEDULED.",
            )
        version.state = "DISABLED"
        version.destroy_time = None
        return self._version_json(key, version)

    # -- RPCs: cryptography -----------------------------------------------

    @staticmethod
    def _check_crc(data: bytes, claimed: int | None, field_name: str, data_field: str) -> bool:
        if claimed is None:
            return False
        if claimed != crc32c(data):
            raise ApiError(
                "INVALID_ARGUMENT",
                f"The checksum in field {field_name} did not match the data in field {data_field}.",
            )
        return True

    def _rpc_encrypt(self, params: dict, query: dict, payload: dict) -> dict:
        key = self._key(params)
        if params.get("version") is not None:
            key, version = self._version(params)
        elif key.primary is None:
            raise ApiError("FAILED_PRECONDITION", f"{key.name} has no primary CryptoKeyVersion.")
        else:
            version = key.versions[key.primary]
        plaintext = _unb64(payload.get("plaintext"), "plaintext")
        aad = _unb64(payload.get("additionalAuthenticatedData"), "additional_authenticated_data")
        if not plaintext:
            raise ApiError("INVALID_ARGUMENT", "plaintext is required.")
        if len(plaintext) > MAX_PLAINTEXT:
            raise ApiError("INVALID_ARGUMENT", f"The plaintext must be no larger than {MAX_PLAINTEXT} bytes.")
        if len(aad) > MAX_AAD:
            raise ApiError(
                "INVALID_ARGUMENT", f"The additional authenticated data must be no larger than {MAX_AAD} bytes."
            )
        verified_plaintext = self._check_crc(
            plaintext, _int64(payload.get("plaintextCrc32c"), "plaintext_crc32c"), "plaintext_crc32c", "plaintext"
        )
        verified_aad = self._check_crc(
            aad,
            _int64(payload.get("additionalAuthenticatedDataCrc32c"), "additional_authenticated_data_crc32c"),
            "additional_authenticated_data_crc32c",
            "additional_authenticated_data",
        )
        name = f"{key.name}/cryptoKeyVersions/{version.number}"
        if version.state != "ENABLED":
            raise ApiError("FAILED_PRECONDITION", f"{name} is not enabled, current state is: {version.state}.")
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = version.tag + nonce + AESGCM(version.material).encrypt(nonce, plaintext, aad)
        return {
            "name": name,
            "ciphertext": _b64(ciphertext),
            "ciphertextCrc32c": str(crc32c(ciphertext)),
            "verifiedPlaintextCrc32c": verified_plaintext,
            "verifiedAdditionalAuthenticatedDataCrc32c": verified_aad,
            "protectionLevel": key.protection_level,
        }

    def _rpc_decrypt(self, params: dict, query: dict, payload: dict) -> dict:
        key = self._key(params)
        ciphertext = _unb64(payload.get("ciphertext"), "ciphertext")
        aad = _unb64(payload.get("additionalAuthenticatedData"), "additional_authenticated_data")
        if not ciphertext:
            raise ApiError("INVALID_ARGUMENT", "ciphertext is required.")
        if len(ciphertext) > MAX_CIPHERTEXT or len(aad) > MAX_AAD:
            raise ApiError("INVALID_ARGUMENT", "The ciphertext or additional authenticated data is too large.")
        self._check_crc(
            ciphertext, _int64(payload.get("ciphertextCrc32c"), "ciphertext_crc32c"), "ciphertext_crc32c", "ciphertext"
        )
        self._check_crc(
            aad,
            _int64(payload.get("additionalAuthenticatedDataCrc32c"), "additional_authenticated_data_crc32c"),
            "additional_authenticated_data_crc32c",
            "additional_authenticated_data",
        )
        if len(ciphertext) < _TAG_BYTES + _NONCE_BYTES + _GCM_TAG_BYTES:
            raise ApiError("INVALID_ARGUMENT", _DECRYPT_FAILED)
        tag = ciphertext[:_TAG_BYTES]
        version = next((v for v in key.versions.values() if v.tag == tag), None)
        if version is None:
            raise ApiError("INVALID_ARGUMENT", _DECRYPT_FAILED)
        if version.state != "ENABLED":
            raise ApiError(
                "FAILED_PRECONDITION",
                f"{key.name}/cryptoKeyVersions/{version.number} is not enabled, current state is: {version.state}.",
            )
        nonce = ciphertext[_TAG_BYTES : _TAG_BYTES + _NONCE_BYTES]
        try:
            plaintext = AESGCM(version.material).decrypt(nonce, ciphertext[_TAG_BYTES + _NONCE_BYTES :], aad)
        except InvalidTag:
            raise ApiError("INVALID_ARGUMENT", _DECRYPT_FAILED) from None
        return {
            "plaintext": _b64(plaintext),
            "plaintextCrc32c": str(crc32c(plaintext)),
            "usedPrimary": version.number == key.primary,
            "protectionLevel": key.protection_level,
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # A connection per request (HTTP/1.0) from a client's pool of requests in flight: socketserver's
    # backlog of 5 drops the rest of a burst, and they reconnect only after a second (a 1 s timeout fails).
    request_queue_size = 128
    emulator: CloudKMSEmulator


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so stopping the server really cuts clients off.
    protocol_version = "HTTP/1.0"
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, answer = self.server.emulator.handle(self.command, self.path, body)
        if isinstance(answer, str):
            data, content_type = answer.encode("utf-8"), "text/html; charset=UTF-8"
        else:
            data, content_type = json.dumps(answer).encode("utf-8"), "application/json; charset=UTF-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # requests carry key material in their bodies; never print them

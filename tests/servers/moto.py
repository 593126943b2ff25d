"""moto's real HTTP server, for tests that talk to AWS (KMS, Secrets Manager) through boto3.

The server is ``python -m moto.server`` in a subprocess on a free 127.0.0.1 port:
boto3 goes through its whole real stack (signing, retries, HTTP, error parsing)
and only the far end is an emulator. Use it in two ways:

* the session fixture ``moto_server`` (one server for the whole run; names you
  create must be unique, e.g. with a uuid prefix, because state is shared), or
* :func:`running_moto_server` for a private server a test may stop on purpose.

To get the fixtures, list this module as a plugin from a plugin module or the
root conftest: ``pytest_plugins = ["tests.servers.moto"]``.

``aws_credentials`` (a dependency of ``moto_server``) points the standard
credential chain at fake keys for the session, and shuts every other source off
(shared config files, the EC2 metadata service), so a developer's real AWS
profile can never be used by a test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REGION = "us-east-1"
#: What the credential chain finds during the session; moto accepts any keys.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
#: Variables removed for the session so nothing but FAKE_AWS_ENV is used.
SCRUBBED_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_ENDPOINT_URL_SECRETS_MANAGER",
)
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class MotoServer:
    """A running ``moto.server`` subprocess."""

    process: subprocess.Popen
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    region: str = REGION

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def answers(self) -> bool:
        """Return whether the server responds to HTTP right now."""
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def reset(self) -> None:
        """Forget every resource of every service (moto's own reset endpoint)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def log(self) -> str:
        """Return what the server wrote to stdout/stderr so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL) and remove its log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        self.log_path.unlink(missing_ok=True)


def start_moto_server(*, timeout: float = STARTUP_TIMEOUT) -> MotoServer:
    """Start ``python -m moto.server`` on a free port and wait until it answers.

    :raises RuntimeError: the server exited or did not answer within ``timeout``.
    """
    port = free_port()
    # A file, not a pipe: nobody reads the request log, and a full pipe would block the server.
    log_fd, log_name = tempfile.mkstemp(prefix="moto-server-", suffix=".log")
    env = {key: value for key, value in os.environ.items() if key not in SCRUBBED_AWS_ENV}
    env.update(FAKE_AWS_ENV)
    with os.fdopen(log_fd, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = MotoServer(process=process, port=port, log_path=Path(log_name))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.running:
            log = server.log()
            server.stop()
            raise RuntimeError(f"moto server exited with code {process.returncode}:\n{log}")
        if server.answers():
            return server
        time.sleep(0.05)
    log = server.log()
    server.stop()
    raise RuntimeError(f"moto server did not answer on port {port} within {timeout:.0f}s:\n{log}")


@contextmanager
def running_moto_server() -> Iterator[MotoServer]:
    """Run a private moto server for the ``with`` block; it is stopped on the way out."""
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def fake_aws_credentials() -> Iterator[None]:
    """Point the AWS credential chain at fake keys (and nothing else) for the block."""
    with pytest.MonkeyPatch.context() as patch:
        for name in SCRUBBED_AWS_ENV:
            patch.delenv(name, raising=False)
        for name, value in FAKE_AWS_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[None]:
    """Fake AWS credentials and region in the environment for the whole session."""
    with fake_aws_credentials():
        yield


@pytest.fixture(scope="session")
def moto_server(aws_credentials) -> Iterator[MotoServer]:
    """One moto server shared by the session; stopped by pid when the session ends."""
    with running_moto_server() as server:
        yield server

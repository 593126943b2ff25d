"""Real processes for the fault tests: Celery workers and beat under a supervisor, a private Redis, a private PostgreSQL.

Nothing here touches the shared servers: the broker and database a test breaks are its
own, on free ports, in its own temporary folders.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER_ARGS = ("worker", "--pool", "prefork", "--concurrency", "2", "--without-gossip", "--without-mingle",
               "--without-heartbeat")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, describe=lambda: "", interval: float = 0.1):
    """Poll ``predicate`` until it returns something true; errors while polling count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the server under test may be down right now
            last_error, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; {describe()} (last error: {last_error})")


def manage(env: dict, *args: str, timeout: float = 120) -> str:
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"manage.py {' '.join(args)}: {result.stderr or result.stdout}"
    return result.stdout.strip()


class Process:
    """A command in its own process group, its output appended to a log file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None, cwd: Path = ROOT):
        self.argv, self.log_path, self.env, self.cwd = argv, log_path, env, cwd
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (a worker and its pool children) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)


def celery(env: dict, log_path: Path, *args: str) -> Process:
    args = args or WORKER_ARGS
    return Process([sys.executable, "-m", "celery", "-A", "keyvault", *args, "--loglevel", "WARNING"], log_path, env)


class Supervisor:
    """Restarts any of its processes that exits, as systemd's ``Restart=always`` does (deploy/systemd)."""

    def __init__(self, *processes: Process, delay: float = 1.0):
        self.processes = list(processes)
        self.delay = delay
        self.restarts: dict[int, int] = dict.fromkeys(range(len(self.processes)), 0)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            for index, process in enumerate(self.processes):
                if not process.alive and not self._stopping.is_set():
                    time.sleep(self.delay)
                    process.start()
                    self.restarts[index] += 1

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        for process in self.processes:
            process.kill()

    def exits(self) -> int:
        return sum(self.restarts.values())


class PrivateRedis:
    """A redis-server of the test's own, without persistence: a SIGKILL loses every queued message."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.process: Process | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: apt-get install redis-server"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.folder)]
        self.process = Process(argv, self.folder / "redis.log")
        wait_for(self._pong, 20, "the private redis-server to answer")

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def kill(self) -> None:
        self.process.kill(signal.SIGKILL)


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb, pg_ctl), trust auth on 127.0.0.1 and a free port.

    PostgreSQL refuses to run as root; as root the cluster belongs to the ``postgres`` user.
    """

    def __init__(self):
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="kv-private-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        os.chmod(self.folder, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        self.start()

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        # Debian keeps the server tools off PATH, one folder per major version.
        binary = shutil.which(tool) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), reverse=True)), None)
        assert binary, f"{tool} is missing: install the PostgreSQL server package"
        argv = [binary, *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=self.folder)
        assert result.returncode == 0, f"{tool}: {result.stderr or result.stdout}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60", "start")

    def stop_immediately(self) -> None:
        """``pg_ctl stop -m immediate``: every backend dies at once, as in a crash; recovery replays the WAL."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(AssertionError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

"""Shared helpers for the benchmarks that run a whole Keyvault instance (console, rewrap).

Each benchmark owns a private PostgreSQL database and data folder, runs the real
``manage.py``, server and Celery workers as subprocesses on 127.0.0.1, and removes
all of it at the end (``--keep`` leaves the database for inspection).
"""

from __future__ import annotations

import base64
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PG = dict(host="127.0.0.1", port=5432, user="postgres")


# -- database --------------------------------------------------------------------


def _admin_connection():
    import psycopg

    return psycopg.connect(dbname="postgres", autocommit=True, **PG)


def drop_database(name: str) -> None:
    with _admin_connection() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_database(name: str) -> None:
    """A fresh, empty database (an old one of the same name is dropped first)."""
    drop_database(name)
    with _admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def database_url(name: str) -> str:
    return f"postgres://{PG['user']}@{PG['host']}:{PG['port']}/{name}"


def connect(name: str):
    """A psycopg 3 connection to the benchmark database (for COPY and hand-written SQL)."""
    import psycopg

    return psycopg.connect(dbname=name, **PG)


# -- the instance's environment ---------------------------------------------------------


def instance_env(data_dir: Path, db_name: str, **extra: str) -> dict[str, str]:
    """Production-like settings (``HMD_DEBUG=false``) with freshly generated secrets.

    Every process of the instance (this one, ``manage.py``, the server, the workers)
    gets the same environment, so they share the database, keyring and audit keys.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    signing = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update(
        DJANGO_SETTINGS_MODULE="keyvault.settings",
        HMD_DEBUG="false",
        HMD_DATA_DIR=str(data_dir),
        HMD_DATABASE_URL=database_url(db_name),
        HMD_SECRET_KEY=secrets.token_urlsafe(50),
        HMD_LOCAL_KMS_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        HMD_AUDIT_HMAC_KEY=secrets.token_urlsafe(50),
        HMD_AUDIT_SIGNING_KEY=base64.b64encode(signing).decode(),
        HMD_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def setup_django(env: dict[str, str]) -> None:
    """Configure this process as one more process of the instance."""
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def manage(env: dict[str, str], *args: str, timeout: float = 600) -> tuple[float, str]:
    """Run ``manage.py``; returns (wall seconds, stdout). Raises with stderr on failure."""
    started = time.perf_counter()
    result = subprocess.run([PYTHON, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return elapsed, result.stdout.strip()


def make_data_dir(given: str | None, prefix: str) -> tuple[Path, bool]:
    """(folder, whether we created it and must remove it)."""
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def discard_instance(db_name: str, data_dir: Path, own_dir: bool) -> None:
    """Close this process's connections, drop the database, remove the data folder if we made it."""
    from django.db import connections

    connections.close_all()
    drop_database(db_name)
    if own_dir:
        remove_dir(data_dir)


# -- processes ---------------------------------------------------------------------


class Process:
    """A subprocess in its own process group, stopped (group and all) by :meth:`stop`."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.log = open(log_path, "ab")
        self.log_path = log_path
        self.popen = subprocess.Popen(list(args), cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the group (warm shutdown), SIGKILL it if it does not exit in time."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], *, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- figures -----------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p95 of 20 samples is the 19th smallest)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered) - 1e-9)))
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    aligns = ["<" if any(not _numeric(row[i]) for row in cells[1:]) else ">" for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(f"{cell:{align}{width}}" for cell, align, width in zip(row, aligns, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "").replace(" ", "").replace("x", "").replace("%", "").isdigit()


def met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

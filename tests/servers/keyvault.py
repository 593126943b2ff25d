"""A real Keyvault web server (gunicorn) on a scratch instance, optionally with a real Celery worker.

For tests of what applications see over HTTP (``keyvault_client``, ``examples/``, the
README's application section): SQLite and the local provider in a temporary folder, the
embedded broker, ``manage.py`` for everything an operator does.
"""

from __future__ import annotations

import signal
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.rotation.processes import Process, celery, free_port, wait_for
from tests.scratch import ROOT, Scratch, make_scratch


@dataclass
class LiveKeyvault:
    url: str
    scratch: Scratch
    server: Process
    worker: Process | None

    def manage(self, *args: str, timeout: float = 120) -> str:
        """``manage.py ARGS`` on this instance; its standard output."""
        return self.scratch.run(*args, timeout=timeout).stdout.decode().strip()

    def create_client(self, name: str, *keks: str, ops: str = "generate,unwrap,describe,encrypt,decrypt,rewrap",
                      rate_limit: int | None = None, context_require: tuple[str, ...] = ()) -> str:
        """A new API client of ``keks``; its token."""
        args = ["api", "client", "create", name, *[f"--kek={kek}" for kek in keks], f"--ops={ops}"]
        args += [f"--context-require={rule}" for rule in context_require]
        if rate_limit is not None:
            args.append(f"--rate-limit={rate_limit}")
        return self.manage(*args).splitlines()[-1]


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
        return response.status == 200


@contextmanager
def web_server(scratch: Scratch, log_path: Path) -> Iterator[tuple[str, Process]]:
    """gunicorn (one process, four threads) serving ``scratch`` on a free port: its URL and process."""
    port = free_port()
    server = Process([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py"),
                      "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4"],
                     log_path, {**scratch.env, "HMD_BIND": f"127.0.0.1:{port}"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: server.alive and _healthy(url), 60, "gunicorn to answer /healthz",
                 lambda: log_path.read_text()[-2000:])
        yield url, server
    finally:
        server.kill(signal.SIGTERM)


@contextmanager
def running_keyvault(data_dir: Path, *, worker: bool = False, **extra_env: str) -> Iterator[LiveKeyvault]:
    """A migrated scratch instance served by gunicorn, and a Celery worker (solo pool) if asked for."""
    scratch = make_scratch(data_dir, **extra_env)
    logs = data_dir.parent
    with web_server(scratch, logs / "gunicorn.log") as (url, server):
        celery_worker = celery(scratch.env, logs / "worker.log", "worker", "--pool", "solo") if worker else None
        try:
            yield LiveKeyvault(url=url, scratch=scratch, server=server, worker=celery_worker)
        finally:
            if celery_worker is not None:
                celery_worker.kill(signal.SIGTERM)

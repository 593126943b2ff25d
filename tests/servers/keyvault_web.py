"""Keyvault served by a real gunicorn on a free port, on a scratch data folder of its own.

``serve(tmp_path, setup=...)`` migrates the scratch database, runs ``setup`` (Python run with
Django set up, e.g. creating a client and printing its token; its last stdout line is returned),
starts gunicorn with ``deploy/gunicorn.conf.py``, waits for ``/healthz`` and stops it afterwards.
The server runs on its own SQLite database in ``tmp_path`` unless ``env`` names another, so it
never shares the test database (which pytest-django would keep in an open transaction).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.rotation.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


def environment(data_dir: Path, cache_url: str | None = None, **extra: str) -> dict:
    """The test process's environment without its HMD_* settings, pointed at ``data_dir``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    env.update(DJANGO_SETTINGS_MODULE="keyvault.settings", HMD_DATA_DIR=str(data_dir), HMD_DEBUG="true",
               HMD_LOG_LEVEL="WARNING", **extra)
    if cache_url:
        env["HMD_CACHE_URL"] = cache_url
    return env


def wait_healthy(base_url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"gunicorn exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise AssertionError("gunicorn did not become healthy")


def run_django(env: dict, code: str, *, timeout: float = 120) -> str:
    """Run ``code`` after ``django.setup()`` in a process with ``env``; its last stdout line."""
    done = subprocess.run([sys.executable, "-c", "import django\ndjango.setup()\n" + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


@dataclass
class LiveKeyvault:
    base_url: str
    env: dict
    setup_output: str


@contextlib.contextmanager
def serve(tmp_path: Path, *, setup: str = "", cache_url: str | None = None, workers: int = 2,
          gunicorn_args: tuple[str, ...] = (), env: dict | None = None) -> Iterator[LiveKeyvault]:
    """A migrated Keyvault under gunicorn; stopped (SIGTERM, then SIGKILL) when the block ends."""
    env = env or environment(tmp_path / "data", cache_url)
    migrated = subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
    assert migrated.returncode == 0, migrated.stderr
    output = run_django(env, setup) if setup else ""
    port = free_port()
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py"), "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers), *gunicorn_args],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, gunicorn)
        yield LiveKeyvault(base_url=base_url, env=env, setup_output=output)
    finally:
        gunicorn.terminate()
        try:
            gunicorn.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gunicorn.kill()
            gunicorn.wait()

"""State that every web process must share (issue 12, finding 10): the SIEM rate limit across gunicorn workers.

Two gunicorn workers serve one SIEM consumer; requests land on both (the access log
names each worker's process id). With a per-process cache each worker would allow the
full per-minute budget; with the shared cache (Redis through HMD_CACHE_URL, or the file
fallback ``make run`` uses) the consumer gets exactly one budget.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
#: keyvault.audit.siem's default per-consumer limit.
PER_MINUTE = 120
REQUESTS = 200

CREATE_CONSUMER = """
import django
django.setup()
from keyvault.audit import siem
from keyvault.audit import Actor
consumer, token = siem.create_consumer(name="collector", actor=Actor.system("tests"))
print(token)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(data_dir: Path, cache_url: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    env.update(DJANGO_SETTINGS_MODULE="keyvault.settings", HMD_DATA_DIR=str(data_dir), HMD_DEBUG="true",
               HMD_LOG_LEVEL="WARNING")
    if cache_url:
        env["HMD_CACHE_URL"] = cache_url
    return env


def _wait_healthy(base_url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
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


def _status(url: str, token: str) -> int:
    """One request on a connection of its own, so the two workers share the load."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_for_a_fresh_minute(needed_seconds: float = 30) -> None:
    """The limit counts per clock minute: start early enough in one to finish inside it."""
    if time.time() % 60 > 60 - needed_seconds:
        time.sleep(60 - time.time() % 60 + 0.5)


def run_two_workers(tmp_path: Path, cache_url: str | None, *, concurrency: int) -> tuple[list[int], set[str]]:
    """Statuses of REQUESTS SIEM pulls against two gunicorn workers, and the worker pids that served them."""
    data = tmp_path / "data"
    env = _environment(data, cache_url)
    migrated = subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
    assert migrated.returncode == 0, migrated.stderr
    made = subprocess.run([sys.executable, "-c", CREATE_CONSUMER], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    port = _free_port()
    access_log = tmp_path / "access.log"
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy/gunicorn.conf.py"), "--bind", f"127.0.0.1:{port}",
         "--workers", "2", "--threads", "2", "--keep-alive", "0", "--access-logfile", str(access_log),
         "--access-logformat", "%(p)s %(U)s %(s)s"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_healthy(base_url, gunicorn)
        _wait_for_a_fresh_minute()
        url = f"{base_url}/siem/events?limit=1"
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            statuses = list(pool.map(lambda _: _status(url, token), range(REQUESTS)))
    finally:
        gunicorn.terminate()
        try:
            gunicorn.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gunicorn.kill()
            gunicorn.wait()
    pids = {line.split()[0] for line in access_log.read_text().splitlines() if "/siem/events" in line}
    return statuses, pids


@pytest.mark.redis
@pytest.mark.slow
def test_siem_rate_limit_holds_across_two_gunicorn_workers_with_redis(tmp_path):
    # given two gunicorn workers sharing Redis (a database of this suite's own, emptied first)
    import redis

    cache_url = os.environ.get("HMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    redis.Redis.from_url(cache_url).flushdb()

    # when one consumer sends 200 pulls in parallel within one minute
    statuses, pids = run_two_workers(tmp_path, cache_url, concurrency=8)

    # then both workers served requests, and together they allowed one budget, no more
    assert len(pids) == 2, pids
    assert statuses.count(200) == PER_MINUTE, json.dumps({s: statuses.count(s) for s in set(statuses)})
    assert statuses.count(429) == REQUESTS - PER_MINUTE


@pytest.mark.slow
def test_siem_rate_limit_holds_across_two_workers_on_the_file_cache(tmp_path):
    # given two gunicorn workers and no HMD_CACHE_URL (make run's embedded fallback)
    # when one consumer sends 200 pulls one after another
    statuses, pids = run_two_workers(tmp_path, None, concurrency=1)

    # then both workers served requests, and together they allowed one budget
    assert len(pids) == 2, pids
    assert statuses.count(200) == PER_MINUTE
    assert statuses.count(429) == REQUESTS - PER_MINUTE

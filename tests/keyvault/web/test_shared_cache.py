"""State that every web process must share (issue 12, finding 10): the SIEM rate limit across gunicorn workers.

Two gunicorn workers serve one SIEM consumer; requests land on both (the access log
names each worker's process id). With a per-process cache each worker would allow the
full per-minute budget; with the shared cache (Redis through HMD_CACHE_URL, or the file
fallback ``make run`` uses) the consumer gets exactly one budget.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.servers.keyvault_web import serve

#: keyvault.audit.siem's default per-consumer limit.
PER_MINUTE = 120
REQUESTS = 200

CREATE_CONSUMER = """
from keyvault.audit import siem
from keyvault.audit import Actor
consumer, token = siem.create_consumer(name="collector", actor=Actor.system("tests"))
print(token)
"""


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
    access_log = tmp_path / "access.log"
    log_args = ("--threads", "2", "--keep-alive", "0", "--access-logfile", str(access_log),
                "--access-logformat", "%(p)s %(U)s %(s)s")
    with serve(tmp_path, setup=CREATE_CONSUMER, cache_url=cache_url, gunicorn_args=log_args) as live:
        token = live.setup_output
        _wait_for_a_fresh_minute()
        url = f"{live.base_url}/siem/events?limit=1"
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            statuses = list(pool.map(lambda _: _status(url, token), range(REQUESTS)))
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

"""The same rotation, end to end, through a real Celery worker on each supported broker.

The embedded filesystem broker (no server), Redis and RabbitMQ: ``manage.py rotation
start --wait`` returns only once a worker on that broker has rewrapped everything.
"""

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.scratch import ROOT, make_scratch

BROKERS = [
    pytest.param("filesystem", id="filesystem"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("amqp", id="rabbitmq", marks=pytest.mark.rabbitmq),
]


def broker_url(kind: str) -> str | None:
    if kind == "redis":
        return os.environ.get("HMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    if kind == "amqp":
        return os.environ.get("HMD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    return None  # the embedded default


@pytest.mark.slow
@pytest.mark.parametrize("kind", BROKERS)
def test_rotation_completes_on_a_real_worker(kind, tmp_path):
    extra = {"HMD_ROTATION_PARTITIONS": "2"}
    url = broker_url(kind)
    if url:
        extra["HMD_BROKER_URL"] = url
    scratch = make_scratch(tmp_path / kind, **extra)
    scratch.run("kms", "create-key", "payments")
    for owner in ("a", "b", "c"):
        scratch.run("kms", "generate-data-key", "--key", "payments", "--owner", owner)
    scratch.run("rotation", "policy", "--kek", "payments", "--grace", "0s")
    queue = f"kv-test-{os.getpid()}-{kind}"  # a private queue: nothing else consumes it
    scratch.extra_env["HMD_CELERY_QUEUE"] = queue
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "keyvault", "worker", "--pool", "solo", "--loglevel", "WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=scratch.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        started = scratch.run("rotation", "start", "--kek", "payments", "--wait", timeout=120)
        run_id = re.search(r"run #(\d+) started \(KEK payments, on demand\)", started.stdout.decode()).group(1)
        status = scratch.run("rotation", "status", run_id).stdout.decode()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)

    assert "completed" in status
    assert "rewrapped 3/3 (100.0%)" in status
    assert "coverage {'2': 3}" in status

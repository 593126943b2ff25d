"""The broker (a private redis-server, without persistence) SIGKILLed mid-rewrap and started again.

Everything queued is gone with it. Partitions keep going on the database meanwhile; the
message that moves the run on is kept in the outbox until the broker is back; partitions
whose messages were lost are re-sent when their lease runs out; workers and beat either
reconnect or exit and are restarted by their supervisor (as systemd does, deploy/systemd).
The run ends within the outage plus one lease period of an undisturbed run, nothing lost.
"""

import time

import pytest

from keyvault import audit
from rotation.models import OutboxMessage
from tests.rotation.faults import (
    LEASE_SECONDS, MARGIN_SECONDS, RECOVERY_SECONDS, artifacts, assert_nothing_lost, fault_env, prepare, rotate,
    start_workers,
)
from tests.rotation.processes import PrivateRedis

# Marked redis too: the private redis-server needs the Redis server package.
pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

OUTAGE_SECONDS = 10


def test_a_broker_restart_delays_the_run_and_strands_nothing(tmp_path):
    logs = artifacts("broker-restart")
    broker = PrivateRedis(tmp_path / "redis")
    env = fault_env(broker.url)
    keks = prepare(env, "warm-up", "calm", "payments")
    workers, supervisor = start_workers(env, logs, tmp_path)
    outage = {}

    def restart_the_broker(run_id):
        broker.kill()
        outage["from"] = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        broker.start()
        outage["seconds"] = time.monotonic() - outage["from"]

    try:
        rotate(env, "warm-up")
        calm_run, undisturbed = rotate(env, "calm")
        run_id, disturbed = rotate(env, "payments", disturb=restart_the_broker)
        alive = [process.alive for process in supervisor.processes]
    finally:
        supervisor.stop()
        broker.kill()

    print(f"\nundisturbed {undisturbed:.1f} s, broker down {outage['seconds']:.1f} s: {disturbed:.1f} s; "
          f"workers and beat exited {supervisor.exits()} time(s) and were restarted")
    assert_nothing_lost(keks["calm"], calm_run)
    assert_nothing_lost(keks["payments"], run_id)
    assert all(alive), "a worker or beat is down at the end"
    assert not OutboxMessage.objects.exists()
    bound = undisturbed + outage["seconds"] + LEASE_SECONDS + RECOVERY_SECONDS + MARGIN_SECONDS
    assert disturbed <= bound, (undisturbed, disturbed, bound)
    assert audit.verify_chain().ok

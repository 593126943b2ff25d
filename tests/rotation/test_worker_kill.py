"""A real rotation on real Celery workers and beat over Redis and PostgreSQL, a worker killed (-9) mid-rewrap.

Progress is derived from the database and every partition carries a lease, so the
partitions the dead worker held are taken over once their lease runs out: the run
finishes within one lease period (plus the recovery sweep's interval) of an undisturbed
run, with no data key lost, rewrapped twice, or left unreadable.
"""

import os

import pytest

from keyvault import audit
from rotation.models import RewrapPartition
from tests.rotation.faults import (
    LEASE_SECONDS, MARGIN_SECONDS, N_KEYS, RECOVERY_SECONDS, artifacts, assert_nothing_lost, fault_env, lease_holders,
    prepare, rotate, run_of, start_workers,
)
from tests.rotation.processes import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

@pytest.fixture
def redis_broker():
    import redis

    url = os.environ.get("HMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    redis.Redis.from_url(url).flushdb()
    return url


def test_a_killed_worker_costs_at_most_about_one_lease(redis_broker, tmp_path):
    logs = artifacts("worker-kill")
    env = fault_env(redis_broker)
    keks = prepare(env, "warm-up", "calm", "payments")
    workers, supervisor = start_workers(env, logs, tmp_path)
    killed = {}

    def kill_a_lease_holder(run_id):
        holders = wait_for(lambda: lease_holders(run_id), 30, "a worker holding a lease")
        victim = next(w for w in workers if any(os.getpgid(pid) == w.process.pid for pid in holders
                                                if os.path.exists(f"/proc/{pid}")))
        killed["at"] = run_of(run_id).rewrapped
        victim.kill()  # SIGKILL to the worker and its pool: no warm shutdown, no acks; the supervisor restarts it

    try:
        rotate(env, "warm-up")  # both workers are up before anything is timed
        calm_run, undisturbed = rotate(env, "calm")
        run_id, disturbed = rotate(env, "payments", disturb=kill_a_lease_holder)
    finally:
        supervisor.stop()

    print(f"\nundisturbed {undisturbed:.1f} s, one worker killed at {killed['at']}/{N_KEYS}: {disturbed:.1f} s "
          f"(lease {LEASE_SECONDS} s, recovery sweep every {RECOVERY_SECONDS:.1f} s)")
    assert_nothing_lost(keks["calm"], calm_run)
    assert_nothing_lost(keks["payments"], run_id)
    assert 0 < killed["at"] < N_KEYS
    assert RewrapPartition.objects.filter(run_id=run_id, takeovers__gt=0).exists(), "no lease was taken over"
    assert disturbed <= undisturbed + LEASE_SECONDS + RECOVERY_SECONDS + MARGIN_SECONDS, (undisturbed, disturbed)
    result = audit.verify_chain()
    assert result.ok, str(result)

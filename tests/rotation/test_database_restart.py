"""PostgreSQL (a private cluster this test starts) stopped with ``-m immediate`` mid-rewrap, started again later.

Every connection dies at once, as in a crash. Tasks that meet the outage retry first
(the retry never depends on the database) and their next attempt records the pause once
the database is back; leases and the recovery sweep pick up whatever was dropped. The
run ends within the outage plus one lease period of an undisturbed run, nothing lost.

Everything goes through ``manage.py`` and SQL: the test's own Django database is not used.
"""

import json
import os
import time

import psycopg
import pytest

from tests.rotation.faults import (
    BATCH_SIZE, LEASE_SECONDS, MARGIN_SECONDS, N_KEYS, NO_STALL_SWEEP, RECOVERY_SECONDS, artifacts, rotate,
    start_workers,
)
from tests.rotation.processes import PrivatePostgres, PrivateRedis, manage, wait_for

# Marked redis too: the private redis-server needs the Redis server package.
pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

OUTAGE_SECONDS = 10

SEED = """
from keyvault.audit import Actor
from keyvault.keys import services
from tests.rotation.conftest import seed_data_keys
for name, count in {counts!r}.items():
    seed_data_keys(services.create_kek(name=name, actor=Actor.system("tests")), count)
"""
CHECK = """
import json
from keyvault.keys import services
from keyvault.kms import get_provider
from keyvault.models import DataKey, KeyEncryptionKey
from rotation.models import RotationRun
kek = KeyEncryptionKey.objects.get(name={name!r})
provider = get_provider("local")
opened = sum(len(provider.decrypt(bytes(w), encryption_context=c).plaintext) == 32
             for w, c in DataKey.objects.filter(kek=kek).values_list("wrapped_key", "encryption_context"))
run = RotationRun.objects.get(pk={run_id})
print(json.dumps({{"state": run.state, "total": run.total_deks, "failed": run.failed_deks, "opened": opened,
                  "coverage": services.version_coverage(kek), "last_error": run.last_error}}))
"""


@pytest.fixture
def cluster():
    postgres = PrivatePostgres()
    yield postgres
    postgres.destroy()


def sql_progress(url: str):
    def progress(run_id: int) -> tuple[str, int]:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            return conn.execute("SELECT state, rewrapped FROM rotation_rotationrun WHERE id = %s", [run_id]).fetchone()
    return progress


def last_error(url: str, run_id: int) -> str:
    with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
        return conn.execute("SELECT last_error FROM rotation_rotationrun WHERE id = %s", [run_id]).fetchone()[0]


def test_a_database_restart_delays_the_run_and_loses_nothing(cluster, tmp_path):
    logs = artifacts("database-restart")
    broker = PrivateRedis(tmp_path / "redis")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_") and k != "DJANGO_SETTINGS_MODULE"}
    env.update(HMD_DATA_DIR=str(tmp_path / "data"), HMD_DEBUG="true", HMD_DATABASE_URL=cluster.url,
               HMD_BROKER_URL=broker.url, HMD_ROTATION_BATCH_SIZE=str(BATCH_SIZE),
               HMD_ROTATION_LEASE_SECONDS=str(LEASE_SECONDS), HMD_ROTATION_SWEEP_SECONDS="3600",
               HMD_ROTATION_STALL_SECONDS=NO_STALL_SWEEP,
               HMD_LOG_LEVEL="WARNING")
    manage(env, "migrate", "-v0")
    manage(env, "shell", "-c", SEED.format(counts={"warm-up": 1, "calm": N_KEYS, "payments": N_KEYS}))
    for name in ("warm-up", "calm", "payments"):
        manage(env, "rotation", "policy", "--kek", name, "--grace", "0s")
    workers, supervisor = start_workers(env, logs, tmp_path)
    progress = sql_progress(cluster.url)
    outage = {}

    def restart_the_database(run_id):
        cluster.stop_immediately()
        outage["from"] = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        cluster.start()
        outage["seconds"] = time.monotonic() - outage["from"]

    try:
        rotate(env, "warm-up", progress=progress)
        calm_run, undisturbed = rotate(env, "calm", progress=progress)
        run_id, disturbed = rotate(env, "payments", disturb=restart_the_database, progress=progress)
        alive = [process.alive for process in supervisor.processes]
        # The tasks that met the outage retried without writing; their next attempt, with the
        # database back, writes down why the run paused (by then it has moved on: history only).
        recorded = wait_for(lambda: "database unavailable" in last_error(cluster.url, run_id), 60,
                            "the pause to be recorded")
    finally:
        supervisor.stop()
        broker.kill()

    print(f"\nundisturbed {undisturbed:.1f} s, database down {outage['seconds']:.1f} s: {disturbed:.1f} s; "
          f"workers and beat exited {supervisor.exits()} time(s) and were restarted")
    for name, run in (("calm", calm_run), ("payments", run_id)):
        result = json.loads(manage(env, "shell", "-c", CHECK.format(name=name, run_id=run)).splitlines()[-1])
        assert (result["state"], result["total"], result["failed"]) == ("completed", N_KEYS, 0), result
        assert (result["opened"], result["coverage"]) == (N_KEYS, {"2": N_KEYS}), result
    assert recorded
    assert all(alive), "a worker or beat is down at the end"
    assert "OK" in manage(env, "audit", "verify", "--no-witness")
    bound = undisturbed + outage["seconds"] + LEASE_SECONDS + RECOVERY_SECONDS + MARGIN_SECONDS
    assert disturbed <= bound, (undisturbed, disturbed, bound)

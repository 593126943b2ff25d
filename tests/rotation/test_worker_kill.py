"""A real rotation on real Celery workers and beat over Redis and PostgreSQL, workers killed (-9) mid-rewrap.

Progress is derived from the database, so each new worker (after beat's sweep
re-dispatches the stalled run) continues where the dead one stopped: no data key
is lost, rewrapped twice, or left unreadable.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from keyvault import audit
from keyvault.keys import services as key_services
from keyvault.audit import Actor
from keyvault.kms import get_provider
from keyvault.models import DataKey, KeyVersion
from rotation.models import RotationRun
from tests.rotation.conftest import seed_data_keys

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

N_KEYS = 6000
KILL_AT = (0.15, 0.45, 0.75)


@pytest.fixture
def worker_env(tmp_path):
    import redis

    redis_url = os.environ.get("HMD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    redis.Redis.from_url(redis_url).flushdb()
    db = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        HMD_DATA_DIR=str(settings.DATA_DIR),
        HMD_DATABASE_URL=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        HMD_BROKER_URL=redis_url,
        HMD_LOCAL_KMS_KEYRING=settings.KMS["providers"]["local"]["keyring_path"],
        HMD_ROTATION_BATCH_SIZE="40",
        HMD_ROTATION_STALL_SECONDS="2",
        HMD_ROTATION_SWEEP_SECONDS="1",
        HMD_LOG_LEVEL="WARNING",
    )
    return env


class Worker:
    """A Celery process (worker by default) in its own process group."""

    def __init__(self, env, log_path, *args):
        args = args or ("worker", "--pool", "prefork", "--concurrency", "2", "--without-gossip", "--without-mingle",
                        "--without-heartbeat")
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "keyvault", *args, "--loglevel", "WARNING"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def kill(self):
        """SIGKILL the worker and its pool children: no warm shutdown, no acks."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.log.close()


def manage(env, *args):
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def wait_for(predicate, timeout, what, describe=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; {describe()}")


def test_killed_workers_lose_nothing(worker_env, tmp_path):
    tmp_path = Path(os.environ.get("HMD_TEST_ARTIFACTS", ROOT / "artifacts")) / "worker-kill"
    tmp_path.mkdir(parents=True, exist_ok=True)
    kek = key_services.create_kek(name="payments", actor=Actor.system("tests"))
    seed_data_keys(kek, N_KEYS)
    manage(worker_env, "rotation", "policy", "--kek", "payments", "--grace", "0s")
    worker = Worker(worker_env, tmp_path / "worker.log")
    beat = Worker(worker_env, tmp_path / "beat.log", "beat", "--schedule", str(tmp_path / "beat-schedule"))
    try:
        run_id = int(manage(worker_env, "rotation", "start", "--kek", "payments", "--reason", "kill test"))
        killed_at = []
        for fraction in KILL_AT:
            threshold = int(N_KEYS * fraction)
            done = wait_for(
                lambda threshold=threshold: (r := RotationRun.objects.get(pk=run_id)).rewrapped >= threshold and r.rewrapped,
                timeout=120, what=f"{threshold} rewrapped",
            )
            worker.kill()
            killed_at.append(done)
            # Nothing the dead worker was doing is half-written.
            run = RotationRun.objects.get(pk=run_id)
            assert DataKey.objects.filter(kek=kek, kek_version=2).count() == run.rewrapped
            worker = Worker(worker_env, tmp_path / "worker.log")  # beat's sweep finds the stalled run

        run = wait_for(
            lambda: (r := RotationRun.objects.get(pk=run_id)).state in ("completed", "failed") and r,
            timeout=180, what="the run to finish",
            describe=lambda: str(RotationRun.objects.filter(pk=run_id).values()[0]),
        )
    finally:
        worker.kill()
        beat.kill()

    assert run.state == "completed", run.last_error
    assert killed_at[0] < killed_at[-1] < N_KEYS, killed_at
    assert (run.total_deks, run.rewrapped, run.failed_deks) == (N_KEYS, N_KEYS, 0)
    assert DataKey.objects.filter(kek=kek).count() == N_KEYS
    assert key_services.version_coverage(kek) == {2: N_KEYS}
    provider = get_provider("local")
    for wrapped, context in DataKey.objects.filter(kek=kek).values_list("wrapped_key", "encryption_context"):
        assert len(provider.decrypt(bytes(wrapped), encryption_context=context).plaintext) == 32
    assert KeyVersion.objects.get(kek=kek, number=1).state == KeyVersion.State.DISABLED
    result = audit.verify_chain()
    assert result.ok, str(result)

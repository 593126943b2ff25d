"""What the fault tests share: workers' environment on this test's database, timed rotations, and the checks.

Every test rotates a KEK undisturbed first, then the same-sized one with its fault, on
the same workers, so the bound it asserts is relative to what this machine does now.
"""

import os
import re
import time
from pathlib import Path

from django.conf import settings
from django.db import connection

from keyvault.audit import Actor
from keyvault.keys import services as key_services
from keyvault.kms import get_provider
from keyvault.models import DataKey, KeyVersion
from rotation.models import RewrapPartition, RotationRun
from tests.rotation.conftest import seed_data_keys
from tests.rotation.processes import ROOT, Process, Supervisor, celery, manage, wait_for

N_KEYS = 6000
BATCH_SIZE = 50
#: Short leases keep the test fast; production's default is 30 s.
LEASE_SECONDS = 10
RECOVERY_SECONDS = max(1.0, LEASE_SECONDS / 3)
#: Slack for a shared, noisy machine: the restarted worker's start-up and scheduling jitter.
MARGIN_SECONDS = 10
KILL_AT = 0.3
NO_STALL_SWEEP = "600"


def fault_env(broker_url: str, **extra: str) -> dict:
    """The environment of workers and beat: this test's database and keyring, short leases, no minute sweep."""
    db = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        HMD_DATA_DIR=str(settings.DATA_DIR),
        HMD_DATABASE_URL=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        HMD_BROKER_URL=broker_url,
        HMD_LOCAL_KMS_KEYRING=settings.KMS["providers"]["local"]["keyring_path"],
        HMD_ROTATION_BATCH_SIZE=str(BATCH_SIZE),
        HMD_ROTATION_LEASE_SECONDS=str(LEASE_SECONDS),
        # Only leases, the outbox and retries may help: the minute's sweep never runs during the
        # test, and the stall sweep (a backstop) would wait longer than the whole test.
        HMD_ROTATION_SWEEP_SECONDS="3600",
        HMD_ROTATION_STALL_SECONDS=NO_STALL_SWEEP,
        HMD_LOG_LEVEL="WARNING",
        **extra,
    )
    return env


def artifacts(name: str) -> Path:
    folder = Path(os.environ.get("HMD_TEST_ARTIFACTS", ROOT / "artifacts")) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_of(run_id: int) -> RotationRun:
    return RotationRun.objects.get(pk=run_id)


def orm_progress(run_id: int) -> tuple[str, int]:
    return RotationRun.objects.values_list("state", "rewrapped").get(pk=run_id)


def rotate(env: dict, kek_name: str, *, disturb=None, at: float = KILL_AT, timeout: float = 240,
           progress=orm_progress) -> tuple[int, float]:
    """Rotate a KEK on the workers (disturbing them once ``at`` of it is rewrapped); returns the run and its seconds.

    ``progress(run_id) -> (state, rewrapped)`` reads the run (errors while the database is down count as "not yet").
    """
    started = time.monotonic()
    started_line = manage(env, "rotation", "start", "--kek", kek_name, "--reason", "fault test")  # run #ID started (…)
    run_id = int(re.search(r"run #(\d+) started", started_line).group(1))
    if disturb is not None:
        wait_for(lambda: progress(run_id)[1] >= N_KEYS * at, timeout, f"{at:.0%} rewrapped")
        disturb(run_id)
    wait_for(lambda: progress(run_id)[0] in ("completed", "failed"), timeout, "the run to finish",
             describe=lambda: str(progress(run_id)))
    return run_id, time.monotonic() - started


def assert_nothing_lost(kek, run_id: int) -> None:
    run = run_of(run_id)
    assert run.state == "completed", run.last_error
    assert (run.total_deks, run.failed_deks) == (N_KEYS, 0)
    assert DataKey.objects.filter(kek=kek).count() == N_KEYS
    assert key_services.version_coverage(kek) == {2: N_KEYS}
    provider = get_provider("local")
    for wrapped, context in DataKey.objects.filter(kek=kek).values_list("wrapped_key", "encryption_context"):
        assert len(provider.decrypt(bytes(wrapped), encryption_context=context).plaintext) == 32
    assert KeyVersion.objects.get(kek=kek, number=1).state == KeyVersion.State.DISABLED


def prepare(env: dict, *names: str) -> dict:
    keks = {}
    for name in names:
        keks[name] = key_services.create_kek(name=name, actor=Actor.system("tests"))
        seed_data_keys(keks[name], N_KEYS if name != "warm-up" else 1)
        manage(env, "rotation", "policy", "--kek", name, "--grace", "0s")
    return keks


def lease_holders(run_id: int) -> set[int]:
    """Pids of the worker processes holding a live lease on the run's partitions."""
    owners = RewrapPartition.objects.filter(run_id=run_id, done_at__isnull=True).exclude(owner="").values_list(
        "owner", flat=True)
    return {int(owner.partition("|")[0].rpartition(":")[2]) for owner in owners}


def start_workers(env: dict, logs: Path, scratch: Path) -> tuple[list[Process], Supervisor]:
    """Two workers (two pool processes each) and beat, under a supervisor that restarts whichever exits."""
    workers = [celery(env, logs / f"worker-{i}.log") for i in (1, 2)]
    beat = celery(env, logs / "beat.log", "beat", "--schedule", str(scratch / "beat-schedule"))
    return workers, Supervisor(*workers, beat)

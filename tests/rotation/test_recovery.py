"""Leases, the outbox and the recovery sweep, in this process (the same faults with real processes:
test_worker_kill.py, test_broker_restart.py, test_database_restart.py)."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerDown

from keyvault.audit import Actor
from rotation import services, tasks
from rotation.engine import leases, recovery
from rotation.engine.dispatch import Dispatcher, dispatcher
from rotation.models import OutboxMessage, RewrapPartition, RotationRun
from tests.rotation.conftest import seed_data_keys

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]
S = RotationRun.State
ACTOR = Actor.system("tests")
LATER = timedelta(seconds=leases.DEFAULT_LEASE_SECONDS + 1)


def rewrapping_run(kek, keys=40):
    """A run that has rotated and cut its partitions, none of them taken yet."""
    seed_data_keys(kek, keys)
    run = services.start_run(kek=kek, actor=ACTOR)
    with services.inline_dispatch():
        services.execute_run(run.pk)
    run.refresh_from_db()
    assert run.state == S.REWRAPPING
    return run


def test_a_lease_has_one_holder_until_it_runs_out(kek):
    run = rewrapping_run(kek)
    partition = run.partitions.first()
    now = timezone.now()
    dead, live = leases.owner_name("task-dead"), leases.owner_name("task-live")

    assert leases.claim(partition.pk, dead, now=now) is not None
    assert leases.claim(partition.pk, live, now=now + timedelta(seconds=5)) is None
    assert leases.renew(partition, dead, cursor=partition.lo, now=now + timedelta(seconds=5))

    taken = leases.claim(partition.pk, live, now=now + timedelta(seconds=5) + LATER)
    assert taken is not None and taken.owner == live and taken.takeovers == 1
    assert not leases.renew(partition, dead, cursor=partition.lo)  # the dead worker, back, stops at once


def test_a_retry_gets_its_own_lease_back_on_another_worker(kek):
    run = rewrapping_run(kek)
    partition = run.partitions.first()
    first_try = "host-a:101|task-42"

    assert leases.claim(partition.pk, first_try)
    retried = leases.claim(partition.pk, "host-b:202|task-42")

    assert retried is not None and retried.owner == "host-b:202|task-42" and retried.takeovers == 0


def test_a_partition_a_dead_worker_left_is_taken_over_and_the_run_finishes(kek):
    # given a worker that took a partition and died (its lease ran out)
    run = rewrapping_run(kek)
    abandoned = run.partitions.order_by("lo").first()
    leases.claim(abandoned.pk, leases.owner_name("task-dead"))
    RewrapPartition.objects.filter(pk=abandoned.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    # when the recovery sweep runs
    sent = []
    with dispatcher.redirect(lambda name, args, options: sent.append((name, args))):
        result = services.recover()

    # then that partition, and only it, goes out again, with no owner, for any worker to take
    assert sent == [("rewrap_partition", (run.pk, abandoned.pk))] and result["partitions"] == 1
    abandoned.refresh_from_db()
    assert (abandoned.owner, abandoned.takeovers) == ("", 1)
    with services.inline_dispatch():
        services.rewrap_partition(run.pk, abandoned.pk)  # one worker: this partition, then the three nobody took
    run.refresh_from_db()
    assert run.state == S.VERIFYING and run.rewrapped == 40
    assert not leases.open_partitions(run.pk).exists()


def test_an_idle_worker_leaves_a_live_lease_alone(kek):
    run = rewrapping_run(kek)
    busy, mine = run.partitions.order_by("lo")[:2]
    leases.claim(busy.pk, leases.owner_name("task-busy"))

    with services.inline_dispatch():
        services.rewrap_partition(run.pk, mine.pk)

    run.refresh_from_db()
    assert run.state == S.REWRAPPING  # the busy worker's range is still to do
    assert list(leases.open_partitions(run.pk).values_list("pk", flat=True)) == [busy.pk]


def test_a_run_moves_on_when_nothing_remains_even_if_a_dead_worker_kept_a_lease(kek):
    # given every data key rewrapped, but one partition's worker died after its last batch
    run = rewrapping_run(kek, keys=8)
    first, *others = run.partitions.order_by("lo")
    leases.claim(first.pk, leases.owner_name("task-dead"))
    services.rewrap_batch(run, after=0, hi=first.hi, batch_size=100)

    with services.inline_dispatch():
        services.rewrap_partition(run.pk, others[0].pk)

    # then the run does not wait out the dead worker's lease
    run.refresh_from_db()
    assert run.state == S.VERIFYING
    assert not leases.open_partitions(run.pk).exists()


def test_a_resumed_run_sends_only_the_partitions_nobody_holds(kek):
    run = rewrapping_run(kek)
    held, *rest = run.partitions.order_by("lo")
    leases.claim(held.pk, leases.owner_name("task-alive"))
    sent = []

    with dispatcher.redirect(lambda name, args, options: sent.append(args[1])):
        services.fan_out(run)

    assert sorted(sent) == sorted(p.pk for p in rest)
    assert run.partitions.count() == 4  # no new round while this one is open


# -- the outbox ------------------------------------------------------------------------------


def refused(name, args, options):
    raise BrokerDown("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_a_message_is_written_with_the_state_change_and_sent_after_commit(django_capture_on_commit_callbacks):
    sent = []
    outbox = Dispatcher(send=lambda name, args, options: sent.append((name, args, options)))

    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            outbox("execute_run", 7, priority=0)
            assert OutboxMessage.objects.get().args == [7] and sent == []

    assert sent == [("execute_run", (7,), {"priority": 0})]
    assert not OutboxMessage.objects.exists()


def test_a_rolled_back_change_sends_nothing(django_capture_on_commit_callbacks):
    sent = []
    outbox = Dispatcher(send=lambda name, args, options: sent.append(name))

    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError):
        with transaction.atomic():
            outbox("execute_run", 7)
            raise RuntimeError("the state change failed")

    assert sent == [] and not OutboxMessage.objects.exists()


def test_a_message_the_broker_refused_is_sent_by_the_sweep_once_it_is_back(django_capture_on_commit_callbacks):
    # given a broker that is down when the run moves on
    with django_capture_on_commit_callbacks(execute=True):
        Dispatcher(send=refused)("execute_run", 7)
    kept = OutboxMessage.objects.get()
    assert kept.attempts == 1 and "Connection refused" in kept.last_error

    # when the sweep runs while it is still down, then after it is back
    assert Dispatcher(send=refused).send_outbox(now=timezone.now() + LATER) == 0
    sent = []
    count = Dispatcher(send=lambda name, args, options: sent.append((name, args))).send_outbox(
        now=timezone.now() + 10 * LATER)

    # then the message went out exactly once, late but not lost
    assert count == 1 and sent == [("execute_run", (7,))]
    assert not OutboxMessage.objects.exists()


# -- stalled runs ------------------------------------------------------------------------------


def test_stall_thresholds_depend_on_the_phase(settings):
    settings.ROTATION_LEASE_SECONDS = 20
    settings.ROTATION_STALL_SECONDS = {}
    defaults = recovery.stall_thresholds()
    assert defaults["rewrapping"] == timedelta(seconds=40)  # two leases
    assert defaults["verifying"] < defaults["waiting"]

    settings.ROTATION_STALL_SECONDS = {"verifying": 15}
    assert recovery.stall_thresholds()["verifying"] == timedelta(seconds=15)
    settings.ROTATION_STALL_SECONDS = 90
    assert set(recovery.stall_thresholds().values()) == {timedelta(seconds=90)}


def stalled_for(kek, state, seconds, **fields):
    run = services.start_run(kek=kek, actor=ACTOR)
    RotationRun.objects.filter(pk=run.pk).update(state=state, heartbeat_at=timezone.now() - timedelta(seconds=seconds),
                                                 **fields)
    return run


def resumed(now=None):
    with services.inline_dispatch():
        return services.resume_stalled_runs(now=now or timezone.now())


def test_a_verifying_run_is_resumed_after_a_minute_not_five(kek, settings):
    settings.ROTATION_STALL_SECONDS = {}
    run = stalled_for(kek, S.VERIFYING, 61)

    assert resumed() == [run.pk]
    assert resumed() == []  # its heartbeat moved: not twice in a row


def test_a_paused_run_is_left_alone_until_its_retry_is_due(kek, settings):
    settings.ROTATION_STALL_SECONDS = {}
    run = stalled_for(kek, S.VERIFYING, 600, next_attempt_at=timezone.now() + timedelta(minutes=4))

    assert resumed() == []
    assert resumed(now=timezone.now() + timedelta(minutes=6)) == [run.pk]


def test_a_run_waiting_for_a_person_is_not_polled_every_minute(kek, settings):
    settings.ROTATION_STALL_SECONDS = {}
    stalled_for(kek, S.ROTATING, 200, paused_reason="waiting for a person: install the certificate")

    assert resumed() == []


# -- tasks ------------------------------------------------------------------------------------


def test_the_next_attempt_records_the_pause_the_database_could_not_take(kek):
    # given a run whose task met a database outage and retried without writing anything
    run = rewrapping_run(kek)
    at = timezone.now()
    RotationRun.objects.filter(pk=run.pk).update(heartbeat_at=at - timedelta(seconds=5))
    paused = {"reason": "database unavailable, retrying in 2 s: connection refused", "at": at.isoformat()}

    # when the retry runs with the database back (another worker holds the partition meanwhile)
    partition = run.partitions.first()
    leases.claim(partition.pk, leases.owner_name("task-other"))
    with services.inline_dispatch():
        assert tasks.rewrap_partition.run(run.pk, partition.pk, paused=paused) == 0

    # then the run says it paused, and when
    run.refresh_from_db()
    assert run.paused_reason.startswith("database unavailable") and f"{at:%H:%M:%S} UTC" in run.paused_reason
    assert run.last_error == run.paused_reason


def test_a_pause_recorded_late_does_not_mark_a_run_that_moved_on_as_paused(kek):
    run = services.start_run(kek=kek, actor=ACTOR)
    paused = {"reason": "database unavailable, retrying in 2 s: connection refused",
              "at": (timezone.now() - timedelta(minutes=1)).isoformat()}

    with services.inline_dispatch():
        tasks.execute_run.run(run.pk, paused=paused)
        services.drive(run.pk)

    run.refresh_from_db()
    assert run.state == S.RETIRING and run.paused_reason == ""
    assert run.last_error.startswith("database unavailable")  # the history keeps it


def test_a_partition_message_from_before_leases_is_dropped_for_the_sweep(kek):
    run = rewrapping_run(kek)

    assert tasks.rewrap_partition.run(run.pk, 0, 10**9) == 0
    assert run.partitions.filter(done_at__isnull=False).count() == 0


def test_a_throttling_provider_sets_the_backoff_floor():
    class Throttled(Exception):
        retry_after = 45

    assert tasks._backoff(0) == 2 and tasks._backoff(0, Throttled()) == 45
    assert tasks._backoff(20) == tasks.MAX_BACKOFF_SECONDS


def test_a_run_approved_after_a_long_wait_is_not_taken_for_a_stalled_one(kek, settings, operator, approvers):
    settings.ROTATION_STALL_SECONDS = {}
    services.update_policy(kek, actor=ACTOR, approvals_required=1)
    approver = approvers[0]
    run = services.start_run(kek=kek, actor=Actor.user(operator), user=operator)
    RotationRun.objects.filter(pk=run.pk).update(created_at=timezone.now() - timedelta(days=2))

    with services.inline_dispatch():
        services.decide(run, user=approver, actor=Actor.user(approver), comment="ok")

    assert resumed() == []


# -- settings -----------------------------------------------------------------------------------

PRINT_CELERY = (
    "import json, django; django.setup(); from django.conf import settings as s; from keyvault.celery import app;"
    "c = app.conf; print(json.dumps({'stall': s.ROTATION_STALL_SECONDS, 'lease': s.ROTATION_LEASE_SECONDS,"
    "'recovery': c.beat_schedule['rotation-recovery']['schedule'], 'transport': c.broker_transport_options,"
    "'retry': [c.broker_connection_retry, c.broker_connection_retry_on_startup, c.broker_connection_max_retries],"
    "'acks': [c.task_acks_late, c.task_reject_on_worker_lost, c.worker_prefetch_multiplier]}))"
)


def load_celery_settings(tmp_path, **variables):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update({"DJANGO_SETTINGS_MODULE": "keyvault.settings", "HMD_DATA_DIR": str(tmp_path / "data"), **variables})
    result = subprocess.run([sys.executable, "-c", PRINT_CELERY], capture_output=True, text=True, env=env,
                            cwd=ROOT)
    return json.loads(result.stdout) if result.returncode == 0 else result.stderr


def test_workers_wait_out_a_broker_restart_and_redis_redelivers_only_after_the_longest_task(tmp_path):
    loaded = load_celery_settings(tmp_path, HMD_BROKER_URL="redis://127.0.0.1:6379/0", HMD_ROTATION_LEASE_SECONDS="45",
                                  HMD_ROTATION_STALL_SECONDS="verifying=30,waiting=600")

    assert loaded["retry"] == [True, True, None]
    assert loaded["acks"] == [True, True, 1]
    assert loaded["transport"]["visibility_timeout"] >= tasks.MAX_BACKOFF_SECONDS
    assert (loaded["lease"], loaded["recovery"]) == (45, 15.0)
    assert loaded["stall"] == {"verifying": 30, "waiting": 600}


@pytest.mark.parametrize("value", ["verifying=soon", "finished=30", "verifying=0"])
def test_a_stall_threshold_that_means_nothing_stops_start_up(tmp_path, value):
    error = load_celery_settings(tmp_path, HMD_ROTATION_STALL_SECONDS=value)

    assert "HMD_ROTATION_STALL_SECONDS: give seconds (300) or phase=seconds pairs" in error

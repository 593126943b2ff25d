"""The beat sweep picks exactly the due policies (time is passed in, so it is frozen)."""

from datetime import datetime, time, timedelta, timezone as tz

import pytest

from keyvault.keys import services as key_services
from keyvault.audit import Actor
from keyvault.models import KeyEncryptionKey
from rotation import services
from rotation.models import RotationPolicy, RotationRun

pytestmark = pytest.mark.django_db
ACTOR = Actor.system("tests")
NOW = datetime(2027, 3, 3, 3, 30, tzinfo=tz.utc)  # a Wednesday, 03:30 UTC


def kek_due(name, *, due_in, **policy):
    kek = key_services.create_kek(name=name, actor=ACTOR)
    services.update_policy(kek, actor=ACTOR, **policy)
    RotationPolicy.objects.filter(kek=kek).update(next_due_at=NOW + due_in)
    return kek


def started_names(runs):
    return sorted(run.kek.name for run in runs)


def test_sweep_starts_exactly_the_due_policies():
    kek_due("overdue", due_in=timedelta(days=-1))
    kek_due("due-now", due_in=timedelta(0))
    kek_due("later", due_in=timedelta(minutes=1))
    kek_due("manual", due_in=timedelta(days=-1), auto=False)
    kek_due("outside-window", due_in=timedelta(days=-1), window_start=time(22), window_end=time(2))
    kek_due("inside-window", due_in=timedelta(days=-1), window_start=time(2), window_end=time(5), window_weekdays="1,2,3")
    kek_due("wrong-day", due_in=timedelta(days=-1), window_weekdays="6,7")
    disabled = kek_due("disabled", due_in=timedelta(days=-1))
    key_services.disable_kek(disabled, actor=ACTOR)

    runs = services.dispatch_due_rotations(now=NOW)

    assert started_names(runs) == ["due-now", "inside-window", "overdue"]
    assert all(run.kind == "planned" and run.initiator == "system:beat" for run in runs)


def test_sweep_twice_does_not_start_a_second_run():
    kek_due("overdue", due_in=timedelta(days=-1))

    first = services.dispatch_due_rotations(now=NOW)
    second = services.dispatch_due_rotations(now=NOW)

    assert len(first) == 1 and second == []
    assert RotationRun.objects.count() == 1


def test_usage_threshold_triggers_rotation():
    kek = kek_due("busy", due_in=timedelta(days=100), usage_threshold=3)
    for _ in range(3):
        key_services.encrypt_with_kek(kek, b"x", actor=ACTOR)

    runs = services.dispatch_due_rotations(now=NOW)

    assert started_names(runs) == ["busy"]
    assert runs[0].reason.startswith("usage")


def test_keks_without_policy_get_the_default_one_from_their_creation():
    kek = key_services.create_kek(name="fresh", actor=ACTOR, max_encryptions_per_version=5000)

    services.dispatch_due_rotations(now=NOW)

    policy = RotationPolicy.objects.get(kek=kek)
    assert (policy.period, policy.usage_threshold) == (timedelta(days=365), 5000)
    assert policy.next_due_at == kek.created_at + timedelta(days=365)


def test_sweep_destroys_keks_past_their_deletion_date():
    kek = key_services.create_kek(name="doomed", actor=ACTOR)
    key_services.schedule_kek_deletion(kek, actor=ACTOR, waiting_days=7, now=NOW - timedelta(days=8))

    services.dispatch_due_rotations(now=NOW)

    kek.refresh_from_db()
    assert kek.state == KeyEncryptionKey.State.DESTROYED


def test_sweep_resumes_stalled_runs(settings):
    settings.ROTATION_STALL_SECONDS = 60
    kek = key_services.create_kek(name="stalled", actor=ACTOR)
    run = services.start_run(kek=kek, actor=ACTOR)
    RotationRun.objects.filter(pk=run.pk).update(state="rewrapping", heartbeat_at=NOW - timedelta(minutes=5))

    assert services.resume_stalled_runs(now=NOW) == [run.pk]
    assert services.resume_stalled_runs(now=NOW) == []  # heartbeat moved: not twice in a row


def test_nist_warnings():
    policy = RotationPolicy(period=timedelta(days=1000), usage_threshold=2**33)

    warnings = policy.warnings()

    assert any("NIST SP 800-57" in w for w in warnings) and any("800-38D" in w for w in warnings)
    assert RotationPolicy(period=timedelta(days=365)).warnings() == []

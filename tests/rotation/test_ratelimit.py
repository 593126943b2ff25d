"""The per-provider rate limit: one budget shared by every worker, backoff on throttling, live caps.

Times are passed in (``now=``), so nothing sleeps; the budget's row is real (SQLite or
PostgreSQL), and the sharing test reserves from several connections at once.
"""

from __future__ import annotations

import threading

import pytest
from django.core.management import call_command
from django.db import connection

from keyvault.audit import Actor
from keyvault.models import AuditEvent
from rotation import services
from rotation.engine import ratelimit
from rotation.models import ProviderRateLimit

ACTOR = Actor.system("tests")
T0 = 1_000_000.0


@pytest.fixture
def caps(settings):
    settings.ROTATION_RATE_LIMITS = {"aws": 100, "gcp": 50}
    return settings.ROTATION_RATE_LIMITS


@pytest.mark.django_db(transaction=True)
def test_workers_on_separate_connections_share_one_budget(caps):
    # given four workers, each with its own database connection, reserving batches at once
    slots, errors = [], []

    def worker():
        try:
            for _ in range(5):
                grant = ratelimit.reserve({"aws": 1}, 20, now=T0)
                lane = grant.lanes[0]
                slots.append((lane.start, lane.start + grant.rows * lane.seconds_per_row))
        except Exception as exc:  # reported below; a thread cannot fail the test itself
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # then their slots never overlap: together they get 100 calls/s, not 100 each
    assert errors == []
    slots.sort()
    assert len(slots) == 20
    assert slots[0][0] == T0
    for (_, end), (start, _) in zip(slots, slots[1:]):
        assert start == pytest.approx(end)
    assert slots[-1][1] == pytest.approx(T0 + 20 * 20 / 100)


@pytest.mark.django_db
def test_a_grant_paces_its_rows_and_never_holds_more_than_two_seconds_of_rate(caps):
    grant = ratelimit.reserve({"gcp": 2}, 1000, now=T0)

    assert grant.rows == int(50 * ratelimit.BATCH_SECONDS / 2)  # 50 calls/s, 2 calls per data key
    assert grant.ready_at(0) == T0
    assert grant.ready_at(10) == pytest.approx(T0 + 10 * 2 / 50)
    assert grant.chunk_rows(grant.rows) == max(1, int(ratelimit.PACE_SECONDS * 50 / 2))


@pytest.mark.django_db
def test_unused_rows_are_given_back(caps):
    grant = ratelimit.reserve({"aws": 1}, 100, now=T0)
    ratelimit.release(grant, 40, now=T0)

    assert ratelimit.reserve({"aws": 1}, 1, now=T0).ready_at(0) == pytest.approx(T0 + 40 / 100)


@pytest.mark.django_db
def test_a_migration_waits_for_the_slower_of_its_two_providers(caps):
    grant = ratelimit.reserve({"aws": 1, "gcp": 1}, 1000, now=T0)

    assert grant.rows == int(50 * ratelimit.BATCH_SECONDS)
    assert grant.ready_at(50) == pytest.approx(T0 + 1.0)  # gcp's 50/s, not aws's 100/s


@pytest.mark.django_db
def test_throttling_pauses_halves_the_rate_and_it_recovers_gradually(caps):
    # when AWS refuses calls and asks for 3 seconds
    ratelimit.throttled(["aws"], retry_after=3, now=T0)

    # then nothing goes for 3 seconds, and then at half the cap
    paused = ratelimit.status("aws", now=T0 + 1)
    assert paused.paused_for == pytest.approx(2)
    assert paused.allowed == pytest.approx(50)
    assert ratelimit.reserve({"aws": 1}, 10, now=T0 + 1).ready_at(0) == pytest.approx(T0 + 3)

    # and the share grows back by RECOVERY_PER_SECOND after the pause, up to the cap
    later = ratelimit.status("aws", now=T0 + 3 + 10)
    assert later.allowed == pytest.approx(100 * (0.5 + 10 * ratelimit.RECOVERY_PER_SECOND))
    assert ratelimit.status("aws", now=T0 + 3 + 60).allowed == pytest.approx(100)
    assert "throttling" in later.describe() and "cap 100 calls/s" in later.describe()


@pytest.mark.django_db
def test_one_burst_of_refusals_halves_once_and_each_later_one_again(caps):
    ratelimit.throttled(["aws"], now=T0)
    ratelimit.throttled(["aws"], now=T0 + 0.1)  # the same burst, seen by another worker
    assert ProviderRateLimit.objects.get(provider="aws").factor == 0.5

    later = T0 + ratelimit.DECREASE_INTERVAL + 1
    ratelimit.throttled(["aws"], now=later)
    row = ProviderRateLimit.objects.get(provider="aws")
    paused_until = T0 + 0.1 + ratelimit.DEFAULT_PAUSE  # recovery had begun after the pause
    recovered = 0.5 + ratelimit.RECOVERY_PER_SECOND * (later - paused_until)
    assert row.factor == pytest.approx(recovered / 2) and row.throttles == 3


@pytest.mark.django_db
def test_a_provider_without_a_cap_is_limited_after_it_throttles_from_the_rate_it_had(caps):
    # given an uncapped provider that did 600 calls in the last 3 seconds
    assert ratelimit.status("vault", now=T0).allowed is None
    ratelimit.reserve({"vault": 1}, 600, now=T0)

    # when it throttles
    ratelimit.throttled(["vault"], retry_after=0.5, now=T0 + 3)

    # then it gets half of that rate, and no limit again once it has recovered
    assert ratelimit.status("vault", now=T0 + 4).allowed == pytest.approx(600 / 3 / 2, rel=0.05)
    assert ratelimit.status("vault", now=T0 + 200).allowed is None


@pytest.mark.django_db
def test_a_cap_changed_during_a_run_applies_to_the_next_reservation_and_is_audited(caps):
    # given batches paced at the default 100 calls/s, one reserved far ahead
    ratelimit.reserve({"aws": 1}, 200, now=T0)

    # when an operator raises the cap
    services.set_rate_limit("aws", 1000, actor=ACTOR, now=T0)

    # then the next batch starts at once and goes ten times as fast
    grant = ratelimit.reserve({"aws": 1}, 100, now=T0)
    assert grant.ready_at(0) == T0 and grant.ready_at(100) == pytest.approx(T0 + 0.1)
    event = AuditEvent.objects.filter(action="rotation.policy_changed", target_id="aws").get()
    assert event.details["rate_limit"]["cap"] == [100, 1000]

    # and "no cap" and "back to the default" are changes too
    services.set_rate_limit("aws", 0, actor=ACTOR)
    assert services.rate_limit_status("aws").allowed is None
    services.set_rate_limit("aws", None, actor=ACTOR)
    assert services.rate_limit_status("aws").cap == 100
    assert AuditEvent.objects.filter(action="rotation.policy_changed", target_id="aws").count() == 3


@pytest.mark.django_db
def test_a_negative_cap_is_refused():
    with pytest.raises(ValueError):
        services.set_rate_limit("aws", -1, actor=ACTOR)
    assert not ProviderRateLimit.objects.exists()


@pytest.mark.django_db
def test_the_rate_limit_command_shows_and_changes_caps(caps, capsys):
    call_command("rotation", "rate-limit", "--provider", "aws", "--cap", "250")
    call_command("rotation", "rate-limit", "--provider", "gcp")

    out = capsys.readouterr().out
    assert "aws: cap 250 calls/s (set by an operator); allowed now 250 calls/s" in out
    assert "gcp: cap 50 calls/s (HMD_ROTATION_RATE_LIMITS default)" in out
    assert ProviderRateLimit.objects.get(provider="aws").cap == 250

"""A run's rewrap partitions on the run page, in progress.json and in ``manage.py rotation status``."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from rotation import services
from rotation.engine import leases
from tests.rotation.conftest import seed_data_keys
from tests.rotation.test_admin import _fresh_cache, clients, start_from_console, url, users  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db

HOSTILE_OWNER = '<script>alert("x")</script>:42|task-evil'


def partitioned_run(client, kek):
    """A run with three partitions: one done, one leased by a live worker, one whose worker died."""
    seed_data_keys(kek, 3)
    run = start_from_console(client, kek)
    now = timezone.now()
    done, live, dead = leases.create(run, [(1, 100), (100, 200), (200, 300)], now=now)
    leases.claim(done.pk, "host-a:1|task-a", now=now)
    leases.release(done, "host-a:1|task-a", now=now)
    claimed = leases.claim(live.pk, HOSTILE_OWNER, now=now)
    leases.renew(claimed, HOSTILE_OWNER, cursor=149, now=now)
    leases.claim(dead.pk, "host-b:7|task-b", now=now - timedelta(hours=1))
    return run, live, dead


def test_overview_counts_and_labels_an_expired_lease(clients, kek):  # noqa: F811
    run, live, dead = partitioned_run(clients["operator"], kek)

    view = services.partition_overview(run.pk)

    assert (view.done, view.open) == (1, 2)
    by_id = {part.id: part for part in view.shown}
    assert by_id[dead.pk].lease_expired and by_id[dead.pk].lease_label == "expired \u2014 will be taken over"
    assert not by_id[live.pk].lease_expired and by_id[live.pk].lease_label.startswith("until ")
    assert by_id[live.pk].progress_label == "50/100 ids (50%)"
    assert by_id[dead.pk].progress_label == "0/100 ids (0%)"


def test_run_page_and_progress_show_partitions_escaped(clients, kek):  # noqa: F811
    run, live, dead = partitioned_run(clients["operator"], kek)

    page = clients["auditor"].get(url("rotation_rotationrun_change", run.pk)).content.decode()
    progress = clients["auditor"].get(url("rotation_rotationrun_progress", run.pk)).json()

    assert "1 done, 2 open" in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;:42|task-evil" in page
    assert "expired \u2014 will be taken over" in page and "[200, 300)" in page
    partitions = progress["partitions"]
    assert (partitions["done"], partitions["open"]) == (1, 2)
    rows = {part["id"]: part for part in partitions["open_partitions"]}
    assert rows[live.pk]["owner"] == HOSTILE_OWNER and rows[live.pk]["cursor_handled"] == 50
    assert rows[dead.pk]["lease_expired"] is True and rows[dead.pk]["lease_label"] == "expired \u2014 will be taken over"


def test_status_command_lists_open_partitions_and_the_expired_lease(clients, kek):  # noqa: F811
    run, live, dead = partitioned_run(clients["operator"], kek)

    text = StringIO()
    call_command("rotation", "status", str(run.pk), stdout=text)
    as_json = StringIO()
    call_command("rotation", "status", str(run.pk), "--json", stdout=as_json)

    lines = text.getvalue().splitlines()
    assert "  partitions: 1 done, 2 open" in lines
    dead_line = next(line for line in lines if line.strip().startswith(f"#{dead.pk} "))
    assert "ids [200, 300) 'host-b:7|task-b': lease expired \u2014 will be taken over, 0/100 ids (0%)" in dead_line
    live_line = next(line for line in lines if line.strip().startswith(f"#{live.pk} "))
    assert repr(HOSTILE_OWNER) in live_line and "50/100 ids (50%)" in live_line
    partitions = json.loads(as_json.getvalue())["partitions"]
    assert (partitions["done"], partitions["open"]) == (1, 2)

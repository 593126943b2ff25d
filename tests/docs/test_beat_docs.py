"""The docs say what beat runs, all of it, and offer nothing that runs less.

A Kubernetes CronJob running ``manage.py rotation sweep`` was offered "instead of beat";
it ran one of beat's jobs and silently dropped the others (the daily
``rotation.flag_expiring_secrets`` among them: expiry reminders stopped). Now the table
in architecture.md must list exactly the entries of ``CELERY_BEAT_SCHEDULE``, and no
document may offer a replacement for beat.
"""

from __future__ import annotations

import re

from django.conf import settings

from tests.docs.examples import DOCS, ROOT

ARCHITECTURE = ROOT / "docs" / "design" / "architecture.md"
TASK_ROW = re.compile(r"^\| `([a-z_.]+)` \|", re.MULTILINE)
#: "a CronJob instead of beat", "or a CronJob running manage.py rotation sweep", "replace beat with cron" …
REPLACES_BEAT = re.compile(
    r"(cron\w*[^|]{0,80}\binstead of\b[^|]{0,20}\bbeat)|(\binstead of\b[^|]{0,20}\bbeat[^|]{0,40}\bcron)"
    r"|(\bor\b[^|]{0,20}\bcronjob\b[^|]{0,40}\brotation sweep)",
    re.IGNORECASE,
)


def documented_beat_tasks() -> list[str]:
    text = ARCHITECTURE.read_text()
    section = text.split("## Beat jobs", 1)[1].split("\n## ", 1)[0]
    return TASK_ROW.findall(section)


def scheduled_tasks() -> set[str]:
    return {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}


def test_the_beat_table_lists_every_scheduled_task_and_nothing_else():
    documented = documented_beat_tasks()
    assert len(documented) == len(set(documented)), "a task is listed twice"
    assert set(documented) == scheduled_tasks()


def test_the_schedule_has_the_jobs_the_table_was_written_for():
    # with the test settings' defaults every optional entry (audit checkpoints) is on, so the
    # comparison above covers all of them; a job added later must be added to the table
    assert {"rotation.dispatch_due_rotations", "rotation.recover", "rotation.flag_expiring_secrets",
            "keyvault.audit_checkpoint"} <= scheduled_tasks()


def test_no_document_offers_a_replacement_for_beat():
    offers = []
    for path in DOCS:
        text = " ".join(path.read_text().split())  # a sentence may wrap
        offers += [f"{path.relative_to(ROOT)}: …{match.group(0)}…" for match in REPLACES_BEAT.finditer(text)]
    assert offers == []


def test_the_pattern_catches_the_old_wording():
    old = ["**Kubernetes CronJob instead of beat**: run the sweep on a schedule",
           "a CronJob running the rotation sweep instead of Celery beat",
           "`celery -A keyvault beat` (or a Kubernetes CronJob running `manage.py rotation sweep`)"]
    assert all(REPLACES_BEAT.search(text) for text in old)
    assert not REPLACES_BEAT.search("A CronJob running `rotation sweep` does not replace it")

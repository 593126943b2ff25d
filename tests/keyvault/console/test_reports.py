"""Auditor reports: rows on seeded rotations, export shapes, the chain stamp and the audit event of each export."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from datetime import timedelta
from io import StringIO

import pytest
from django.core.cache import cache
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from django.utils import timezone

from keyvault import audit
from keyvault.console import reports
from keyvault.keys import services as key_services
from keyvault.audit import Actor
from keyvault.models import AuditEvent, KeyVersion
from rotation import services as rotation
from rotation.models import RotationPolicy, RotationRun
from tests.keyvault import make_role_user
from tests.rotation.conftest import approvers, kek, make_user, operator, seed_data_keys  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("tests")


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()


@pytest.fixture
def seeded(kek, operator, approvers):
    """payments: an approved, driven rotation (olivia asked, adam approved); ledger: an unapproved one by the system."""
    adam, _ = approvers
    seed_data_keys(kek, 5)
    with rotation.inline_dispatch():
        rotation.update_policy(kek, actor=SYSTEM, approvals_required=1)
        run = rotation.start_run(kek=kek, actor=Actor.user(operator), user=operator, reason="quarterly")
        rotation.decide(run, user=adam, actor=Actor.user(adam), comment="change CHG-42 approved")
        run = rotation.drive(run.pk)
        ledger = key_services.create_kek(name="ledger", actor=SYSTEM)
        other = rotation.drive(rotation.start_run(kek=ledger, actor=SYSTEM, reason="drill").pk)
    return {"payments": kek, "ledger": ledger, "run": run, "other": other, "adam": adam, "olivia": operator}


def body_and_seal(content: bytes) -> tuple[bytes, str]:
    text = content.rstrip(b"\n")
    cut = text.rfind(b"\n") + 1
    return content[:cut], content[cut:].decode()


# -- rows ---------------------------------------------------------------------------------


def test_inventory_lists_every_version_with_the_rotation_that_made_it(seeded):
    # when
    report = reports.build("inventory", {"kek": "payments"})

    # then
    assert [(row["kek"], row["version"], row["primary"]) for row in report.rows] == [
        ("payments", 1, False), ("payments", 2, True)]
    v1, v2 = report.rows
    assert v1["made_by"] == "created with the key"
    assert v2["made_by"].startswith(f"run #{seeded['run'].pk} (on demand")
    assert v2["data_keys"] == 5 and v1["data_keys"] == 0  # the run rewrapped them all
    assert v2["rotation_period"] == "365d" and v2["provider"] == "local"


def test_rotations_report_names_approvers_and_runbook_evidence(seeded):
    # when
    report = reports.build("rotations", {})

    # then
    by_target = {row["target"]: row for row in report.rows}
    assert set(by_target) == {"KEK payments", "KEK ledger"}
    payments = by_target["KEK payments"]
    assert payments["initiator"] == "user:olivia" and payments["reason"] == "quarterly"
    assert payments["previous_version"] == 1 and payments["new_version"] == 2 and payments["rewrapped"] == 5
    assert len(payments["approvals"]) == 1
    assert payments["approvals"][0].startswith("adam approved at ")
    assert payments["approvals"][0].endswith(": change CHG-42 approved")
    evidence = "\n".join(payments["evidence"])
    assert "[done] precheck.approvals by user:adam" in evidence and "approved by adam" in evidence
    assert "[done] rotate by system:rotation-engine" in evidence and "v2 is primary (was v1)" in evidence
    assert by_target["KEK ledger"]["approvals"] == []


def test_rotations_report_filters_by_user_kek_and_period(seeded):
    assert [r["target"] for r in reports.build("rotations", {"user": "adam"}).rows] == ["KEK payments"]
    assert [r["target"] for r in reports.build("rotations", {"user": "olivia"}).rows] == ["KEK payments"]
    assert reports.build("rotations", {"user": "nobody"}).rows == []
    assert [r["target"] for r in reports.build("rotations", {"kek": "ledger"}).rows] == ["KEK ledger"]
    tomorrow = (timezone.now() + timedelta(days=1)).date().isoformat()
    assert reports.build("rotations", {"since": tomorrow}).rows == []
    assert len(reports.build("rotations", {"until": tomorrow}).rows) == 2


def test_activity_report_shows_what_a_user_did_and_what_happened_to_a_key(seeded):
    # when
    by_olivia = reports.build("activity", {"user": "olivia"})
    on_ledger = reports.build("activity", {"kek": "ledger"})

    # then
    assert {row["actor"] for row in by_olivia.rows} == {"user:olivia"}
    assert [row["action"] for row in by_olivia.rows] == ["rotation.started"]
    assert {row["target_id"] for row in on_ledger.rows} == {"ledger"}
    actions = [row["action"] for row in on_ledger.rows]
    assert actions[0] == "kek.created" and "kek.rotated" in actions and "rotation.started" in actions
    sequences = [row["sequence"] for row in on_ledger.rows]
    assert sequences == sorted(sequences)
    stored = AuditEvent.objects.get(sequence=sequences[0])
    assert on_ledger.rows[0]["hash"] == stored.hash


def test_violations_lists_overdue_past_cryptoperiod_beyond_nist_and_failed_runs(seeded):
    # given: payments overdue by 3 days, ledger's primary 800 days old under a policy beyond NIST,
    # an old v1 still enabled after 4 years, and a failed run
    now = timezone.now()
    payments, ledger = seeded["payments"], seeded["ledger"]
    RotationPolicy.objects.filter(kek=payments).update(next_due_at=now - timedelta(days=3, hours=1))
    rotation.update_policy(ledger, actor=SYSTEM, period=timedelta(days=800))
    KeyVersion.objects.filter(kek=ledger, is_primary=True).update(created_at=now - timedelta(days=801))
    KeyVersion.objects.filter(kek=payments, number=1).update(created_at=now - timedelta(days=4 * 365))
    failed = RotationRun.objects.create(kek=payments, state=RotationRun.State.FAILED, initiator="system:beat",
                                        last_error="provider unavailable: local")

    # when
    report = reports.build("violations", {})

    # then
    found = {(row["kind"], row["target"]) for row in report.rows}
    assert ("overdue_rotation", "KEK payments") in found
    assert ("past_originator_period", "KEK ledger v2") in found
    assert ("past_recipient_period", "KEK payments v1") in found
    assert ("policy_beyond_nist", "KEK ledger") in found
    assert ("failed_run", f"KEK payments run #{failed.pk}") in found
    overdue = next(row for row in report.rows if row["kind"] == "overdue_rotation")
    assert overdue["days"] == 3 and f"run #{seeded['run'].pk} in progress" in overdue["detail"]
    cryptoperiod = next(row for row in report.rows if row["kind"] == "past_originator_period")
    assert "limit 800 days (policy)" in cryptoperiod["detail"]
    assert not any(row["target"] == "KEK payments v2" for row in report.rows)  # fresh primary is fine


def test_violations_without_policy_use_the_nist_period(system_actor):
    # given a KEK with no policy whose primary is older than two years
    fresh = key_services.create_kek(name="legacy", actor=system_actor)
    KeyVersion.objects.filter(kek=fresh).update(created_at=timezone.now() - timedelta(days=731))

    # when
    rows = reports.build("violations", {"kek": "legacy"}).rows

    # then
    assert [(r["kind"], r["target"]) for r in rows] == [("past_originator_period", "KEK legacy v1")]
    assert "limit 730 days (NIST SP 800-57)" in rows[0]["detail"]


# -- filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("filters, message", [
    ({"since": "yesterday"}, "since: not a date"),
    ({"until": "2026-13-45"}, "until: not a date"),
    ({"since": "2026-02-01", "until": "2026-01-01"}, "since must be before until"),
    ({"kek": "no-such-key"}, "no key-encryption key named"),
    ({"user": "two words"}, "not a user name"),
])
def test_bad_filters_are_refused_with_a_clear_message(filters, message):
    with pytest.raises(reports.InvalidReportRequest, match=message):
        reports.build("activity", filters)


def test_a_filter_the_report_does_not_take_is_refused():
    with pytest.raises(reports.InvalidReportRequest, match="does not filter by user"):
        reports.build("inventory", {"user": "adam"})
    with pytest.raises(reports.InvalidReportRequest, match="no report named"):
        reports.build("secrets", {})


# -- exports ---------------------------------------------------------------------------------------


def test_csv_export_is_stamped_recorded_and_sealed(seeded):
    # given the chain position before the export
    position = audit.chain_position()
    report = reports.build("rotations", {"kek": "payments"})

    # when
    result = reports.export(report, fmt="csv", actor=Actor.user(seeded["adam"]))

    # then the body names the chain position and parses as CSV after its comment lines
    body, seal = body_and_seal(result.content)
    text = body.decode()
    assert f"# audit_chain_position: sequence={position[0]} hash={position[1]}\n" in text
    assert "# filters: kek=payments\n" in text
    rows = list(csv.DictReader(io.StringIO("".join(line for line in text.splitlines(True) if not line.startswith("#")))))
    assert [row["run"] for row in rows] == [str(seeded["run"].pk)]
    assert list(rows[0]) == [c.key for c in reports.ROTATION_COLUMNS]
    assert "adam approved at" in rows[0]["approvals"]
    # and the export is in the audit log with the body's SHA-256
    digest = hashlib.sha256(body).hexdigest()
    assert seal == f"# keyvault-export: body-sha256={digest} audit-event=#{result.event_sequence} report=rotations\n"
    event = AuditEvent.objects.get(sequence=result.event_sequence)
    assert event.action == audit.Action.AUDIT_EXPORTED and event.actor == "user:adam"
    assert event.sequence == position[0] + 1
    assert event.details == {
        "report": "rotations", "format": "csv", "rows": 1, "truncated": False,
        "filters": {"since": None, "until": None, "user": None, "kek": "payments"},
        "chain_sequence": position[0], "chain_hash": position[1], "body_sha256": digest,
    }
    assert audit.verify_chain().ok


def test_json_export_round_trips_and_verifies(seeded):
    report = reports.build("inventory", {})

    result = reports.export(report, fmt="json", actor=SYSTEM)

    document = json.loads(result.content)
    seal = document.pop("export")
    assert seal == {"audit_event": result.event_sequence, "body_sha256": result.body_sha256}
    assert hashlib.sha256(reports.canonical_json(document)).hexdigest() == result.body_sha256
    assert document["audit_chain_position"] == {"sequence": report.chain_sequence, "hash": report.chain_hash}
    assert document["columns"] == [c.key for c in reports.INVENTORY_COLUMNS]
    assert document["row_count"] == len(document["rows"]) == 4  # two versions of each KEK
    assert reports.verify_export(result.content).event.sequence == result.event_sequence


@pytest.mark.parametrize("fmt", ["csv", "json", "html"])
def test_a_changed_export_no_longer_verifies(seeded, fmt):
    result = reports.export(reports.build("rotations", {}), fmt=fmt, actor=SYSTEM)
    assert reports.verify_export(result.content).body_sha256 == result.body_sha256

    tampered = result.content.replace(b"quarterly", b"Quarterly", 1)

    assert tampered != result.content
    with pytest.raises(reports.ExportNotVerified):
        reports.verify_export(tampered)


def test_an_export_whose_event_is_missing_does_not_verify(seeded):
    # given a well-formed seal for a body no audit event records
    body = b"# Keyvault report: forged\nrun\n1\n"
    digest = hashlib.sha256(body).hexdigest()
    forged = body + f"# keyvault-export: body-sha256={digest} audit-event=#1 report=rotations\n".encode()

    with pytest.raises(reports.ExportNotVerified, match="no audit.exported event records"):
        reports.verify_export(forged)


def test_csv_cells_that_look_like_formulas_are_neutralised(system_actor):
    key_services.create_kek(name="f", actor=system_actor, description="x")
    report = reports.build("activity", {"kek": "f"})
    report.rows[0]["actor"] = "=HYPERLINK(\"http://evil\")"

    text = reports.render_csv(report, generated_by="tests").decode()

    assert "'=HYPERLINK" in text


# -- CSV for spreadsheets: formula triggers after any separator are neutralised (issue 12, #12) ----------

SPREADSHEET_DELIMITERS = (",", ";", "\t", "|")


def _cells_a_spreadsheet_may_see(text: str):
    """Every cell of ``text`` as the csv module reads it with each delimiter, and as a naive
    splitter sees it (lines, then any separator), with the spaces and quotes spreadsheets skip."""
    for delimiter in SPREADSHEET_DELIMITERS:
        for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
            yield from row
    yield from re.split(r"[,;\t|\r\n]", text)


def _starts_a_formula(cell: str) -> bool:
    return cell.lstrip(' "')[:1] in reports.FORMULA_TRIGGERS


@pytest.mark.parametrize("text", ["x;=1+1", "x|@SUM(A1)", "a,-2+3", "tab\t=cmd", "line\n+1", "x; =1", 'x;"=1',
                                  "=HYPERLINK(1)", "\t=1", "\r\r@"])
def test_formula_after_any_separator_is_neutralised(text):
    # when a cell holding a formula behind a separator is written
    out = io.StringIO()
    reports.SpreadsheetSafeWriter(out).writerow([text, 1])

    # then no cell, however a spreadsheet splits the line, starts with a formula trigger
    assert not [cell for cell in _cells_a_spreadsheet_may_see(out.getvalue()) if _starts_a_formula(cell)]


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cells=st.lists(st.text(alphabet=st.sampled_from(list("=+-@\t\r\n,;|\" 'ax1")) | st.characters(),
                               max_size=30), min_size=1, max_size=4))
def test_no_spreadsheet_cell_of_a_written_row_starts_a_formula(cells):
    # given arbitrary text cells, written as Keyvault writes every CSV
    out = io.StringIO()
    reports.SpreadsheetSafeWriter(out).writerow(cells)
    written = out.getvalue()

    # then read back with any delimiter, or split naively, no cell starts with a formula trigger
    assert not [cell for cell in _cells_a_spreadsheet_may_see(written) if _starts_a_formula(cell)]
    # and read back as written, each cell is the original with apostrophes added, and only where needed
    (read,) = list(csv.reader(io.StringIO(written, newline="")))
    assert read == [reports.neutralise_formulas(cell) for cell in cells]
    for original, cell in zip(cells, read, strict=True):
        assert cell.replace("'", "") == original.replace("'", "")
        if not _starts_a_formula(original) and not re.search(r"[,;\t|\r\n][ \"]*[=+\-@\t\r]", original):
            assert cell == original


def test_every_csv_export_neutralises_formulas_after_separators(seeded, tmp_path):
    # given an audit event and a report row carrying ``x;=1+1`` behind a separator
    audit.record(audit.Action.OTHER, actor=Actor.system("x;=1+1"), target=("report", "x|@SUM(A1)"),
                 details={"note": "a,-2+3"})
    report = reports.build("activity", {})

    # when the report's CSV and the audit CSV export are written
    report_csv = reports.render_csv(report, generated_by="x;=cmd").decode()
    audit_csv = StringIO()
    call_command("audit", "export", "--format", "csv", stdout=audit_csv)

    # then neither holds a cell that starts a formula, whatever the spreadsheet splits on
    for text in (report_csv, audit_csv.getvalue()):
        assert "x;'=1+1" in text
        assert not [cell for cell in _cells_a_spreadsheet_may_see(text) if _starts_a_formula(cell)]


# -- command line ----------------------------------------------------------------------------------


def test_report_command_writes_a_file_that_audit_verify_export_accepts(seeded, tmp_path):
    # given an auditor exports the rotations report as CSV from the CLI
    target = tmp_path / "rotations.csv"
    err = StringIO()
    call_command("report", "rotations", "--format", "csv", "--since", "2000-01-01", "--user", "adam",
                 "--output", str(target), stderr=err)
    content = target.read_bytes()
    assert content.startswith(b"# Keyvault report: rotations")
    assert "1 rows; body sha256 " in err.getvalue()

    # when they check it
    out = StringIO()
    call_command("audit", "verify-export", str(target), stdout=out)

    # then the hash matches an audit.exported event and the chain is intact
    text = out.getvalue()
    assert "OK: audit chain intact" in text
    assert f"OK: export body sha256 {hashlib.sha256(body_and_seal(content)[0]).hexdigest()} matches" in text
    event = AuditEvent.objects.filter(action="audit.exported").latest("sequence")
    assert event.details["filters"]["user"] == "adam" and event.actor.startswith("system:cli:")


def test_report_command_prints_json_to_stdout(seeded):
    out = StringIO()
    call_command("report", "violations", "--format", "json", stdout=out, stderr=StringIO())
    document = json.loads(out.getvalue())
    assert document["report"] == "violations" and "export" in document


def test_verify_export_refuses_an_edited_file(seeded, tmp_path):
    target = tmp_path / "r.csv"
    call_command("report", "rotations", "-o", str(target), stderr=StringIO())
    target.write_bytes(target.read_bytes().replace(b"quarterly", b"monthly"))

    with pytest.raises(CommandError, match="export NOT verified: body sha256 is"):
        call_command("audit", "verify-export", str(target), stdout=StringIO())


def test_report_command_rejects_bad_filters(db):
    with pytest.raises(CommandError, match="since: not a date"):
        call_command("report", "activity", "--since", "last tuesday", stderr=StringIO())


# -- console views -----------------------------------------------------------------------------------


def test_auditor_sees_a_report_page_with_its_chain_position(client, seeded):
    client.force_login(make_role_user("auditor"))

    response = client.get(reverse("reports:report", args=["rotations"]), {"kek": "payments"})

    assert response.status_code == 200
    page = response.content.decode()
    assert "change CHG-42 approved" in page and "KEK payments" in page and "KEK ledger" not in page
    assert f"#{response.context['report'].chain_sequence}" in page
    assert 'action="/reports/rotations/export.csv"' in page


def test_bad_filter_on_the_page_is_a_400_with_the_reason(client, seeded):
    client.force_login(make_role_user("auditor"))

    response = client.get(reverse("reports:report", args=["activity"]), {"since": "2026-99-01"})

    assert response.status_code == 400
    assert "since: not a date" in response.content.decode()


def test_console_export_downloads_a_verifiable_file(client, seeded):
    auditor = make_role_user("auditor")
    client.force_login(auditor)

    response = client.post(reverse("reports:export", args=["rotations", "csv"]), {"since": "2000-01-01"})

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"].startswith('attachment; filename="keyvault-rotations-')
    check = reports.verify_export(response.content)
    assert check.body_sha256 == response["X-Keyvault-Body-SHA256"]
    assert str(check.event.sequence) == response["X-Keyvault-Audit-Event"]
    assert check.event.actor == "user:auditor"


def test_export_needs_the_export_permission_and_a_post(client, seeded):
    client.force_login(make_role_user("operator"))
    url = reverse("reports:export", args=["rotations", "csv"])
    exports = AuditEvent.objects.filter(action=audit.Action.AUDIT_EXPORTED)
    before = exports.count()

    assert client.post(url).status_code == 403
    client.force_login(make_role_user("administrator"))
    assert client.get(url).status_code == 405
    assert client.post(reverse("reports:export", args=["rotations", "pdf"])).status_code == 404
    assert client.post(url, {"until": "not-a-date"}).status_code == 400
    assert exports.count() == before  # nothing exported, no export recorded


def test_anonymous_is_sent_to_login(client):
    response = client.get(reverse("reports:index"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))


# -- who did what at volume: keyset pages and a streamed CSV (issue 16) ---------------------------


def test_activity_pages_by_key_and_together_make_the_whole_report(seeded):
    whole = reports.build("activity", {})

    pages, after = [], None
    while True:
        page = reports.build_page("activity", {}, after=after, limit=7)
        pages.append(page)
        if page.next_after is None:
            break
        after = page.next_after

    assert len(pages) > 2 and all(page.paged and len(page.rows) <= 7 for page in pages)
    assert [row["sequence"] for page in pages for row in page.rows] == [row["sequence"] for row in whole.rows]
    assert pages[-1].next_after is None


def test_a_page_stops_at_the_chain_position_it_is_stamped_with(seeded):
    page = reports.build_page("activity", {}, limit=10_000)
    assert max(row["sequence"] for row in page.rows) == page.chain_sequence


def test_streamed_csv_holds_every_row_and_verifies(seeded):
    # given the expected rows
    expected = [str(row["sequence"]) for row in reports.build("activity", {"kek": "payments"}).rows]

    # when the CSV is streamed in small chunks
    stream = reports.stream_csv("activity", {"kek": "payments"}, actor=SYSTEM)
    original, reports.STREAM_CHUNK_ROWS = reports.STREAM_CHUNK_ROWS, 3
    try:
        chunks = list(stream)
    finally:
        reports.STREAM_CHUNK_ROWS = original
    content = b"".join(chunks)

    # then it came in several pieces, holds every row, and its seal names a recorded export event
    assert len(chunks) > 3
    body, seal = body_and_seal(content)
    lines = body.decode().splitlines()
    data = list(csv.reader(line for line in lines if not line.startswith("#")))
    assert [row[0] for row in data[1:]] == expected
    assert lines[-1] == f"# rows: {len(expected)}" and stream.rows == len(expected)
    check = reports.verify_export(content)
    assert check.body_sha256 == stream.body_sha256 == hashlib.sha256(body).hexdigest()
    assert check.event.sequence == stream.event_sequence
    assert check.event.details["rows"] == len(expected) and check.event.details["report"] == "activity"


def test_a_streamed_csv_cut_short_records_nothing_and_does_not_verify(seeded):
    exports = AuditEvent.objects.filter(action=audit.Action.AUDIT_EXPORTED)
    before = exports.count()
    stream = iter(reports.stream_csv("activity", {}, actor=SYSTEM))

    first = next(stream)
    stream.close()  # the client went away

    assert exports.count() == before
    with pytest.raises(reports.ExportNotVerified):
        reports.verify_export(first)


def test_console_streams_the_activity_csv_and_the_cli_writes_the_same_kind(client, seeded, tmp_path):
    client.force_login(make_role_user("auditor"))

    response = client.post(reverse("reports:export", args=["activity", "csv"]), {"user": "olivia"})

    assert response.status_code == 200 and response.streaming
    content = b"".join(response.streaming_content)
    check = reports.verify_export(content)
    assert check.event.actor == "user:auditor" and check.event.details["filters"]["user"] == "olivia"
    assert response["Content-Disposition"].startswith('attachment; filename="keyvault-activity-at-')

    target = tmp_path / "activity.csv"
    call_command("report", "activity", "--user", "olivia", "--output", str(target), stderr=StringIO())
    assert reports.verify_export(target.read_bytes()).event.details["rows"] == check.event.details["rows"]


def test_activity_page_links_the_next_page_and_marks_failures_red(client, seeded):
    from keyvault.audit import events as audit_events

    denied = audit_events.access_denied(actor=Actor(name="user:olivia"), method="GET", path="/keyvault/")
    client.force_login(make_role_user("auditor"))
    assert AuditEvent.objects.filter(actor="user:olivia").count() >= 2
    original, reports.PAGE_ROWS = reports.PAGE_ROWS, 1
    try:
        first = client.get(reverse("reports:report", args=["activity"]), {"user": "olivia"})
        page = first.content.decode()
        report = first.context["report"]
        assert report.paged and len(report.rows) == 1
        assert f'href="?user=olivia&amp;after={report.next_after}"' in page
        last_page = client.get(reverse("reports:report", args=["activity"]),
                               {"user": "olivia", "after": denied.sequence - 1})
    finally:
        reports.PAGE_ROWS = original
    text = last_page.content.decode()
    assert '<tr class="kv-row-problem">' in text and "denied" in text
    assert "end of the report" in text and "first page" in text


def test_a_period_of_activity_pages_in_time_order(seeded):
    period = {"since": "2000-01-01", "until": "2100-01-01"}
    whole = [row["sequence"] for row in reports.build("activity", period).rows]
    seen, after = [], None
    while True:
        page = reports.build_page("activity", period, after=after, limit=4)
        seen += [row["sequence"] for row in page.rows]
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == whole and len(whole) > 4

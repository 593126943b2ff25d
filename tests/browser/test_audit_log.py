"""The audit log and "who did what" in a real browser: search, outcome filter, date range, red failures (issue 16)."""

from __future__ import annotations

import re

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from keyvault.audit import Actor
from keyvault.audit import events as audit_events
from keyvault.keys import services

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WIDTHS = (1280, 1920)
RED = re.compile(r"rgb\((\d+), (\d+), (\d+)\)")


def is_red(page, selector: str) -> bool:
    """Is the computed text colour of every element matching ``selector`` clearly red?"""
    colours = page.eval_on_selector_all(selector, "els => els.map(e => getComputedStyle(e).color)")
    assert colours, f"nothing matches {selector}"
    for colour in colours:
        r, g, b = (int(part) for part in RED.match(colour).groups())
        if not (r > 150 and g < 100 and b < 100):
            return False
    return True


def fits(page) -> bool:
    """Nothing wider than the window: no horizontal scrolling of the page."""
    return page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


def at_widths(page, shots, label: str) -> None:
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        assert fits(page), f"{label} overflows horizontally at {width} px"
        shots(page, f"{label}-{width}")


@pytest.fixture
def history():
    """Given a key's ordinary history, one denial by mallory (request r-7) and one failed login."""
    kek = services.create_kek(name="ledger", actor=Actor.system("bootstrap"))
    services.rotate_kek_version(kek, actor=Actor(name="user:carol", request_id="r-1"))
    denied = audit_events.access_denied(actor=Actor(name="user:mallory", request_id="r-7"), method="POST",
                                        path="/keyvault/keyencryptionkey/1/rotate/")
    failed = audit_events.password_login_failed("root", actor=Actor(name="user:root"), known_user=False)
    return kek, denied, failed


def test_auditor_searches_the_log_filters_by_outcome_and_sees_failures_in_red(login_as, shots, history):
    kek, denied, failed = history
    auditor = login_as("auditor")
    auditor.goto("/keyvault/auditevent/")
    rows = auditor.locator("#result_list tbody tr")

    # the failure and the denial are red, with the whole row tinted; a success is not
    expect(auditor.locator(".kv-outcome-problem")).to_have_count(2)
    assert is_red(auditor, ".kv-outcome-problem")
    assert is_red(auditor, "#result_list tr:has(.kv-outcome-problem) td")
    assert not is_red(auditor, "#result_list tr:has(.kv-outcome-success) td")
    at_widths(auditor, shots, "audit-log")

    # when the auditor searches by actor, then only mallory's denial is left
    auditor.fill("#searchbar", "mallory")
    auditor.press("#searchbar", "Enter")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Denied")
    shots(auditor, "search-actor")

    # by request id and by target
    auditor.fill("#searchbar", "r-1")
    auditor.press("#searchbar", "Enter")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("user:carol")
    auditor.fill("#searchbar", "ledger")
    auditor.press("#searchbar", "Enter")
    expect(rows).to_have_count(2)  # created and rotated
    expect(auditor.locator(".kv-outcome-problem")).to_have_count(0)

    # when they clear the search and pick "Failure or denied", then exactly the two bad events show, both red
    auditor.goto("/keyvault/auditevent/")
    auditor.click("#changelist-filter >> text=Failure or denied")
    expect(rows).to_have_count(2)
    expect(auditor.locator("#result_list tbody tr .kv-outcome-problem")).to_have_count(2)
    assert re.search(r"outcome=problems", auditor.url)
    at_widths(auditor, shots, "outcome-problems")

    # and a date range keeps the outcome filter: today has them, tomorrow has none
    today = timezone.now().date()
    form = auditor.locator("#kv-range-filter")
    form.locator("input[name=from]").fill(str(today))
    form.locator("input[name=to]").fill(str(today))
    form.locator("input[type=submit]").click()
    expect(rows).to_have_count(2)
    assert "outcome=problems" in auditor.url and f"from={today}" in auditor.url
    form = auditor.locator("#kv-range-filter")
    form.locator("input[name=from]").fill(str(today.replace(year=today.year + 1)))
    form.locator("input[name=to]").fill("")
    form.locator("input[type=submit]").click()
    expect(auditor.locator("#result_list tbody tr")).to_have_count(0)
    shots(auditor, "range-empty")

    # a date that is not one is said, not ignored
    auditor.goto("/keyvault/auditevent/?from=2026-13-45")
    expect(auditor.locator(".messagelist")).to_contain_text("from: not a date")


def test_who_did_what_pages_and_marks_failures(login_as, shots, history):
    kek, denied, failed = history
    auditor = login_as("auditor")

    auditor.goto("/reports/activity/")
    expect(auditor.locator("#kv-report-rows tbody tr.kv-row-problem")).to_have_count(2)
    assert is_red(auditor, "#kv-report-rows tr.kv-row-problem td")
    expect(auditor.locator("#kv-report-pages")).to_contain_text("end of the report")
    at_widths(auditor, shots, "who-did-what")

    auditor.goto("/reports/activity/?user=mallory")
    expect(auditor.locator("#kv-report-rows tbody tr")).to_have_count(1)
    expect(auditor.locator("#kv-report-rows tbody tr.kv-row-problem")).to_have_count(1)
    at_widths(auditor, shots, "who-did-what-mallory")

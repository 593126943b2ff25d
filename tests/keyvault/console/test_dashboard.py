"""The console home: dashboard numbers on known data, and charts that are valid, accessible, escaped SVG."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.urls import reverse
from django.utils import timezone

from keyvault.console import charts, dashboard
from keyvault.keys import services as key_services
from keyvault.models import KeyEncryptionKey, KeyVersion
from rotation import services as rotation
from rotation.models import RotationPolicy, RotationRun
from tests.keyvault import make_role_user
from tests.rotation.conftest import seed_data_keys

pytestmark = pytest.mark.django_db
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()


@pytest.fixture
def fleet(system_actor):
    """Four KEKs: due in 3 days, due in 20 days, overdue, disabled; one with data keys half on an old version."""
    now = timezone.now()
    soon = key_services.create_kek(name="soon", actor=system_actor)
    later = key_services.create_kek(name="later", actor=system_actor)
    late = key_services.create_kek(name="late", actor=system_actor)
    off = key_services.create_kek(name="off", actor=system_actor)
    key_services.disable_kek(off, actor=system_actor, reason="test")
    for kek, due in ((soon, now + timedelta(days=3)), (later, now + timedelta(days=20)),
                     (late, now - timedelta(days=2))):
        rotation.update_policy(kek, actor=system_actor, period=timedelta(days=90))
        RotationPolicy.objects.filter(kek=kek).update(next_due_at=due)
    seed_data_keys(soon, 4)
    key_services.rotate_kek_version(soon, actor=system_actor, reason="test")  # 4 DEKs stay on v1
    seed_data_keys(soon, 4)  # 4 on v2
    return {"soon": soon, "later": later, "late": late, "off": off, "now": now}


def test_dashboard_counts_keys_due_rotations_and_coverage(fleet):
    # when
    data = dashboard.build(now=fleet["now"])

    # then
    states = {state: count for state, _, count in data.keys_by_state}
    assert states["enabled"] == 3 and states["disabled"] == 1 and data.keks_total == 4
    assert data.keys_by_provider == [("local", 4)]
    assert [item.kek for item in data.overdue] == ["late"]
    assert [item.kek for item in data.due_7] == ["soon"]
    assert [item.kek for item in data.due_30] == ["soon", "later"]
    coverage = {item.kek: item for item in data.coverage}
    assert (coverage["soon"].primary, coverage["soon"].total, coverage["soon"].on_primary) == (2, 8, 4)
    assert coverage["soon"].share == 50.0 and coverage["late"].share is None  # late wraps no data keys
    assert [item.kek for item in data.low_coverage] == ["soon"]
    assert [item.kek for item in data.keks_without_data_keys] == ["late", "later", "off"]
    assert data.chain_status is not None and data.chain_status.ok


def test_unpolicied_keks_count_with_the_policy_the_sweep_will_give_them(system_actor):
    # given a KEK with no policy yet, made 360 days ago (the default policy rotates yearly)
    kek = key_services.create_kek(name="plain", actor=system_actor)
    KeyEncryptionKey.objects.filter(pk=kek.pk).update(created_at=timezone.now() - timedelta(days=360))

    due = dashboard.due_rotations(now=timezone.now())

    # then it is due in 5 days (4 whole days left), and the dashboard wrote no policy
    assert [(item.kek, item.days_left, item.period) for item in due] == [("plain", 4, timedelta(days=365))]
    assert not RotationPolicy.objects.filter(kek=kek).exists()


def test_cryptoperiod_uses_the_policy_period_else_nist(fleet, system_actor):
    now = fleet["now"]
    # soon's primary (v2) is 100 days old under a 90-day policy; a no-policy KEK's primary is 700 days old
    KeyVersion.objects.filter(kek=fleet["soon"], number=2).update(created_at=now - timedelta(days=100))
    young = key_services.create_kek(name="young", actor=system_actor)
    KeyVersion.objects.filter(kek=young).update(created_at=now - timedelta(days=700))

    items = dashboard.past_cryptoperiod(now=now)

    assert [(i.kek, i.version, i.limit_days, i.source) for i in items] == [("soon", 2, 90, "policy")]


def test_failed_and_paused_runs_are_listed(fleet):
    failed = RotationRun.objects.create(kek=fleet["late"], state=RotationRun.State.FAILED, initiator="system:beat",
                                        last_error="boom")
    paused = RotationRun.objects.create(kek=fleet["later"], state=RotationRun.State.REWRAPPING,
                                        initiator="system:beat", paused_reason="provider unavailable")
    RotationRun.objects.create(kek=fleet["soon"], state=RotationRun.State.COMPLETED, initiator="system:beat")

    items = dashboard.problem_runs()

    assert {(i.run_id, i.problem) for i in items} == {(failed.pk, "failed: boom"),
                                                      (paused.pk, "paused: provider unavailable")}


def test_rotations_per_month_counts_new_versions(fleet):
    months = dashboard.rotations_per_month(now=fleet["now"])

    assert len(months) == 12
    assert months[-1] == (f"{fleet['now']:%b %y}", 1)  # soon was rotated once, this month
    assert sum(count for _, count in months) == 1


def test_expiring_certificates_come_from_managed_secrets_when_installed(fleet):
    model = dashboard.certificate_model()
    if model is None:
        assert dashboard.expiring_certificates(now=fleet["now"]) is None
        return
    now = fleet["now"]
    model.objects.create(name="web", secret_type="tls_certificate", source="file", path="/x",
                         expires_at=now + timedelta(days=10))
    model.objects.create(name="far", secret_type="tls_certificate", source="file", path="/y",
                         expires_at=now + timedelta(days=200))
    model.objects.create(name="db", secret_type="database_credential", source="file", path="/z",
                         expires_at=now + timedelta(days=5))

    items = dashboard.expiring_certificates(now=now)

    assert [(item.name, item.days_left) for item in items] == [("web", 10)]


def test_overdue_secret_rotation_and_expiring_certificate_show_on_the_console_home(client, fleet, system_actor):
    from keyvault.models import ManagedSecret

    now = fleet["now"]
    secret = rotation.register_secret(name="cookie-key", secret_type="generic", source="file", path="cookie-key",
                                      actor=system_actor, inspect=False)
    RotationPolicy.objects.filter(secret=secret).update(next_due_at=now - timedelta(days=4))
    ManagedSecret.objects.create(name="api-tls", secret_type="tls_certificate", source="file", path="/tls",
                                 expires_at=now + timedelta(days=6))

    due = {item.target: item for item in dashboard.due_rotations(now=now)}
    client.force_login(make_role_user("auditor"))
    page = client.get(reverse("admin:index")).content.decode()

    assert due["secret cookie-key"].overdue and due["secret cookie-key"].overdue_days == 4
    assert "cookie-key" in page and "api-tls" in page


# -- charts ---------------------------------------------------------------------------------------


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg" and root.get("role") == "img"
    labelled = root.get("aria-labelledby").split()
    ids = {el.get("id") for el in root.iter() if el.get("id")}
    assert set(labelled) <= ids
    assert root.find(f"{SVG}title").text and root.find(f"{SVG}desc").text
    return root


def texts(root: ET.Element) -> list[str]:
    return [el.text for el in root.iter(f"{SVG}text")]


def test_bar_chart_is_valid_svg_with_text_labels():
    root = parse(charts.bar_chart(chart_id="c", title="Rotations", description="d",
                                  bars=[("Jan 26", 3), ("Feb 26", 0)]))
    assert len(root.findall(f".//{SVG}rect")) == 2
    assert {"Jan 26", "Feb 26", "3", "0"} <= set(texts(root))


def test_chart_labels_are_escaped():
    evil = '<script>alert("x")</script>&'
    for svg in (
        charts.bar_chart(chart_id="a", title=evil, description=evil, bars=[(evil, 1)]),
        charts.hbar_chart(chart_id="b", title="t", description="d", bars=[(evil, 50.0)]),
        charts.timeline_chart(chart_id="c", title="t", description="d", items=[(evil, timezone.now())],
                              start=timezone.now() - timedelta(days=1)),
    ):
        root = parse(svg)
        assert "<script" not in svg
        assert not list(root.iter(f"{SVG}script")) and not list(root.iter("script"))
        assert evil in texts(root) or root.find(f"{SVG}title").text == evil


def test_hbar_and_timeline_place_marks_within_the_plot():
    now = timezone.now()
    root = parse(charts.hbar_chart(chart_id="h", title="t", description="d", bars=[("a", 100.0), ("b", 25.0)],
                                   warn_below=100.0))
    widths = [float(r.get("width")) for r in root.iter(f"{SVG}rect")]
    assert widths[0] == pytest.approx(4 * widths[1])
    assert [r.get("fill") for r in root.iter(f"{SVG}rect")] == [charts.BAR_OK, charts.BAR_WARN]

    root = parse(charts.timeline_chart(chart_id="t", title="t", description="d", start=now, days=90,
                                       items=[("expired", now - timedelta(days=3)), ("soon", now + timedelta(days=45))]))
    xs = [float(c.get("cx")) for c in root.iter(f"{SVG}circle")]
    assert xs[0] == 170 and 170 < xs[1] < 640
    assert any("(expired)" in (t or "") for t in texts(root))


def test_hbar_bar_without_a_value_says_why_instead_of_drawing_one():
    root = parse(charts.hbar_chart(chart_id="n", title="t", description="d", bars=[("a", 50.0), ("b", None)],
                                   missing="no data keys"))

    assert [float(r.get("width")) > 0 for r in root.iter(f"{SVG}rect")] == [True, False]
    assert texts(root) == ["a", "50%", "b", "no data keys"]


def test_pending_deletions_count_days_left_and_data_keys(fleet, system_actor):
    key_services.schedule_kek_deletion(fleet["soon"], actor=system_actor, waiting_days=7, now=fleet["now"])

    items = dashboard.pending_deletions(now=fleet["now"] + timedelta(days=2, hours=1))

    assert [(item.kek, item.days_left, item.data_keys) for item in items] == [("soon", 5, 8)]  # 4 days 23 h
    assert dashboard.pending_deletions(now=fleet["now"])[0].days_left == 7
    assert dashboard.pending_deletions(now=fleet["now"] + timedelta(days=6, hours=23))[0].days_left == 1
    assert dashboard.pending_deletions(now=fleet["now"] + timedelta(days=8))[0].days_left == 0


def test_empty_charts_say_so():
    root = parse(charts.bar_chart(chart_id="e", title="t", description="d", bars=[], empty="Nothing yet"))
    assert texts(root) == ["Nothing yet"]


# -- the page --------------------------------------------------------------------------------------


def test_console_home_shows_the_dashboard_and_the_app_list(client, fleet):
    client.force_login(make_role_user("auditor"))

    response = client.get(reverse("admin:index"))

    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="kv-dashboard"' in page and 'id="content-main"' in page  # dashboard above the admin app list
    assert "Key-encryption keys" in page or "key-encryption keys" in page
    svgs = re.findall(r'<svg [^>]*class="kv-chart".*?</svg>', page, flags=re.S)
    assert len(svgs) == (3 if dashboard.certificate_model() else 2)
    for svg in svgs:
        parse(svg)
    assert "<script" not in "".join(svgs)
    overdue = re.search(r'id="kv-tile-overdue"><span class="kv-tile-number">(\d+)</span>', page)
    assert overdue and overdue.group(1) == "1"


def test_console_home_without_read_permission_has_no_dashboard(client, django_user_model):
    user = django_user_model.objects.create_user("staff", is_staff=True)
    client.force_login(user)

    response = client.get(reverse("admin:index"))

    assert response.status_code == 200
    assert 'id="kv-dashboard"' not in response.content.decode()

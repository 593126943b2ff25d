"""Every console page at 1280 and 1920 px: screenshotted into artifacts/browser/, nothing overflows sideways.

Also: the KEK page's grouped actions (one primary button, the rest in a <details> menu), and the
dashboard charts in the light and the dark theme, whose labels must keep their contrast.
"""

from __future__ import annotations

import re

import pytest
from django.contrib import admin
from django.contrib.auth.models import User
from django.test import RequestFactory
from django.urls import NoReverseMatch, reverse
from playwright.sync_api import expect

from keyvault.audit import Actor
from keyvault.console import reports
from keyvault.console.admin_views import kek_actions
from keyvault.models import KeyEncryptionKey, ManagedSecret
from rotation import services as rotation
from tests.browser.conftest import ARTIFACTS, PASSWORD, log_in
from tests.keyvault import build_world

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WIDTHS = (1280, 1920)
GALLERY = ARTIFACTS / "gallery"

#: Elements whose right edge passes the viewport, outside any container that scrolls or clips sideways
#: (the designated scroll containers: .kv-scroll, .results, panels), and the document's own overflow.
OVERFLOW_JS = """
() => {
  const doc = document.documentElement;
  const width = doc.clientWidth;
  const clipped = el => {
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      const o = getComputedStyle(a).overflowX;
      if (o === 'auto' || o === 'scroll' || o === 'hidden' || o === 'clip') return true;
    }
    return false;
  };
  const name = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
                     (el.className && typeof el.className === 'string' ? '.' + el.className.trim().split(/\\s+/).join('.') : '');
  const wide = [];
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    if (r.right > width + 1 && !clipped(el)) wide.push(name(el) + ' right=' + Math.round(r.right));
  }
  return {scrollWidth: doc.scrollWidth, clientWidth: width, wide: wide.slice(0, 8)};
}
"""


def _superuser():
    return User.objects.create_superuser("root", "root@example.invalid", PASSWORD)


def _login(browser, live_server, username: str, **context_options):
    return log_in(browser, live_server, username, width=WIDTHS[0], timeout_ms=15_000, **context_options)


def _first_pk(model):
    row = model._default_manager.order_by("pk").first()
    return row.pk if row is not None else None


def console_pages(user) -> list[tuple[str, str]]:
    """(label, URL) of every console page: home, each app, each model's list/add/change, each action page, reports."""
    request = RequestFactory().get("/")
    request.user = user
    pages = [("home", reverse("admin:index"))]
    for app in sorted({model._meta.app_label for model in admin.site._registry}):
        pages.append((f"app-{app}", reverse("admin:app_list", args=[app])))
    for model, model_admin in sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label):
        info = f"{model._meta.app_label}_{model._meta.model_name}"
        pages.append((f"{info}-list", reverse(f"admin:{info}_changelist")))
        if model_admin.has_add_permission(request):
            pages.append((f"{info}-add", reverse(f"admin:{info}_add")))
        pk = _first_pk(model)
        if pk is not None:
            pages.append((f"{info}-change", reverse(f"admin:{info}_change", args=[pk])))
    for kek in KeyEncryptionKey.objects.order_by("name"):
        for action in kek_actions():
            if kek.state in action.states:
                pages.append((f"kek-{kek.name}-{action.slug}", reverse(f"admin:{action.url_name}", args=[kek.pk])))
    secret = _first_pk(ManagedSecret)
    if secret is not None:
        pages.append(("secret-rotate", reverse("admin:keyvault_managedsecret_rotate", args=[secret])))
    pages += [("providers", reverse("keyvault_providers")), ("reports", reverse("reports:index")),
              ("search", reverse("console-search") + "?q=alpha"), ("preferences", reverse("console-preferences"))]
    pages += [(f"report-{name}", reverse("reports:report", args=[name])) for name in sorted(reports.REPORTS)]
    try:
        pages.append(("siem-consumer-add", reverse("admin:keyvault_siemconsumer_add")))
    except NoReverseMatch:  # pragma: no cover - registered in keyvault.console.admin
        pass
    return list(dict.fromkeys(pages))


def _history(world):
    """Enough history for every page to have rows: keys, data keys, a finished run and a managed secret."""
    actor = Actor.system("tests")
    rotation.drive(rotation.start_run(kek=world.alpha, actor=actor, reason="quarterly CHG-1", incident_ref="").pk)
    rotation.register_secret(name="reporting-db-password", secret_type="generic", source="file",
                             path="reporting-db-password", actor=actor, inspect=False)


def test_every_console_page_fits_at_1280_and_1920_px(browser, live_server):
    # given a console with history and a superuser, who may open every page
    world = build_world()
    _history(world)
    user = _superuser()
    pages = console_pages(user)
    assert len(pages) >= 40, pages
    context, page = _login(browser, live_server, "root")
    GALLERY.mkdir(parents=True, exist_ok=True)
    problems = []
    try:
        for width in WIDTHS:
            page.set_viewport_size({"width": width, "height": 900})
            for label, url in pages:
                # when the page is opened at this width
                response = page.goto(url)
                assert response is not None and response.status == 200, f"{url}: {response and response.status}"
                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
                page.screenshot(path=str(GALLERY / f"{width}-{name}.png"), full_page=True)
                # then nothing is wider than the window, except inside a scroll container
                found = page.evaluate(OVERFLOW_JS)
                if found["scrollWidth"] > found["clientWidth"] or found["wide"]:
                    problems.append(f"{width}px {url}: {found}")
    finally:
        context.close()
    _write_index(pages)
    assert problems == []
    assert len(list(GALLERY.glob("1280-*.png"))) >= len(pages)


def _write_index(pages) -> None:
    """artifacts/browser/gallery/index.html: every page, its URL and its two screenshots, for a reviewer."""
    from html import escape

    rows = []
    for label, url in pages:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        shots = " ".join(f'<a href="{width}-{name}.png">{width} px</a>' for width in WIDTHS)
        rows.append(f"<tr><td>{escape(label)}</td><td><code>{escape(url)}</code></td><td>{shots}</td></tr>")
    (GALLERY / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>Keyvault console gallery</title>"
        "<h1>Every console page at 1280 and 1920 px</h1><table>" + "".join(rows) + "</table>\n", encoding="utf-8")


def test_kek_page_has_one_primary_action_and_a_menu_for_the_rest(browser, live_server):
    # given a superuser on an enabled KEK (every action offered)
    world = build_world()
    _superuser()
    context, page = _login(browser, live_server, "root")
    try:
        page.goto(reverse("admin:keyvault_keyencryptionkey_change", args=[world.alpha.pk]))
        # then Rotate now stands alone, and the other actions wait in a closed menu
        expect(page.locator(".object-tools a.kv-primary-action")).to_have_text("Rotate now")
        menu = page.locator("#kv-kek-menu")
        expect(menu.locator(".kv-menu-list")).to_be_hidden()
        # the title is not covered by the buttons
        title, tools = page.locator("#content h1").bounding_box(), page.locator(".object-tools").bounding_box()
        assert tools["y"] >= title["y"] + title["height"] - 1
        # when the menu is opened, then the destructive actions are there, marked, after the safe ones
        menu.locator("summary").click()
        expect(menu.locator(".kv-menu-list")).to_be_visible()
        danger = menu.locator("a.kv-danger")
        expect(danger).to_have_text(["Emergency rotate", "Disable", "Schedule deletion"])
        page.screenshot(path=str(ARTIFACTS / "gallery" / "kek-menu-open.png"))
        danger.filter(has_text="Schedule deletion").click()
        expect(page.locator("h1")).to_contain_text("Schedule deletion")
    finally:
        context.close()


def _luminance(rgb: tuple[int, int, int]) -> float:
    def channel(value: int) -> float:
        value /= 255
        return value / 12.92 if value <= 0.03928 else ((value + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(v) for v in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a, b) -> float:
    light, dark = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def _rgb(css: str) -> tuple[int, int, int]:
    return tuple(int(float(part)) for part in re.findall(r"[\d.]+", css)[:3])


CHART_COLOURS_JS = """
() => Array.from(document.querySelectorAll('.kv-chart text')).map(text => {
  let bg = 'rgba(0, 0, 0, 0)';
  for (let el = text.closest('svg'); el; el = el.parentElement) {
    const c = getComputedStyle(el).backgroundColor;
    if (c && c !== 'transparent' && !c.startsWith('rgba(0, 0, 0, 0')) { bg = c; break; }
  }
  return {text: text.textContent, fill: getComputedStyle(text).fill, background: bg};
})
"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_chart_labels_keep_their_contrast_in_both_themes(browser, live_server, scheme):
    # given the home page's charts (KEKs with coverage, months of rotations) in this colour scheme
    build_world()
    _superuser()
    context, page = _login(browser, live_server, "root", color_scheme=scheme)
    try:
        page.goto("/")
        expect(page.locator("#kv-chart-coverage")).to_be_visible()
        labels = page.evaluate(CHART_COLOURS_JS)
        page.screenshot(path=str(ARTIFACTS / "gallery" / f"charts-{scheme}.png"), full_page=True)
    finally:
        context.close()
    # then every label is drawn in the theme's text colour, readable on the panel behind it (WCAG AA, 4.5:1)
    assert len(labels) >= 12 and any(label["text"] == "alpha" for label in labels)
    weak = [(label["text"], label["fill"], label["background"]) for label in labels
            if _contrast(_rgb(label["fill"]), _rgb(label["background"])) < 4.5]
    assert weak == []
    background = _rgb(labels[0]["background"])
    assert (_luminance(background) < 0.2) == (scheme == "dark")


def test_the_overflow_check_catches_a_page_that_overflows(browser, live_server):
    # given a page that fits, then a too-wide element outside any scroll container, then inside one
    _superuser()
    context, page = _login(browser, live_server, "root")
    try:
        page.goto("/")
        assert page.evaluate(OVERFLOW_JS)["wide"] == []
        page.evaluate("() => { const d = document.createElement('div'); d.id = 'too-wide';"
                      " d.style.width = '3000px'; d.style.height = '5px'; document.getElementById('content').append(d); }")
        found = page.evaluate(OVERFLOW_JS)
        # then the check names it, and the document scrolls sideways
        assert any(entry.startswith("div#too-wide") for entry in found["wide"])
        assert found["scrollWidth"] > found["clientWidth"]
        page.evaluate("() => { const s = document.createElement('div'); s.className = 'kv-scroll';"
                      " document.getElementById('content').append(s); s.append(document.getElementById('too-wide')); }")
        found = page.evaluate(OVERFLOW_JS)
        assert found["wide"] == [] and found["scrollWidth"] <= found["clientWidth"]
    finally:
        context.close()


BADGE_COLOURS_JS = """
() => Array.from(document.querySelectorAll('.kv-state')).map(badge => {
  let bg = 'rgba(0, 0, 0, 0)';
  for (let el = badge; el; el = el.parentElement) {
    const c = getComputedStyle(el).backgroundColor;
    if (c && c !== 'transparent' && !c.startsWith('rgba(0, 0, 0, 0')) { bg = c; break; }
  }
  return {text: badge.textContent.trim(), cls: badge.className, fg: getComputedStyle(badge).color, background: bg};
})
"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_run_state_badges_keep_their_contrast_in_both_themes(browser, live_server, scheme):
    # given a run in every state (the list only reads them), "retiring" among them
    from rotation.engine.states import S
    from rotation.models import RotationRun

    from keyvault.keys import services as key_services

    _superuser()
    runs = {}
    for state in S:  # a KEK each: a KEK has at most one active run
        kek = key_services.create_kek(name=f"badge-{state}", actor=Actor.system("tests"))
        runs[state] = RotationRun.objects.create(kek=kek, policy=rotation.ensure_policy(kek), state=state,
                                                 initiator="system:tests")
    retiring = runs[S.RETIRING]
    context, page = _login(browser, live_server, "root", color_scheme=scheme)
    badges = []
    try:  # the run list, and the retiring run on its own page and on its KEK's page
        for path in ("/rotation/rotationrun/", f"/rotation/rotationrun/{retiring.pk}/change/",
                     f"/keyvault/keyencryptionkey/{retiring.kek_id}/change/"):
            page.goto(path)
            badges += page.evaluate(BADGE_COLOURS_JS)
        page.screenshot(path=str(GALLERY / f"run-badges-{scheme}.png"), full_page=True)
    finally:
        context.close()
    # then every state's badge is readable on its own background (WCAG AA, 4.5:1)
    classes = " ".join(badge["cls"] for badge in badges)
    assert all(f"kv-run-state-{state}" in classes for state in S), classes
    assert sum("kv-run-state-retiring" in badge["cls"] for badge in badges) >= 3
    weak = [(badge["text"], badge["fg"], badge["background"]) for badge in badges
            if _contrast(_rgb(badge["fg"]), _rgb(badge["background"])) < 4.5]
    assert weak == []

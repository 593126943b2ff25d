"""End-to-end harness: Debian's headless Chromium, driven by Playwright, against ``live_server``.

Each test gets a fresh browser context per logged-in user; ``shot(page, label)``
keeps a screenshot under ``artifacts/browser/<test name>/`` (gitignored) so a
failure, or a reviewer, can see what the browser saw.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from django.core.cache import cache

from tests.keyvault import make_role_user, use_temp_keyring

# Sync Playwright runs an event loop in this thread; Django would then refuse the
# tests' own (synchronous) database access as "async unsafe". Nothing here is async.
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "browser"
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/system-deps.sh)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()  # ends the browser process Playwright started


@pytest.fixture(autouse=True)
def _console_world(settings, tmp_path):
    """A fresh keyring and chain-status cache per test; fast password hashing for the logins."""
    use_temp_keyring(settings, tmp_path)
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # tests only
    cache.clear()


@pytest.fixture
def shots(request):
    """``shot(page, label)`` saves artifacts/browser/<test>/<NN>-<label>.png."""
    directory = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    taken = []

    def shot(page, label: str) -> Path:
        path = directory / f"{len(taken) + 1:02d}-{label}.png"
        page.screenshot(path=str(path), full_page=True)
        taken.append(path)
        return path

    shot.directory = directory
    shot.taken = taken
    return shot


def log_in(browser, live_server, username: str, *, width: int = 1440, timeout_ms: int = 10_000, **context_options):
    """A new browser context (``context_options``: e.g. ``color_scheme``) and a page signed in as ``username``."""
    context = browser.new_context(base_url=live_server.url, viewport={"width": width, "height": 900},
                                  **context_options)
    context.set_default_timeout(timeout_ms)
    page = context.new_page()
    page.goto("/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    return context, page


@pytest.fixture
def login_as(browser, live_server):
    """``login_as(role)`` → a Playwright page logged in as a new user in that role's group."""
    contexts = []

    def login(role: str):
        make_role_user(role, password=PASSWORD)
        context, page = log_in(browser, live_server, role)
        contexts.append(context)
        assert page.locator("#user-tools").inner_text().upper().startswith(f"WELCOME, {role.upper()}")
        return page

    yield login
    for context in contexts:
        context.close()

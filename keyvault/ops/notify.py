"""Telling people: expiry reminders, rotations waiting for someone, failed rotations.

Pluggable like Django's password hashers: ``settings.NOTIFIERS`` lists dotted
paths, loaded once and cached (the cache is reset on ``setting_changed``). Every
notifier gets every :class:`Notice`; one failing notifier never stops the others
and never fails the caller (a reminder that cannot be delivered is logged). The
audit event for the same fact is written by the caller, in its transaction.

Built in: :class:`LogNotifier` (always), :class:`EmailNotifier` (Django's mail
backend, ``HMD_EMAIL_URL``; to ``HMD_NOTIFY_EMAIL_TO`` plus the owner when the owner
is an e-mail address) and :class:`WebhookNotifier` (a JSON POST to
``HMD_NOTIFY_WEBHOOK_URL``, when set). Notices never carry secret values.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from functools import cache

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

log = logging.getLogger(__name__)

#: Seconds a webhook POST may take; reminders must not hold up the beat task.
WEBHOOK_TIMEOUT = 5.0


@dataclass(frozen=True)
class Notice:
    """One thing to tell people about (subject and body are plain text)."""

    subject: str
    body: str
    severity: str = "warning"  # info, warning or error
    target: str = ""
    owner: str = ""
    data: dict = field(default_factory=dict)


class Notifier:
    """Delivers notices one way. ``send`` may raise; :func:`notify` catches it."""

    name = "notifier"

    def send(self, notice: Notice) -> None:
        raise NotImplementedError


class LogNotifier(Notifier):
    name = "log"
    _levels = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

    def send(self, notice: Notice) -> None:
        log.log(self._levels.get(notice.severity, logging.WARNING), "%s (%s)", notice.subject, notice.target)


class EmailNotifier(Notifier):
    name = "email"

    def recipients(self, notice: Notice) -> list[str]:
        found = list(getattr(settings, "NOTIFY_EMAIL_TO", []))
        if "@" in notice.owner and notice.owner not in found:
            found.append(notice.owner)
        return found

    def send(self, notice: Notice) -> None:
        from django.core.mail import send_mail

        recipients = self.recipients(notice)
        if recipients:
            send_mail(notice.subject, notice.body, None, recipients, fail_silently=False)


class WebhookNotifier(Notifier):
    name = "webhook"

    def send(self, notice: Notice) -> None:
        url = getattr(settings, "NOTIFY_WEBHOOK_URL", "")
        if not url:
            return
        if not url.startswith(("http://", "https://")):
            raise ValueError("HMD_NOTIFY_WEBHOOK_URL must be an http(s) URL")
        body = json.dumps({"source": "keyvault", **asdict(notice)}).encode()
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "keyvault"})
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as response:  # noqa: S310 - operator's URL
            if response.status >= 300:
                raise urllib.error.HTTPError(url, response.status, "webhook refused the notice", response.headers, None)


@cache
def get_notifiers() -> tuple[Notifier, ...]:
    """The configured notifiers, built once."""
    return tuple(import_string(path)() for path in getattr(settings, "NOTIFIERS", ["keyvault.ops.notify.LogNotifier"]))


def _reset(*, setting: str, **kwargs) -> None:
    if setting == "NOTIFIERS":
        get_notifiers.cache_clear()


setting_changed.connect(_reset, dispatch_uid="keyvault.ops.notify.reset")


def notify(notice: Notice) -> dict[str, str]:
    """Send ``notice`` through every notifier; returns ``{notifier: "sent" or the error}``. Never raises."""
    results = {}
    for notifier in get_notifiers():
        try:
            notifier.send(notice)
            results[notifier.name] = "sent"
        except Exception as exc:  # a broken mail server must not break the rotation or the beat task
            log.warning("notifier %s could not deliver %r: %s", notifier.name, notice.subject, exc)
            results[notifier.name] = f"{type(exc).__name__}: {exc}"
    return results

"""How the console shows a time: one format everywhere, with its zone, in UTC unless the user chose a zone.

* :func:`format_when` is the one format: ``2026-12-07 14:05:09 UTC`` (or ``… CET``): ISO
  date, 24-hour time, and the zone's abbreviation (or its offset, ``+03``, where it has none).
  Templates use the ``when`` filter (``{% load keyvault %}``); admin columns call
  :func:`format_when`; Django's own date display (read-only fields, list columns) uses the same
  format through ``keyvault/console/formats/en/formats.py`` (``FORMAT_MODULE_PATH``).
* :class:`TimeZoneMiddleware` activates the signed-in user's zone for the request, so every
  conversion (ours and Django's) follows the preference.
* :func:`set_time_zone` is the one writer of the preference (the Preferences page and
  ``manage.py preferences`` call it); a change is recorded in the audit log.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, date, datetime
from functools import lru_cache

from django.db import transaction
from django.utils import timezone

from keyvault.audit import Actor, events
from keyvault.exceptions import InvalidPreference
from keyvault.models import DEFAULT_TIME_ZONE, ConsolePreference

WHEN_FORMAT = "%Y-%m-%d %H:%M:%S"


@lru_cache(maxsize=1)
def available_time_zones() -> tuple[str, ...]:
    """Every IANA zone this system knows, UTC first, then alphabetically."""
    zones = sorted(zone for zone in zoneinfo.available_timezones() if "/" in zone and not zone.startswith("Etc/"))
    return (DEFAULT_TIME_ZONE, *zones)


def _zone(name: str) -> zoneinfo.ZoneInfo:
    if name == DEFAULT_TIME_ZONE:
        return UTC
    return zoneinfo.ZoneInfo(name)


def format_when(value: datetime | date | None, *, zone=None) -> str:
    """``value`` in ``zone`` (default: the zone active for this request, UTC outside one), zone named."""
    if value is None or value == "":
        return "—"
    if not isinstance(value, datetime):
        return value.isoformat()
    if timezone.is_naive(value):
        value = value.replace(tzinfo=UTC)  # the database stores UTC
    local = value.astimezone(zone or timezone.get_current_timezone())
    name = local.tzname() or local.strftime("%z")
    return f"{local.strftime(WHEN_FORMAT)} {'UTC' if name in ('UTC', 'Z') else name}"


def time_zone_of(user) -> str:
    """The zone ``user`` chose, or UTC."""
    if user is None or not getattr(user, "is_authenticated", False):
        return DEFAULT_TIME_ZONE
    row = ConsolePreference.objects.filter(user=user).values_list("time_zone", flat=True).first()
    return row or DEFAULT_TIME_ZONE


def set_time_zone(user, *, time_zone: str, actor: Actor) -> ConsolePreference:
    """Show ``user`` times in ``time_zone`` (an IANA name such as ``Europe/Berlin``, or ``UTC``).

    A change is audited (``user.preference_changed``) in the same transaction: the zone decides
    how every time on the console reads, so who changed it, and from what, is on record. Setting
    the zone the user already has records nothing.

    :raises InvalidPreference: when the zone is not one :func:`available_time_zones` lists.
    """
    if time_zone not in available_time_zones():
        raise InvalidPreference(f"Unknown time zone {time_zone[:64]!r}: use an IANA name such as Europe/Berlin, or UTC.")
    with transaction.atomic():
        preference, _ = ConsolePreference.objects.select_for_update().get_or_create(
            user=user, defaults={"time_zone": DEFAULT_TIME_ZONE})
        before = preference.time_zone
        if before != time_zone:
            preference.time_zone = time_zone
            preference.save(update_fields=["time_zone", "updated_at"])
            events.preference_changed(user.get_username(), actor=actor, setting="time_zone", before=before,
                                      after=time_zone)
    return preference


class TimeZoneMiddleware:
    """Activate the signed-in user's zone for the request (UTC for everyone else); reset it afterwards."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        name = time_zone_of(user) if user is not None and user.is_authenticated else DEFAULT_TIME_ZONE
        if name == DEFAULT_TIME_ZONE:
            timezone.activate(UTC)
        else:
            timezone.activate(_zone(name))
        try:
            return self.get_response(request)
        finally:
            timezone.deactivate()

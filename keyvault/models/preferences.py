"""Per-user console preferences (how the console shows things to one user; nothing about keys)."""

from __future__ import annotations

from django.conf import settings
from django.db import models

DEFAULT_TIME_ZONE = "UTC"


class ConsolePreference(models.Model):
    """One user's console settings; a user without a row sees the defaults (times in UTC)."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="console_preference",
                                verbose_name="user")
    time_zone = models.CharField(
        "time zone", max_length=64, default=DEFAULT_TIME_ZONE,
        help_text="IANA time zone the console shows times in, e.g. UTC or Europe/Berlin; every time names its zone.",
    )
    updated_at = models.DateTimeField("updated", auto_now=True)

    class Meta:
        """Changed by its user on the Preferences page (or ``manage.py preferences``), through the service."""

        verbose_name = "console preference"
        verbose_name_plural = "console preferences"
        default_permissions = ()

    def __str__(self) -> str:
        return f"preferences of {self.user_id}"

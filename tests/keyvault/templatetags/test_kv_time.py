"""The ``when`` filter is the console's one date format (``keyvault.console.timezones.format_when``)."""

from datetime import UTC, datetime

from django.template import Context, Template
from django.utils import timezone


def test_when_renders_in_the_active_zone_with_its_name():
    moment = datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
    template = Template("{% load kv_time %}{{ moment|when }}")
    with timezone.override(UTC):
        assert template.render(Context({"moment": moment})) == "2026-01-15 08:00:00 UTC"
    with timezone.override(timezone.get_fixed_timezone(180)):
        assert template.render(Context({"moment": moment})) == "2026-01-15 11:00:00 +0300"

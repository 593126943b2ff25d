"""``{{ value|when }}``: the console's one date format, in the user's zone, zone named (``keyvault.console.timezones``)."""

from django import template

from keyvault.console.timezones import format_when

register = template.Library()


@register.filter
def when(value) -> str:
    return format_when(value)

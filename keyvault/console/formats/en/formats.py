"""Django's own date display in the console (read-only fields, list columns) in the one console format.

Same as ``keyvault.console.timezones.format_when``: ISO date, 24-hour time, the zone's abbreviation.
"""

DATETIME_FORMAT = "Y-m-d H:i:s T"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s T"
DATE_FORMAT = "Y-m-d"
SHORT_DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i:s"

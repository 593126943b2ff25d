"""Refuse, with 400, requests that no URL of ours can take, before any view or query sees them.

* **NUL in the path or the query string.** PostgreSQL refuses NUL inside a text
  parameter, so every view that puts a path argument or a query parameter into a
  query (a changelist filter, a step key, a report's KEK name) would answer 500.
  No name, id or filter value we store holds NUL, so refusing it loses nothing.
* **Over-long date-hierarchy parts** (``<field>__year``, ``__month``, ``__day``):
  Django's admin parses them with ``int()`` and ``datetime()`` and catches only
  ``ValueError``, so ``?attempt_time__year=9223372036854775808`` overflows into a
  500. No year, month or day needs more than four characters.

Form bodies are left to the forms, which already refuse NUL in text fields; a
view that reads a body by hand validates it itself (``reports.parse_filters``).
"""

from __future__ import annotations

import logging

from django.http import HttpResponseBadRequest

logger = logging.getLogger(__name__)

DATE_PART_SUFFIXES = ("__year", "__month", "__day")
DATE_PART_MAX_LENGTH = 4


def malformation(request) -> str | None:
    """Why the request's path or query string cannot be for us, or None."""
    if "\x00" in request.path_info:
        return "NUL in the path"
    for name, values in request.GET.lists():
        if "\x00" in name or any("\x00" in value for value in values):
            return "NUL in the query string"
        if name.endswith(DATE_PART_SUFFIXES) and any(len(value) > DATE_PART_MAX_LENGTH for value in values):
            return f"{name[:60]}: not a year, month or day"
    return None


class RejectMalformedRequestMiddleware:
    """Answer 400 (plain text, nothing echoed back) to a request :func:`malformation` refuses."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        reason = malformation(request)
        if reason is not None:
            # repr: a path or parameter name with a line break cannot forge a log line
            logger.warning("refused a malformed request to %r: %r", request.path_info[:200], reason)
            return HttpResponseBadRequest(f"Bad request: {reason}.\n", content_type="text/plain; charset=utf-8")
        return self.get_response(request)

"""Who sent a request: the client address through the configured proxies, and a request id fit to store.

Both end up in audit events and login throttling, so both come from one place: the
audit log's IP is the same address django-axes locks on.
"""

from __future__ import annotations

import ipaddress
import re
import uuid

from django.conf import settings

#: A client-supplied ``X-Request-ID`` is kept only if it looks like an id (no markup, no control
#: characters, no log-line breaks) and fits the audit column; anything else gets a fresh id.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_REQUEST_ID_ATTRIBUTE = "_keyvault_request_id"


def client_ip(request) -> str | None:
    """The client's address: ``REMOTE_ADDR``, or with ``TRUSTED_PROXY_COUNT`` = N proxies in
    front, the address the outermost of them saw (N-th from the right in X-Forwarded-For).
    Entries left of that are client-supplied and never trusted; with N = 0 the header is ignored."""
    count = settings.TRUSTED_PROXY_COUNT
    if count > 0:
        hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
        if len(hops) >= count and _is_ip(hops[-count]):
            return hops[-count]
    return request.META.get("REMOTE_ADDR") or None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def request_id(request) -> str:
    """The request's ``X-Request-ID`` if it is a plausible id, else one generated for this request.

    Remembered on the request, so every event a request writes carries the same id.
    """
    known = getattr(request, _REQUEST_ID_ATTRIBUTE, None)
    if known is None:
        given = request.META.get("HTTP_X_REQUEST_ID", "")
        known = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        try:
            setattr(request, _REQUEST_ID_ATTRIBUTE, known)
        except AttributeError:  # a stand-in without attributes: the id is still valid, just not shared
            pass
    return known

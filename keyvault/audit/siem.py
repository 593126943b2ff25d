"""The SIEM pull endpoint: read-only audit events for Splunk/Elastic collectors.

``GET /siem/events?after=<sequence>&limit=<n>`` with ``Authorization: Bearer <token>``.
Events come in chain order with ``hash`` and ``prev_hash``, so a collector can
re-verify the chain itself (``keyvault.audit.canonical_bytes`` is the format);
``next_after`` is the cursor for the next call. Each page also carries the signed
checkpoints in its range (``checkpoints``, the same JSON as the external witness
file, :class:`keyvault.audit.witness.WitnessEntry`), so the SIEM keeps its own copy of
how far the chain had got and can check a later ``audit verify --witness`` against it. Paging is a keyset range on the
unique ``sequence`` index, so every page costs the same however long the log is.

Each consumer has its own token, managed in the console by key administrators.
Only the token's SHA-256 is stored and compared (in constant time); a deactivated
consumer's token gets 401 like an unknown one. Each call costs one UPDATE of the
consumer row (last used, last sequence). Polling faster than
``SIEM_RATE_LIMIT_PER_MINUTE`` gets 429 with ``Retry-After``; a caught-up page
(``has_more`` false) carries a ``Retry-After`` hint too, so collectors back off
instead of spinning. Pulls are not written to the audit log: a collector polling
every few seconds would otherwise fill the log with its own reads.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from django.conf import settings
from django.db.models.functions import Greatest
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from keyvault import audit
from keyvault.access import accounts, security
from keyvault.audit import Actor
from keyvault.exceptions import KeyvaultError
from keyvault.audit.witness import WitnessEntry
from keyvault.models import AuditCheckpoint, AuditEvent, SiemConsumer

TOKEN_PREFIX = "kvsiem_"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_SEQUENCE = 2**63 - 1  #: the largest audit sequence (a bigint); a larger cursor is a bad request
CAUGHT_UP_RETRY_SECONDS = 30


class InvalidSiemRequest(KeyvaultError, ValueError):
    """A SIEM request parameter is not valid (400)."""


class SiemAuthenticationFailed(KeyvaultError):
    """No, unknown or deactivated SIEM token (401); deliberately one error for all three."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# -- managing consumers (console and CLI call these) -----------------------------------


# Audited by keyvault.access.accounts (``siem.consumer_created`` / ``siem.consumer_changed``, before and
# after; the token only as an HMAC of its hash), like every other change of who may read what.


def create_consumer(*, name: str, actor: Actor, user=None) -> tuple[SiemConsumer, str]:
    """Create a consumer and its token. The token is returned once and never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with accounts.recording(actor):
        consumer = SiemConsumer.objects.create(name=name, token_hash=hash_token(token), created_by=user)
    return consumer, token


def set_active(consumer: SiemConsumer, *, active: bool, actor: Actor) -> SiemConsumer:
    """Activate or deactivate a consumer (a deactivated token answers 401)."""
    with accounts.recording(actor):
        locked = SiemConsumer.objects.select_for_update().get(pk=consumer.pk)
        if locked.active != active:
            locked.active = active
            locked.save(update_fields=["active"])
    consumer.refresh_from_db()
    return consumer


# -- pulling events ------------------------------------------------------------------------


def authenticate(header: str | None) -> SiemConsumer:
    """The active consumer whose token is in ``Authorization: Bearer <token>``.

    :raises SiemAuthenticationFailed: missing, malformed, unknown or deactivated token.
    """
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        raise SiemAuthenticationFailed("a bearer token is required")
    digest = hash_token(token)
    consumer = SiemConsumer.objects.filter(token_hash=digest).first()
    # The lookup is by hash of a 256-bit random token; compare again in constant time anyway.
    if consumer is None or not hmac.compare_digest(consumer.token_hash, digest) or not consumer.active:
        raise SiemAuthenticationFailed("invalid or inactive token")
    return consumer


def parse_cursor(query) -> tuple[int, int]:
    """``after`` (default 0) and ``limit`` (default 100, at most 1000) from the query string."""
    def number(name: str, default: int) -> int:
        raw = query.get(name)
        if raw is None or raw == "":
            return default
        # str.isdigit() also accepts '²' and other non-ASCII digits int() refuses; and a sequence is a
        # PostgreSQL bigint, so anything past 2**63 - 1 would overflow the query rather than match nothing.
        text = str(raw)
        if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_SEQUENCE:
            raise InvalidSiemRequest(f"{name} must be an integer from 0 to {MAX_SEQUENCE}")
        return int(text)

    after = number("after", 0)
    limit = number("limit", DEFAULT_LIMIT)
    if limit < 1:
        raise InvalidSiemRequest("limit must be at least 1")
    return after, min(limit, MAX_LIMIT)


event_document = audit.event_document  # the chain's own serialisation, one definition


@dataclass(frozen=True)
class Page:
    events: list[dict]
    next_after: int
    has_more: bool
    head_sequence: int
    head_hash: str
    checkpoints: list[dict]

    def as_dict(self) -> dict:
        return {"events": self.events, "next_after": self.next_after, "has_more": self.has_more,
                "chain_head": {"sequence": self.head_sequence, "hash": self.head_hash},
                "checkpoints": self.checkpoints}


def pull(consumer: SiemConsumer, *, after: int, limit: int) -> Page:
    """Events with ``sequence > after`` in chain order, at most ``limit``; records the consumer's progress."""
    head_sequence, head_hash = audit.chain_position()
    events = list(AuditEvent.objects.filter(sequence__gt=after, sequence__lte=head_sequence)
                  .order_by("sequence")[:limit])
    next_after = events[-1].sequence if events else after
    checkpoints = AuditCheckpoint.objects.filter(sequence__gt=after, sequence__lte=next_after).order_by("sequence")
    SiemConsumer.objects.filter(pk=consumer.pk).update(
        last_used_at=timezone.now(), last_sequence=Greatest("last_sequence", next_after)
    )
    return Page(events=[event_document(e) for e in events], next_after=next_after,
                has_more=next_after < head_sequence, head_sequence=head_sequence, head_hash=head_hash,
                checkpoints=[WitnessEntry.of(cp).as_dict() for cp in checkpoints])


def rate_limited(consumer: SiemConsumer) -> int:
    """Seconds to wait if ``consumer`` exceeded its calls for this minute, else 0 (and count this call)."""
    per_minute = getattr(settings, "SIEM_RATE_LIMIT_PER_MINUTE", 120)
    if not per_minute:
        return 0
    now = int(timezone.now().timestamp())
    window = now // 60
    calls = security.increment(f"keyvault:siem:rate:{consumer.pk}:{window}", timeout=120)
    return (60 - now % 60) if calls > per_minute else 0


def _error(status: int, code: str, message: str, **headers) -> JsonResponse:
    response = JsonResponse({"error": code, "message": message}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


@never_cache
@require_GET
def events_view(request):
    """``GET /siem/events``: one page of audit events for a bearer-token consumer."""
    try:
        consumer = authenticate(request.META.get("HTTP_AUTHORIZATION"))
    except SiemAuthenticationFailed as exc:
        return _error(401, "unauthorized", str(exc), WWW_Authenticate='Bearer realm="keyvault-siem"')
    try:
        after, limit = parse_cursor(request.GET)
    except InvalidSiemRequest as exc:
        return _error(400, "bad_request", str(exc))
    wait = rate_limited(consumer)
    if wait:
        return _error(429, "rate_limited", f"too many requests; retry in {wait} s", Retry_After=str(wait))
    page = pull(consumer, after=after, limit=limit)
    response = JsonResponse(page.as_dict())
    if not page.has_more:
        response["Retry-After"] = str(CAUGHT_UP_RETRY_SECONDS)
    return response

"""Application clients: who may call ``/api/v1/``, with which token, on which KEKs, for what.

The console and ``manage.py api client`` create, re-token and revoke clients here, audited.
The API views authenticate and scope every call here, then call the key services
(``keyvault.keys.services``, ``keyvault.keys.envelopes``), which stay the one writer of key
state and audit each call with the client as actor (``api:<name>``).

Tokens are 256 random bits, shown once. Only their SHA-256 is stored: the database alone grants
no access (a digest is not a token, and 256 random bits cannot be guessed from it). No server
key is involved on purpose: ``SECRET_KEY`` is itself a rotated secret (the cookie-signing
keyring), and its rotation must not log every application out.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone

from keyvault.access import security
from keyvault.audit import Actor, events
from keyvault.exceptions import (
    ApiAuthenticationFailed,
    ApiBadRequest,
    ApiForbidden,
    ApiNotFound,
    ApiRateLimited,
    PayloadTooLarge,
)
from keyvault.keys import envelopes
from keyvault.keys import services as key_services
from keyvault.kms import InvalidCiphertext
from keyvault.kms.context import normalise_context
from keyvault.kms.envelope import read_header
from keyvault.models import ApiClient, ApiToken, DataKey, KeyEncryptionKey, KeyVersion
from keyvault.models.api import MAX_RATE_LIMIT
from keyvault.models.prepared import prepared_cursor

TOKEN_PREFIX = "kvapi_"
TOKEN_BYTES = 32  # 256 bits
#: How long the previous token keeps working after a rotation, by default.
DEFAULT_OVERLAP = timedelta(hours=24)
#: The longest overlap: a token meant to be replaced should not outlive a year beside its successor.
MAX_OVERLAP = timedelta(days=366)
OPERATIONS = tuple(ApiClient.Operation.values)
MAX_TOKEN_LENGTH = 200


def token_digest(token: str) -> str:
    """The stored form of a token: its SHA-256 (a token has 256 random bits, so no key or salt is needed)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def _issue(client: ApiClient) -> tuple[ApiToken, str]:
    token = _new_token()
    row = ApiToken.objects.create(client=client, digest=token_digest(token), prefix=token[: len(TOKEN_PREFIX) + 4])
    return row, token


# -- validation of a client's settings ------------------------------------------------------------


def parse_operations(values: Iterable[str]) -> list[str]:
    """:raises ValueError: an operation Keyvault does not know."""
    ops = sorted({value.strip() for value in values if value.strip()})
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown:
        raise ValueError(f"unknown operation(s) {', '.join(unknown)}; choose from {', '.join(OPERATIONS)}")
    return ops


def parse_context_requirements(items: Iterable[str]) -> dict[str, list[str]]:
    """``service=billing``, ``tenant=acme-*`` or a bare ``tenant`` (required, any value) -> constraints.

    :raises ValueError: an empty key.
    """
    constraints: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not key:
            raise ValueError(f"context requirement {item!r} has no key (use KEY or KEY=VALUE)")
        allowed = constraints.setdefault(key, [])
        if sep:
            allowed.append(value)
    return constraints


def parse_networks(values: Iterable[str]) -> list[str]:
    """:raises ValueError: not a CIDR."""
    return [str(ipaddress.ip_network(value.strip(), strict=False)) for value in values if value.strip()]


def _keks(names: Sequence[str]) -> list[KeyEncryptionKey]:
    found = {kek.name: kek for kek in KeyEncryptionKey.objects.filter(name__in=names)}
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"no KEK named {', '.join(missing)}")
    return [found[name] for name in names]


# -- management (console and CLI) ---------------------------------------------------------------


def create_client(
    *, name: str, actor: Actor, keks: Sequence[str], operations: Sequence[str], owner: str = "",
    context_constraints: Mapping[str, Sequence[str]] | None = None, allowed_networks: Sequence[str] = (),
    expires_at: datetime | None = None, rate_limit_per_second: int | None = None,
) -> tuple[ApiClient, str]:
    """Create a client and its first token; the token is returned once and never stored.

    :raises ValueError: the name is taken, a KEK does not exist, an operation or CIDR is invalid.
    """
    ops = parse_operations(operations)
    if not ops:
        raise ValueError("a client needs at least one operation")
    networks = parse_networks(allowed_networks)
    constraints = {str(k): [str(v) for v in vals] for k, vals in (context_constraints or {}).items()}
    if rate_limit_per_second is not None and not 0 <= rate_limit_per_second <= MAX_RATE_LIMIT:
        raise ValueError(f"the rate limit must be 0 (no limit) to {MAX_RATE_LIMIT:,} requests per second")
    with transaction.atomic():
        if ApiClient.objects.filter(name=name).exists():
            raise ValueError(f"an API client named {name!r} already exists")
        kek_rows = _keks(list(keks))
        client = ApiClient.objects.create(
            name=name, owner=owner, operations=ops, context_constraints=constraints, allowed_networks=networks,
            expires_at=expires_at, created_by=actor.name,
            **({"rate_limit_per_second": rate_limit_per_second} if rate_limit_per_second is not None else {}),
        )
        client.keks.set(kek_rows)
        row, token = _issue(client)
        events.api_client_created(client, actor=actor, owner=owner, keks=[k.name for k in kek_rows], operations=ops,
                                  context_keys=sorted(constraints), networks=networks,
                                  expires_at=expires_at.isoformat() if expires_at else None, token_prefix=row.prefix)
    return client, token


def _client_named(name: str) -> ApiClient:
    client = ApiClient.objects.select_for_update().filter(name=name).first()
    if client is None:
        raise ValueError(f"no API client named {name!r}")
    return client


def rotate_token(name: str, *, actor: Actor, overlap: timedelta = DEFAULT_OVERLAP,
                 now: datetime | None = None) -> str:
    """Issue a new token; the newest previous one keeps working for ``overlap``, any older one stops now.

    :raises ValueError: no such client, it is revoked, or the overlap is negative or over a year.
    """
    if not timedelta(0) <= overlap <= MAX_OVERLAP:
        raise ValueError(f"the overlap must be between 0 and {MAX_OVERLAP.days} days")
    now = now or timezone.now()
    forget_tokens()
    with transaction.atomic():
        transaction.on_commit(forget_tokens)
        client = _client_named(name)
        if not client.enabled:
            raise ValueError(f"API client {name!r} is revoked; create a new one")
        live = list(client.tokens.select_for_update().filter(revoked_at__isnull=True).order_by("-created_at", "-pk"))
        previous = live[0] if live else None
        for older in live[1:]:
            older.revoked_at = now
            older.save(update_fields=["revoked_at"])
        if previous is not None:
            ends = now + overlap
            previous.expires_at = min(previous.expires_at, ends) if previous.expires_at else ends
            previous.save(update_fields=["expires_at"])
        row, token = _issue(client)
        events.api_token_rotated(client, actor=actor, token_prefix=row.prefix,
                                 previous_prefix=previous.prefix if previous else None,
                                 previous_expires_at=previous.expires_at.isoformat() if previous else None)
    return token


def token_row(token: str) -> ApiToken | None:
    """The stored row of ``token`` (found by its digest) with its client, or None for a value Keyvault never issued."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    return _stored_token(token_digest(token))


def _stored_token(digest: str) -> ApiToken | None:
    """The token row with ``digest``, with its client, read from the database (never the per-process cache)."""
    return ApiToken.objects.select_related("client").filter(digest=digest).first()


def revoke_tokens(name: str, *, actor: Actor, reason: str, token_ids: Sequence[int] | None = None,
                  keep: int | None = None, now: datetime | None = None) -> list[str]:
    """Revoke tokens of a client, not the client: those in ``token_ids``, or every one but ``keep``.

    Idempotent: a token revoked already is left as it is. Returns the prefixes revoked now.

    :raises ValueError: no such client, or neither ``token_ids`` nor ``keep`` given.
    """
    if (token_ids is None) == (keep is None):
        raise ValueError("name the tokens to revoke or the one to keep, not both")
    now = now or timezone.now()
    forget_tokens()
    with transaction.atomic():
        transaction.on_commit(forget_tokens)
        client = _client_named(name)
        live = client.tokens.select_for_update().filter(revoked_at__isnull=True)
        live = live.filter(pk__in=list(token_ids)) if token_ids is not None else live.exclude(pk=keep)
        rows = list(live.order_by("pk"))
        if not rows:
            return []
        ApiToken.objects.filter(pk__in=[row.pk for row in rows]).update(revoked_at=now)
        prefixes = [row.prefix for row in rows]
        events.api_tokens_revoked(client, actor=actor, token_prefixes=prefixes, reason=reason)
    return prefixes


def reinstate_token(name: str, *, token_id: int, expires_at: datetime | None, actor: Actor, reason: str) -> bool:
    """Give a live token back the expiry it had before a rotation that is being undone.

    A revoked token stays revoked (returns False): revocation is final.

    :raises ValueError: no such client.
    """
    forget_tokens()
    with transaction.atomic():
        transaction.on_commit(forget_tokens)
        client = _client_named(name)
        row = client.tokens.select_for_update().filter(pk=token_id, revoked_at__isnull=True).first()
        if row is None:
            return False
        row.expires_at = expires_at
        row.save(update_fields=["expires_at"])
        events.api_token_reinstated(client, actor=actor, token_prefix=row.prefix, reason=reason,
                                    expires_at=expires_at.isoformat() if expires_at else None)
    return True


def revoke_client(name: str, *, actor: Actor, reason: str = "", now: datetime | None = None) -> ApiClient:
    """Revoke a client: every token of it answers 401 at once. Idempotent.

    :raises ValueError: no such client.
    """
    now = now or timezone.now()
    forget_tokens()
    with transaction.atomic():
        transaction.on_commit(forget_tokens)
        client = _client_named(name)
        if not client.enabled:
            return client
        count = client.tokens.filter(revoked_at__isnull=True).update(revoked_at=now)
        client.enabled = False
        client.revoked_at = now
        client.save(update_fields=["enabled", "revoked_at"])
        events.api_client_revoked(client, actor=actor, reason=reason, tokens_revoked=count)
    return client


def list_clients() -> list[ApiClient]:
    """Every client, with its KEKs loaded."""
    return list(ApiClient.objects.prefetch_related("keks", "tokens"))


def active_token_count(client: ApiClient, *, now: datetime | None = None) -> int:
    now = now or timezone.now()
    return sum(1 for t in client.tokens.all() if t.revoked_at is None and (t.expires_at is None or t.expires_at > now))


# -- per call (the API views) -------------------------------------------------------------------


#: Successful token look-ups a process keeps, at most (the cache is emptied when full).
TOKEN_CACHE_ENTRIES = 1024
_token_cache: dict[str, tuple[float, ApiToken]] = {}
_clock = time.monotonic


def forget_tokens() -> None:
    """Empty this process's token cache (revocations and rotations here take effect at once)."""
    _token_cache.clear()


def _token_row(digest: str) -> ApiToken | None:
    """The token row (with its client) for ``digest``, from this process's short-lived cache or the database.

    The web process asks the database at most once per ``API_TOKEN_CACHE_SECONDS`` per token:
    a revocation, a disabled client or changed operations made in *another* process take
    effect within that bound (in this one at once: :func:`forget_tokens`). Expiry times are
    checked against the clock on every call, cached or not. Only found tokens are cached,
    so unknown tokens cannot fill it.
    """
    ttl = settings.API_TOKEN_CACHE_SECONDS
    if ttl > 0:
        cached = _token_cache.get(digest)
        if cached is not None and _clock() - cached[0] < ttl:
            return cached[1]
    row = _stored_token(digest)
    if row is not None and ttl > 0:
        if len(_token_cache) >= TOKEN_CACHE_ENTRIES:
            _token_cache.clear()
        _token_cache[digest] = (_clock(), row)
    return row


def authenticate(header: str | None, *, now: datetime | None = None) -> ApiClient:
    """The client whose usable token is in ``Authorization: Bearer <token>``.

    :raises ApiAuthenticationFailed: missing, malformed, unknown, expired or revoked token, or the
        client is revoked or expired (one error for all of them).
    """
    now = now or timezone.now()
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH:
        raise ApiAuthenticationFailed("a bearer token is required")
    digest = token_digest(token)
    row = _token_row(digest)
    if (
        row is None
        or not hmac.compare_digest(row.digest, digest)
        or row.revoked_at is not None
        or (row.expires_at is not None and row.expires_at <= now)
        or not row.client.enabled
        or (row.client.expires_at is not None and row.client.expires_at <= now)
    ):
        raise ApiAuthenticationFailed("invalid, expired or revoked token")
    return row.client


def check_address(client: ApiClient, address: str | None) -> None:
    """:raises ApiForbidden: the client has an allowlist and ``address`` is not in it."""
    if not client.allowed_networks:
        return
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        raise ApiForbidden("source address not allowed", code="address") from None
    if not any(ip in ipaddress.ip_network(net) for net in client.allowed_networks):
        raise ApiForbidden("source address not allowed", code="address")


def throttle(client: ApiClient, *, now: float | None = None) -> None:
    """Count one call in the client's one-second window, shared by every process through the cache.

    :raises ApiRateLimited: the window is full (``retry_after`` = 1 s).
    """
    limit = client.rate_limit_per_second
    if not limit:
        return
    window = int(now if now is not None else time.time())
    key = f"api-rate:{client.pk}:{window}"
    if security.increment(key, timeout=5) > limit:
        raise ApiRateLimited("rate limit exceeded", retry_after=1)


def check_operation(client: ApiClient, operation: str) -> None:
    """:raises ApiForbidden: the client may not do ``operation``."""
    if operation not in client.operations:
        raise ApiForbidden(f"this client may not {operation}", code="operation")


def check_context(client: ApiClient, context: Mapping[str, str] | None) -> dict[str, str]:
    """The context, validated and normalised, if it meets the client's constraints.

    :raises ApiForbidden: a required key is missing, or its value matches none of the allowed ones.
    :raises ApiBadRequest: not a string-to-string mapping of valid Unicode, or too large.
    """
    try:
        context = normalise_context(context)
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (a lone surrogate) is a ValueError
        raise ApiBadRequest(f"invalid encryption context: {type(exc).__name__}", code="invalid-context") from None
    for key, allowed in client.context_constraints.items():
        if key not in context:
            raise ApiForbidden(f"encryption context must contain {key!r}", code="context")
        if allowed and not any(fnmatch.fnmatchcase(context[key], pattern) for pattern in allowed):
            raise ApiForbidden(f"encryption context value of {key!r} is not allowed", code="context")
    return context


def _satisfies(client: ApiClient, context: Mapping[str, str]) -> bool:
    try:
        check_context(client, context)
    except ApiForbidden:
        return False
    return True


def kek_for(client: ApiClient, name: str) -> KeyEncryptionKey:
    """The KEK ``name`` if this client may use it.

    :raises ApiNotFound: no such KEK, or not this client's (the same answer).
    """
    kek = client.keks.filter(name=name).first()
    if kek is None:
        raise ApiNotFound("no such KEK")
    return kek


def _client_data_keys(client: ApiClient, ids: Iterable[int]) -> dict[int, DataKey]:
    """Those of ``ids`` that are data keys under the client's KEKs (with their KEK), in one query.

    Each row also carries ``version_state``, the state of the KEK version that wrapped it: an
    unwrap needs it, and a second round trip per call was an eighth of a single unwrap's time.
    """
    ids = sorted({data_key_id for data_key_id in ids if 0 < data_key_id < 2**63})
    if not ids:
        return {}
    return {row.pk: row for row in _read_client_data_keys(client.pk, ids)}


def _read_client_data_keys(client_id: int, ids: list[int]) -> Iterator[DataKey]:
    """The query of :func:`_client_data_keys`, written once as SQL and turned into models as the ORM does.

    On every API call: building and compiling the same query through the ORM took twice as long
    as PostgreSQL took to answer it (1.4 of 2.9 ms measured, against 0.65 ms for the query).
    Columns come from the models' metadata and values go through the fields' converters, so
    the rows are the instances ``DataKey.objects.select_related("kek")`` would give.
    """
    connection = connections[DataKey.objects.db]
    shape = _data_key_query_shape(connection)
    with prepared_cursor(connection) as cursor:
        if shape.ids_as_array:  # one statement text for every batch size: prepared once
            cursor.execute(shape.sql, [client_id, ids])
        else:
            cursor.execute(shape.sql.format(ids=", ".join(["%s"] * len(ids))), [client_id, *ids])
        fetched = cursor.fetchall()
    keks: dict[int, KeyEncryptionKey] = {}  # a batch's rows share their KEK's instance: built once, not per row
    for values in fetched:
        data_key = DataKey.from_db(connection.alias, shape.data_key_names, shape.convert(
            values[:shape.split], shape.data_key_columns, connection))
        kek = keks.get(data_key.kek_id)
        if kek is None:
            kek = keks[data_key.kek_id] = KeyEncryptionKey.from_db(connection.alias, shape.kek_names, shape.convert(
                values[shape.split:-1], shape.kek_columns, connection))
        _DATA_KEY_KEK.set_cached_value(data_key, kek)
        data_key.version_state = values[-1]
        yield data_key


_DATA_KEY_KEK = DataKey._meta.get_field("kek")


class _DataKeyQueryShape:
    """The SQL, columns and converters of :func:`_read_client_data_keys` for one database vendor."""

    def __init__(self, connection):
        quote = connection.ops.quote_name
        data_key_fields, kek_fields = DataKey._meta.concrete_fields, KeyEncryptionKey._meta.concrete_fields
        self.data_key_names = [field.attname for field in data_key_fields]
        self.kek_names = [field.attname for field in kek_fields]
        self.data_key_columns = [self._converters(field.get_col("d"), connection) for field in data_key_fields]
        self.kek_columns = [self._converters(field.get_col("k"), connection) for field in kek_fields]
        self.split = len(data_key_fields)
        allowed = ApiClient._meta.get_field("keks")
        columns = ", ".join([f"d.{quote(field.column)}" for field in data_key_fields]
                            + [f"k.{quote(field.column)}" for field in kek_fields])
        version = KeyVersion._meta
        self.sql = (
            f"SELECT {columns}, (SELECT v.{quote(version.get_field('state').column)} "
            f"FROM {quote(version.db_table)} v WHERE v.{quote(version.get_field('kek').column)} = d.{quote(_DATA_KEY_KEK.column)} "
            f"AND v.{quote(version.get_field('number').column)} = d.{quote(DataKey._meta.get_field('kek_version').column)} "
            f"LIMIT 1) "
            f"FROM {quote(DataKey._meta.db_table)} d "
            f"JOIN {quote(KeyEncryptionKey._meta.db_table)} k ON k.{quote(KeyEncryptionKey._meta.pk.column)} "
            f"= d.{quote(_DATA_KEY_KEK.column)} "
            f"JOIN {quote(allowed.remote_field.through._meta.db_table)} a "
            f"ON a.{quote(allowed.m2m_reverse_name())} = d.{quote(_DATA_KEY_KEK.column)} AND a.{quote(allowed.m2m_column_name())} = %s "
            f"WHERE d.{quote(DataKey._meta.pk.column)} "
        )
        self.ids_as_array = connection.vendor == "postgresql"
        self.sql += "= ANY(%s::bigint[])" if self.ids_as_array else "IN ({ids})"

    @staticmethod
    def _converters(column, connection) -> tuple:
        """``(column, converters)`` as the ORM's compiler applies them to a selected column."""
        return column, connection.ops.get_db_converters(column) + column.get_db_converters(connection)

    @staticmethod
    def convert(values, columns, connection) -> list:
        converted = []
        for value, (column, converters) in zip(values, columns, strict=True):
            for converter in converters:
                value = converter(value, column, connection)
            converted.append(value)
        return converted


_query_shapes: dict[str, _DataKeyQueryShape] = {}


def _data_key_query_shape(connection) -> _DataKeyQueryShape:
    shape = _query_shapes.get(connection.vendor)
    if shape is None:
        shape = _query_shapes[connection.vendor] = _DataKeyQueryShape(connection)
    return shape


def data_key_for(client: ApiClient, data_key_id: int, *, rows: Mapping[int, DataKey] | None = None,
                 allowed_context: Mapping[str, str] | None = None) -> DataKey:
    """The data key ``data_key_id`` if it is under one of the client's KEKs, in a context it may use.

    ``rows``: the client's data keys looked up already for a batch (:class:`DataKeyBatch`).
    ``allowed_context``: a context already checked against the client's constraints (the
    request's); a data key with exactly that context is not validated and matched again.

    :raises ApiNotFound: no such data key, or not this client's (the same answer).
    """
    row = (rows if rows is not None else _client_data_keys(client, [data_key_id])).get(data_key_id)
    if row is None or (row.encryption_context != allowed_context and not _satisfies(client, row.encryption_context)):
        raise ApiNotFound("no such data key")
    return row


def _version_states(rows: Iterable[DataKey]) -> dict[tuple[int, int], str]:
    """``(kek_id, number) -> state`` of the KEK versions of rows read by :func:`_client_data_keys`."""
    return {(row.kek_id, row.kek_version): row.version_state for row in rows}


class DataKeyBatch:
    """What a batch unwrap needs from the database, read once for every item: one query, not two per item.

    The client's data keys among the batch's ids (a foreign or missing id is simply absent, and
    answers as :func:`data_key_for` does) and the states of their KEK versions.
    """

    def __init__(self, client: ApiClient, ids: Iterable[int]):
        self.rows = _client_data_keys(client, ids)
        self.version_states = _version_states(self.rows.values())


def describe_data_key(client: ApiClient, data_key_id: int, *, actor: Actor) -> DataKey:
    """A data key of the client's, for its metadata (the read is audited)."""
    row = data_key_for(client, data_key_id)
    events.api_metadata_read(actor=actor, operation="describe", kek=row.kek.name, data_key=row.pk)
    return row


def usable_keks(client: ApiClient, *, actor: Actor) -> list[KeyEncryptionKey]:
    """The client's KEKs, with their versions loaded (the read is audited)."""
    keks = list(client.keks.prefetch_related("versions").order_by("name"))
    events.api_metadata_read(actor=actor, operation="list_keks")
    return keks


def actor_for(client: ApiClient, *, ip_address: str | None, request_id: str) -> Actor:
    """The audit actor of a call: ``api:<client name>``."""
    return Actor(name=f"api:{client.name}", ip_address=ip_address, request_id=request_id)


def unauthenticated_call(*, operation: str, ip_address: str | None, request_id: str) -> None:
    """Audit a call without a valid token: the first per address and minute in full, the rest counted.

    Anyone can send these as fast as they like, so each is in the chain either on its own or
    in its minute's summary (``count``), never one event each; the token sent is never recorded.
    """
    actor = Actor(name="anonymous", ip_address=ip_address, request_id=request_id)
    security.audit_unauthenticated_failure(
        security.API_UNAUTHENTICATED, ip_address,
        lambda: events.api_call_unauthenticated(actor=actor, operation=operation))


def rate_limited_call(client: ApiClient, *, actor: Actor, operation: str) -> None:
    """Audit a call over the client's rate limit: the first per client and minute in full, the rest counted."""
    security.audit_unauthenticated_failure(
        security.API_RATE_LIMITED, client.name,
        lambda: events.api_call_rate_limited(client.name, actor=actor, operation=operation,
                                             limit=client.rate_limit_per_second))


def refused(actor: Actor, *, operation: str, reason: str, kek: str | None = None,
            data_key: int | None = None) -> None:
    """Audit a refusal of an authenticated client."""
    events.api_call_refused(actor=actor, operation=operation, reason=reason, kek=kek, data_key=data_key)


# -- the operations (one item each; the views batch them) ----------------------------------------

#: The most plaintext ``encrypt`` takes in one item (as AWS KMS ``Encrypt``).
MAX_ENCRYPT_BYTES = 4096


def generate_data_key(client: ApiClient, kek_name: str, *, actor: Actor, context: Mapping[str, str] | None,
                      purpose: str = "", owner_ref: str = "") -> tuple[DataKey, bytearray]:
    """A new data key under the client's KEK, registered in the inventory (plaintext: wipe it after use)."""
    kek = kek_for(client, kek_name)
    context = check_context(client, context)
    row, plain = key_services.create_data_key(kek, actor=actor, encryption_context=context, purpose=purpose[:200],
                                              owner_ref=owner_ref[:200])
    return row, plain.plaintext


def generate_data_keys(client: ApiClient, kek_name: str, items: Sequence[key_services.DataKeyRequest], *,
                       actor: Actor) -> list[tuple[DataKey, bytearray] | Exception]:
    """:func:`generate_data_key` for many, aligned with ``items``: each a data key and its plaintext (wipe it)
    or the exception that item met (a context the client may not use; the KEK or provider refusing).

    The valid items are registered together (:func:`keyvault.keys.services.create_data_keys`:
    one transaction, one audit append for their events).
    """
    kek = kek_for(client, kek_name)
    outcomes: list = [None] * len(items)
    wanted: list[tuple[int, key_services.DataKeyRequest]] = []
    for index, item in enumerate(items):
        try:
            context = check_context(client, item.encryption_context)
        except (ApiBadRequest, ApiForbidden) as exc:
            outcomes[index] = exc
            continue
        wanted.append((index, key_services.DataKeyRequest(encryption_context=context, purpose=item.purpose[:200],
                                                          owner_ref=item.owner_ref[:200])))
    made = key_services.create_data_keys(kek, [request for _, request in wanted], actor=actor)
    for (index, _), outcome in zip(wanted, made, strict=True):
        outcomes[index] = outcome if isinstance(outcome, Exception) else (outcome[0], outcome[1].plaintext)
    return outcomes


def unwrap_data_key(client: ApiClient, data_key_id: int, *, actor: Actor, context: Mapping[str, str] | None,
                    batch: DataKeyBatch | None = None) -> tuple[DataKey, bytearray]:
    """The data key's plaintext from its *current* wrapping (rotation-transparent).

    ``batch``: the rows of a batch unwrap, read once for all its items; each item is checked
    and audited exactly as a single call (run the batch inside :func:`keyvault.audit.collected`
    for one audit append).

    :raises InvalidCiphertext: the context is not the one the data key was made with (opaque, audited).
    """
    context = check_context(client, context)
    row = data_key_for(client, data_key_id, rows=batch.rows if batch else None, allowed_context=context)
    if context != row.encryption_context:
        events.data_key_unwrap_failed(row, actor=actor, error="InvalidCiphertext")
        raise InvalidCiphertext()
    states = batch.version_states if batch else _version_states([row])
    return row, key_services.unwrap_data_key(row, actor=actor, states=states)


def _client_kek_of_blob(client: ApiClient, blob: bytes) -> KeyEncryptionKey:
    """The client's KEK a blob names; a blob of any other KEK is as opaque as garbage."""
    header = read_header(blob)
    kek = client.keks.filter(provider_key_id=header.kek_id).first()
    if kek is None:
        raise InvalidCiphertext()
    return kek


def encrypt(client: ApiClient, kek_name: str, plaintext: bytes, *, actor: Actor,
            context: Mapping[str, str] | None) -> bytes:
    """An envelope blob of ``plaintext`` under the client's KEK (audited).

    :raises PayloadTooLarge: more than :data:`MAX_ENCRYPT_BYTES`.
    """
    if len(plaintext) > MAX_ENCRYPT_BYTES:
        raise PayloadTooLarge(f"plaintext is larger than {MAX_ENCRYPT_BYTES} bytes; use a data key")
    kek = kek_for(client, kek_name)
    context = check_context(client, context)
    return envelopes.encrypt(kek, plaintext, actor=actor, encryption_context=context)


def decrypt(client: ApiClient, blob: bytes, *, actor: Actor, context: Mapping[str, str] | None) -> bytes:
    """Open an envelope blob of one of the client's KEKs (the KEK named by the blob's header)."""
    context = check_context(client, context)
    _client_kek_of_blob(client, blob)
    return envelopes.decrypt(blob, actor=actor, encryption_context=context)


def rewrap(client: ApiClient, blob: bytes, *, actor: Actor, context: Mapping[str, str] | None) -> bytes:
    """Move a blob of one of the client's KEKs to that KEK's primary version."""
    context = check_context(client, context)
    _client_kek_of_blob(client, blob)
    return envelopes.rewrap(blob, actor=actor, encryption_context=context)

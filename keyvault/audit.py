"""The audit log: the one place that writes audit events.

Every event is chained: ``hash = SHA-256(canonical JSON of the event, including
prev_hash)``. Writers lock the chain head row, so concurrent web processes and
workers append one after another and the chain never forks. An event is written
in the caller's transaction: if it cannot be written, the operation it records
fails too (fail-closed, as Vault refuses requests its audit devices cannot log).

Every ``AUDIT_CHECKPOINT_INTERVAL`` events (and on demand) the head is signed with
the Ed25519 audit signing key; each checkpoint also signs the previous checkpoint's
signature, so the checkpoints form a chain of their own, like CloudTrail digests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from keyvault import audit_walk
from keyvault.audit_walk import ROW_FIELDS as _ROW_FIELDS
from keyvault.models import AuditChainHead, AuditCheckpoint, AuditEvent

GENESIS_HASH = "0" * 64
VERIFY_CHUNK = 5000

Action = AuditEvent.Action
Outcome = AuditEvent.Outcome


@dataclass(frozen=True)
class Actor:
    """Who did something: a console/CLI user or a system component."""

    name: str
    user_id: int | None = None
    ip_address: str | None = None
    request_id: str = ""

    @classmethod
    def user(cls, user, *, ip_address: str | None = None, request_id: str = "") -> Actor:
        return cls(name=f"user:{user.get_username()}", user_id=user.pk, ip_address=ip_address, request_id=request_id)

    @classmethod
    def system(cls, component: str) -> Actor:
        return cls(name=f"system:{component}")

    @classmethod
    def from_request(cls, request) -> Actor:
        return cls.user(
            request.user,
            ip_address=request.META.get("REMOTE_ADDR") or None,
            request_id=request.META.get("HTTP_X_REQUEST_ID", "")[:64],
        )

    def __str__(self) -> str:
        return self.name


def hmac_value(value: str | bytes) -> str:
    """HMAC-SHA256 a sensitive value with the audit key, as Vault's audit devices do."""
    data = value.encode() if isinstance(value, str) else bytes(value)
    digest = hmac.new(settings.AUDIT_HMAC_KEY.encode(), data, hashlib.sha256).hexdigest()
    return f"hmac-sha256:{digest}"


def _check_details(value, path: str = "details") -> None:
    """Details are JSON scalars, lists and string-keyed dicts; never bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{path} holds bytes; audit details never carry key material")
    if isinstance(value, float):
        raise TypeError(f"{path} is a float; use str or int so the hash is stable across databases")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path} has a non-string key")
            _check_details(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_details(item, f"{path}[{index}]")
    elif value is not None and not isinstance(value, (str, int, bool)):
        raise TypeError(f"{path} has unsupported type {type(value).__name__}")


def canonical_bytes(
    *,
    sequence: int,
    timestamp: datetime,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    outcome: str,
    request_id: str,
    ip_address: str | None,
    details: Mapping,
    prev_hash: str,
) -> bytes:
    """The exact bytes an event's hash covers. Changing this breaks every chain: don't."""
    document = {
        "sequence": sequence,
        "timestamp": timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": actor,
        "action": action,
        "target_type": target_type,
        "target_id": target_id,
        "outcome": outcome,
        "request_id": request_id,
        "ip_address": ip_address,
        "details": details,
        "prev_hash": prev_hash,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def event_hash(event: AuditEvent) -> str:
    """Recompute the hash of a stored event from its fields."""
    return hashlib.sha256(
        canonical_bytes(
            sequence=event.sequence,
            timestamp=event.timestamp,
            actor=event.actor,
            action=event.action,
            target_type=event.target_type,
            target_id=event.target_id,
            outcome=event.outcome,
            request_id=event.request_id,
            ip_address=event.ip_address,
            details=event.details,
            prev_hash=event.prev_hash,
        )
    ).hexdigest()


def _target(target) -> tuple[str, str]:
    if target is None:
        return "", ""
    if isinstance(target, tuple):
        return str(target[0]), str(target[1])
    return target._meta.model_name, str(target.pk if not hasattr(target, "name") else target.name)


def record(
    action: str,
    *,
    actor: Actor,
    target=None,
    outcome: str = Outcome.SUCCESS,
    details: Mapping | None = None,
) -> AuditEvent:
    """Append one event to the chain, in the caller's transaction.

    :param target: a model instance (KEKs are named by their name) or a
        ``(type, id)`` tuple.
    :raises TypeError: details hold bytes or other unserialisable values.
    """
    details = dict(details or {})
    _check_details(details)
    target_type, target_id = _target(target)
    with transaction.atomic():
        head = _locked_head()
        sequence = head.last_sequence + 1
        now = timezone.now()
        fields = dict(
            sequence=sequence,
            timestamp=now,
            actor=actor.name,
            action=str(action),
            target_type=target_type,
            target_id=target_id[:255],
            outcome=str(outcome),
            request_id=actor.request_id,
            ip_address=actor.ip_address,
            details=details,
            prev_hash=head.last_hash,
        )
        digest = hashlib.sha256(canonical_bytes(**fields)).hexdigest()
        event = AuditEvent.objects.create(hash=digest, **fields)
        AuditChainHead.objects.filter(pk=head.pk).update(last_sequence=sequence, last_hash=digest)
        interval = settings.AUDIT_CHECKPOINT_INTERVAL
        if interval and sequence % interval == 0:
            _sign_checkpoint(sequence, digest)
    return event


def _locked_head() -> AuditChainHead:
    head = AuditChainHead.objects.select_for_update().filter(pk=1).first()
    if head is None:
        AuditChainHead.objects.get_or_create(pk=1, defaults={"last_sequence": 0, "last_hash": GENESIS_HASH})
        head = AuditChainHead.objects.select_for_update().get(pk=1)
    return head


# -- checkpoints ---------------------------------------------------------------


def _signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(settings.AUDIT_SIGNING_KEY))


def public_key_hex() -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return _signing_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _checkpoint_message(sequence: int, event_hash_hex: str, prev_signature: str) -> bytes:
    return f"keyvault-audit-checkpoint:v1:{sequence}:{event_hash_hex}:{prev_signature}".encode("ascii")


def _sign_checkpoint(sequence: int, digest: str) -> AuditCheckpoint:
    previous = AuditCheckpoint.objects.order_by("-sequence").first()
    prev_signature = previous.signature if previous else ""
    signature = _signing_key().sign(_checkpoint_message(sequence, digest, prev_signature)).hex()
    return AuditCheckpoint.objects.create(
        sequence=sequence,
        event_hash=digest,
        signed_at=timezone.now(),
        public_key=public_key_hex(),
        prev_signature=prev_signature,
        signature=signature,
    )


def checkpoint(*, actor: Actor) -> AuditCheckpoint:
    """Sign the chain head now (after recording that we did)."""
    with transaction.atomic():
        event = record(Action.AUDIT_CHECKPOINT, actor=actor)
        existing = AuditCheckpoint.objects.filter(sequence=event.sequence).first()
        return existing or _sign_checkpoint(event.sequence, event.hash)


# -- verification --------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of walking the chain."""

    ok: bool
    events: int
    checkpoints: int
    last_sequence: int
    last_hash: str
    broken_at: int | None = None
    reason: str = ""

    def __str__(self) -> str:
        if self.ok:
            return (
                f"OK: audit chain intact, {self.events} events to #{self.last_sequence} "
                f"(hash {self.last_hash[:16]}…), {self.checkpoints} signed checkpoints verified"
            )
        return f"BROKEN at #{self.broken_at}: {self.reason}"


def verify_chain(*, jobs: int | None = None) -> VerifyResult:
    """Walk every event and checkpoint; report OK or the first broken position and why.

    Reading is :mod:`keyvault.audit_walk`'s job (on PostgreSQL, ``jobs`` connections
    sharing one snapshot); every hash, link and signature is checked here, in Python.
    """
    with audit_walk.consistent_view() as view:
        checkpoint_sequences = set(AuditCheckpoint.objects.values_list("sequence", flat=True))
        segments = view.segments(checkpoint_sequences, jobs)
        expected_sequence, expected_prev = 1, GENESIS_HASH
        hashes_at_checkpoints: dict[int, str] = {}
        for segment in segments:
            problem = segment_problem(segment, expected_sequence, expected_prev)
            if problem:
                return _broken(problem[0] - 1, *problem)
            if segment.last:
                expected_sequence, expected_prev = segment.last[0] + 1, segment.last[1]
            hashes_at_checkpoints.update(segment.checkpoint_hashes)
        last_sequence = expected_sequence - 1
        count = sum(segment.events for segment in segments)
        head = AuditChainHead.objects.filter(pk=1).first()
        if head is not None and (head.last_sequence, head.last_hash) != (last_sequence, expected_prev):
            return _broken(count, last_sequence + 1 if head.last_sequence > last_sequence else head.last_sequence,
                           f"chain head records #{head.last_sequence} but the log ends at #{last_sequence} "
                           "(newest events removed or edited)")
        checked, problem = _verify_checkpoints(hashes_at_checkpoints, last_sequence)
    if problem:
        return _broken(count, problem[0], problem[1])
    return VerifyResult(ok=True, events=count, checkpoints=checked, last_sequence=last_sequence, last_hash=expected_prev)


def segment_problem(segment: audit_walk.Segment, expected_sequence: int, expected_prev: str) -> tuple[int, str] | None:
    """The first break in a segment (sequence, reason), given where the chain before it ended."""
    if segment.first is not None:
        first_sequence, first_prev = segment.first
        if first_sequence != expected_sequence:
            return expected_sequence, audit_walk.sequence_jump(expected_sequence - 1, first_sequence)
        if first_prev != expected_prev:
            return first_sequence, audit_walk.LINK_BROKEN
    edited = _first_edited(segment.suspects)
    if edited is not None:
        return edited, "content does not match its hash (event edited)"
    return segment.failure


def _first_edited(sequences: list[int]) -> int | None:
    """The first of these events whose canonical bytes (the definition, not a rendering) miss its hash."""
    for start in range(0, len(sequences), 500):
        batch = AuditEvent.objects.filter(sequence__in=sequences[start:start + 500]).order_by("sequence")
        for row in audit_walk.load_rows(batch):
            if len(row) < len(_ROW_FIELDS):  # a value Django cannot even load
                return row[0]
            if hashlib.sha256(canonical_bytes(**dict(zip(_ROW_FIELDS, row[:11])))).hexdigest() != row[11]:
                return row[0]
    return None


def _verify_checkpoints(hashes: dict[int, str], last_sequence: int) -> tuple[int, tuple[int, str] | None]:
    prev_signature = ""
    checked = 0
    for cp in AuditCheckpoint.objects.order_by("sequence"):
        if cp.sequence > last_sequence:
            return checked, (cp.sequence, f"checkpoint covers #{cp.sequence} but the log ends at #{last_sequence} (events removed)")
        problem = checkpoint_problem(cp, hashes.get(cp.sequence), prev_signature)
        if problem:
            return checked, (cp.sequence, problem)
        prev_signature = cp.signature
        checked += 1
    return checked, None


def checkpoint_problem(cp: AuditCheckpoint, event_hash: str | None, prev_signature: str) -> str:
    """Why a checkpoint does not vouch for the event hash at its sequence ("" if it does)."""
    if cp.event_hash != event_hash:
        return "checkpoint hash differs from the event's hash"
    if cp.prev_signature != prev_signature:
        return "checkpoint does not chain to the previous checkpoint"
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(cp.public_key)).verify(
            bytes.fromhex(cp.signature), _checkpoint_message(cp.sequence, cp.event_hash, cp.prev_signature)
        )
    except (InvalidSignature, ValueError):
        return "checkpoint signature is invalid"
    if cp.public_key not in trusted_public_keys():
        return "checkpoint signed by a key that is not trusted"
    return ""


def trusted_public_keys() -> set[str]:
    """The current signing key's public half plus any retired ones still trusted."""
    return {public_key_hex(), *settings.AUDIT_TRUSTED_PUBLIC_KEYS}


def _broken(events: int, sequence: int, reason: str) -> VerifyResult:
    """A failed verification; ``events`` verified before the break."""
    return VerifyResult(ok=False, events=events, checkpoints=0, last_sequence=sequence - 1, last_hash="",
                        broken_at=sequence, reason=reason)


def chain_position() -> tuple[int, str]:
    """The current head (sequence, hash) — stamped on exports and reports."""
    head = AuditChainHead.objects.filter(pk=1).first()
    return (head.last_sequence, head.last_hash) if head else (0, GENESIS_HASH)


def export_rows(*, since: datetime | None = None, until: datetime | None = None) -> Iterator[dict]:
    """Events in chain order as plain dicts, with their hashes, for offline re-verification."""
    queryset = AuditEvent.objects.order_by("sequence")
    if since:
        queryset = queryset.filter(timestamp__gte=since)
    if until:
        queryset = queryset.filter(timestamp__lt=until)
    for event in queryset.iterator(chunk_size=VERIFY_CHUNK):
        yield event_document(event)


def event_document(event: AuditEvent) -> dict:
    """An event exactly as its hash covers it (see :func:`canonical_bytes`), plus the hash."""
    return {
        "sequence": event.sequence,
        "timestamp": event.timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": event.actor,
        "action": event.action,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "outcome": event.outcome,
        "request_id": event.request_id,
        "ip_address": event.ip_address,
        "details": event.details,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }

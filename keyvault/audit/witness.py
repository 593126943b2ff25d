"""External witnesses of the audit chain: every signed checkpoint is also kept outside the database.

Whoever owns the database can rewrite events, recompute every hash and delete the
checkpoints that would give them away; they cannot sign new checkpoints (the
signing key is not in the database), but without a record elsewhere nothing
remembers how far the chain had got. So, like CloudTrail's digest files and
Certificate Transparency's witnesses, each checkpoint is also sent to the
destinations listed in ``AUDIT_WITNESS`` (``HMD_AUDIT_WITNESS``):

* a file path (the default: ``HMD_DATA_DIR/audit-witness.jsonl``), appended to,
  one JSON line per checkpoint, created 0600, locked and fsynced per line;
* ``https://…``: the checkpoint POSTed as JSON (a collector, a SIEM's HTTP input);
* ``syslog://host:port`` (UDP), ``syslog+tcp://host:port`` or ``syslog:///dev/log``;
* ``s3://bucket/prefix``: one object per checkpoint, under S3 Object Lock when
  ``AUDIT_WITNESS_S3_LOCK_MODE`` is set.

This module only moves checkpoints in and out (one line format, :class:`WitnessEntry`);
:func:`keyvault.audit.verify_chain` judges a witness against the database. Writes
happen after the checkpoint's transaction commits (a rolled-back checkpoint is never
witnessed) and never fail the operation: a destination that cannot be written is
logged at ERROR and shown in the console's chain banner until a later write succeeds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from logging.handlers import SysLogHandler
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.core.cache import cache

from keyvault.exceptions import AuditWitnessUnavailable

log = logging.getLogger(__name__)

HTTP_TIMEOUT_SECONDS = 10.0
FAILURE_CACHE_KEY = "keyvault:audit:witness:last-failure"
MAX_LINE_BYTES = 4096  # a checkpoint line is ~450 bytes; anything far longer is not one
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class WitnessEntry:
    """One checkpoint as witnesses store it: exactly the fields its signature covers, plus key and time."""

    sequence: int
    event_hash: str
    prev_signature: str
    signature: str
    public_key: str
    signed_at: str  # ISO 8601, UTC, microseconds

    @classmethod
    def of(cls, checkpoint) -> WitnessEntry:
        """The entry for an :class:`~keyvault.models.AuditCheckpoint` (or anything with its attributes)."""
        return cls(sequence=checkpoint.sequence, event_hash=checkpoint.event_hash,
                   prev_signature=checkpoint.prev_signature, signature=checkpoint.signature,
                   public_key=checkpoint.public_key,
                   signed_at=checkpoint.signed_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))

    @classmethod
    def parse(cls, text: str, *, where: str) -> WitnessEntry:
        """An entry from one JSON line.

        :raises AuditWitnessUnavailable: not a JSON object with exactly the entry's fields and types.
        """
        try:
            data = json.loads(text)
        except ValueError:
            raise AuditWitnessUnavailable(f"{where} is not JSON") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise AuditWitnessUnavailable(f"{where} is not a checkpoint (expected the fields {sorted(names)})")
        if type(data["sequence"]) is not int or data["sequence"] < 1 or not all(
                isinstance(data[name], str) for name in names - {"sequence"}):
            raise AuditWitnessUnavailable(f"{where} has a field of the wrong type")
        return cls(**data)

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"


def parse_lines(text: str, *, source: str) -> list[WitnessEntry]:
    """Entries from JSON lines (blank lines ignored)."""
    return [WitnessEntry.parse(line, where=f"{source} line {number}")
            for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


# -- destinations ------------------------------------------------------------------------------


class Witness(ABC):
    """One place checkpoints are written to (and, for some, read back from)."""

    readable = True

    @property
    @abstractmethod
    def description(self) -> str:
        """Where this witness is, without credentials (for logs and verification results)."""

    @abstractmethod
    def write(self, entry: WitnessEntry) -> None:
        """Append one checkpoint. :raises Exception: anything; :func:`publish` logs it."""

    def read(self) -> list[WitnessEntry]:
        """Every checkpoint witnessed here. :raises AuditWitnessUnavailable: cannot be read or parsed."""
        raise AuditWitnessUnavailable(f"{self.description} cannot be read back; verify against a copy with --witness")


class FileWitness(Witness):
    """An append-only JSON-lines file, 0600, one locked and fsynced write per checkpoint."""

    def __init__(self, path: str):
        self.path = Path(path).expanduser()

    @property
    def description(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def write(self, entry: WitnessEntry) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = entry.line().encode("ascii")
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(descriptor).st_mode & 0o077:  # an older or hand-made file: no one else reads it either
                os.fchmod(descriptor, 0o600)
            # Writers in other processes append too; the lock keeps one line from interleaving with another.
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            while data:
                data = data[os.write(descriptor, data):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def read(self) -> list[WitnessEntry]:
        try:
            text = self.path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditWitnessUnavailable(f"witness {self.path} cannot be read: {getattr(exc, 'strerror', exc)}") from None
        return parse_lines(text, source=str(self.path))


class WebhookWitness(Witness):
    """POSTs each checkpoint as JSON; reading GETs the URL and expects JSON lines (an auditor's copy)."""

    def __init__(self, url: str):
        self.url = url
        parts = urlsplit(url)
        self._where = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
        self._plain_http_allowed = parts.scheme == "https" or parts.hostname in _LOOPBACK

    @property
    def description(self) -> str:
        return self._where  # never the query string or user info: they may hold a token

    def write(self, entry: WitnessEntry) -> None:
        import httpx

        if not self._plain_http_allowed:
            raise AuditWitnessUnavailable(f"witness {self._where}: checkpoints are sent over https only")
        httpx.post(self.url, json=entry.as_dict(), timeout=HTTP_TIMEOUT_SECONDS).raise_for_status()

    def read(self) -> list[WitnessEntry]:
        import httpx

        try:
            response = httpx.get(self.url, timeout=HTTP_TIMEOUT_SECONDS)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise AuditWitnessUnavailable(f"witness {self._where} cannot be read: {exc.__class__.__name__}") from None
        return parse_lines(response.text, source=self._where)


class _RaisingSysLogHandler(SysLogHandler):
    def handleError(self, record):  # noqa: N802 (logging's name) — a lost checkpoint must not be silent
        raise


class SyslogWitness(Witness):
    """One syslog message per checkpoint: ``keyvault-audit-checkpoint {json}`` (write-only)."""

    readable = False

    def __init__(self, spec: str):
        parts = urlsplit(spec)
        self.socktype = socket.SOCK_STREAM if parts.scheme == "syslog+tcp" else socket.SOCK_DGRAM
        self.address = parts.path if not parts.hostname else (parts.hostname, parts.port or 514)
        self._where = f"{parts.scheme}://{parts.hostname}:{parts.port or 514}" if parts.hostname else spec

    @property
    def description(self) -> str:
        return self._where

    def write(self, entry: WitnessEntry) -> None:
        handler = _RaisingSysLogHandler(address=self.address, facility=SysLogHandler.LOG_AUTH,
                                        socktype=None if isinstance(self.address, str) else self.socktype)
        try:
            record = logging.LogRecord("keyvault.audit", logging.WARNING, __file__, 0,
                                       "keyvault-audit-checkpoint %s", (entry.line().strip(),), None)
            handler.emit(record)
        finally:
            handler.close()


class S3Witness(Witness):
    """One object per checkpoint (``<prefix><sequence, 20 digits>.json``), Object Lock retention when configured."""

    def __init__(self, spec: str):
        parts = urlsplit(spec)
        self.bucket = parts.hostname or ""
        prefix = parts.path.lstrip("/")
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _client(self):
        try:
            import boto3
        except ImportError:  # pragma: no cover - boto3 is in requirements
            raise AuditWitnessUnavailable("an s3:// witness needs boto3") from None
        return boto3.client("s3")

    def write(self, entry: WitnessEntry) -> None:
        extra = {}
        mode = settings.AUDIT_WITNESS_S3_LOCK_MODE
        if mode:
            extra = {"ObjectLockMode": mode, "ObjectLockRetainUntilDate":
                     datetime.now(UTC) + timedelta(days=settings.AUDIT_WITNESS_S3_RETAIN_DAYS)}
        self._client().put_object(Bucket=self.bucket, Key=f"{self.prefix}{entry.sequence:020d}.json",
                                  Body=entry.line().encode("ascii"), ContentType="application/json", **extra)

    def read(self) -> list[WitnessEntry]:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()
        entries = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    if not item["Key"].endswith(".json") or item["Size"] > MAX_LINE_BYTES:
                        continue
                    body = client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                    entries.extend(parse_lines(body.decode("ascii", "replace"), source=f"s3://{self.bucket}/{item['Key']}"))
        except (BotoCoreError, ClientError) as exc:
            raise AuditWitnessUnavailable(f"witness {self.description} cannot be read: {exc.__class__.__name__}") from None
        return entries


def destination(spec: str) -> Witness:
    """The witness a ``HMD_AUDIT_WITNESS`` entry or ``--witness`` argument names.

    :raises AuditWitnessUnavailable: an unknown scheme.
    """
    spec = spec.strip()
    scheme = urlsplit(spec).scheme.lower()
    if scheme in ("http", "https"):
        return WebhookWitness(spec)
    if scheme in ("syslog", "syslog+tcp"):
        return SyslogWitness(spec)
    if scheme == "s3":
        return S3Witness(spec)
    if scheme == "file":
        return FileWitness(urlsplit(spec).path)
    if scheme and len(scheme) > 1:  # "c:" would be a Windows drive; anything else longer is a typo
        raise AuditWitnessUnavailable(f"unknown audit witness {spec.split(':', 1)[0]}:… (file, https, syslog or s3)")
    return FileWitness(spec)


def configured() -> list[Witness]:
    """The witnesses checkpoints are written to (``AUDIT_WITNESS``; ``none`` or empty: none)."""
    specs = [spec for spec in settings.AUDIT_WITNESS if spec.strip() and spec.strip().lower() != "none"]
    return [destination(spec) for spec in specs]


def local_files() -> list[FileWitness]:
    """The configured witness files: what ``audit verify`` checks without ``--witness``."""
    return [witness for witness in configured() if isinstance(witness, FileWitness)]


def publish(entry: WitnessEntry) -> bool:
    """Write a checkpoint to every configured witness; True if all took it.

    Called after the checkpoint's transaction commits. A failure is logged loudly and
    remembered for the console's banner, never raised: the checkpoint is safe in the
    database, and the next one (at most ``AUDIT_CHECKPOINT_SECONDS`` later) chains to it.
    """
    failed = []
    try:
        witnesses = configured()
    except AuditWitnessUnavailable as exc:
        witnesses, failed = [], ["HMD_AUDIT_WITNESS"]
        log.error("AUDIT WITNESS MISCONFIGURED: checkpoint #%s was not witnessed: %s", entry.sequence, exc)
    for witness in witnesses:
        try:
            witness.write(entry)
        except Exception as exc:  # noqa: BLE001 — any destination fault: log, remember, carry on
            failed.append(witness.description)
            log.error("AUDIT WITNESS WRITE FAILED: checkpoint #%s was not written to %s (%s: %s); "
                      "it is in the database, but nothing outside it remembers it yet",
                      entry.sequence, witness.description, exc.__class__.__name__, exc)
    if failed:
        cache.set(FAILURE_CACHE_KEY, {"sequence": entry.sequence, "destinations": failed,
                                      "at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")}, timeout=None)
    else:
        cache.delete(FAILURE_CACHE_KEY)
    return not failed


def last_failure() -> str:
    """Why the newest checkpoint is not witnessed everywhere ("" when the last write succeeded)."""
    failure = cache.get(FAILURE_CACHE_KEY)
    if not isinstance(failure, dict):
        return ""
    return (f"witness write failed for checkpoint #{failure.get('sequence')} at {failure.get('at')} UTC "
            f"({', '.join(failure.get('destinations', []))}); see the logs")

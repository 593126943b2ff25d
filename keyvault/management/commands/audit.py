"""``manage.py audit verify|export|checkpoint`` — integrity of the audit log."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

from django.core.management.base import CommandError
from django.utils.dateparse import parse_date, parse_datetime
from django.utils.timezone import make_aware

from keyvault import audit
from keyvault.audit import status as audit_status
from keyvault.console import reports

from ._base import KeyvaultCommand

EXPORT_FIELDS = [
    "sequence", "timestamp", "actor", "action", "target_type", "target_id", "outcome",
    "request_id", "ip_address", "details", "prev_hash", "hash",
]


def parse_when(value: str | None) -> datetime | None:
    """Accept ``2026-01-31`` or an ISO 8601 date-time; naive values are UTC."""
    if not value:
        return None
    parsed = parse_datetime(value)
    if parsed is None:
        day = parse_date(value)
        if day is None:
            raise CommandError(f"not a date or ISO 8601 date-time: {value!r}")
        parsed = datetime(day.year, day.month, day.day)
    return parsed if parsed.tzinfo else make_aware(parsed, audit.UTC)


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


class Command(KeyvaultCommand):
    help = "Verify, export or checkpoint the hash-chained audit log."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        sub = parser.add_subparsers(dest="subcommand", required=True)
        verify = sub.add_parser("verify", help="Walk the chain and its signed checkpoints; exit 1 if broken.")
        verify.add_argument(
            "--jobs", type=positive_int, default=None,
            help="PostgreSQL: database connections reading the chain at once, all from one snapshot "
                 "(default: the CPU count, at most 4). Ignored on SQLite.",
        )
        witness = verify.add_mutually_exclusive_group()
        witness.add_argument(
            "--witness", metavar="FILE|URL",
            help="Check against this copy of the witness (a JSON-lines file, an http(s) URL serving one, or "
                 "s3://bucket/prefix) instead of the configured witness files (HMD_AUDIT_WITNESS).",
        )
        witness.add_argument(
            "--no-witness", action="store_true",
            help="Do not check any witness (e.g. while a lost witness file is being restored). Not for audits.",
        )
        export = sub.add_parser("export", help="Stream events with their hashes (CSV or JSON lines) to stdout.")
        export.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
        export.add_argument("--since", help="Only events at or after this date/time (UTC).")
        export.add_argument("--until", help="Only events before this date/time (UTC).")
        sub.add_parser("checkpoint", help="Sign the chain head now.")
        verify_export = sub.add_parser(
            "verify-export", help="Check a report export: its body hash, the audit event recording it, the chain."
        )
        verify_export.add_argument("file", help="The exported file (CSV, JSON or HTML from the console or `report`).")

    def handle(self, *args, subcommand, **options):
        return getattr(self, f"_{subcommand.replace('-', '_')}")(options)

    def _verify(self, options):
        result = audit_status.verify_fully(actor=self.actor(options), jobs=options.get("jobs"),
                                           witness=options.get("witness") or None,
                                           use_witness=not options.get("no_witness"), throttle=False)
        if not result.ok:
            raise CommandError(str(result))
        self.stdout.write(str(result))

    def _export(self, options):
        since, until = parse_when(options["since"]), parse_when(options["until"])
        rows = audit.export(actor=self.actor(options), format=options["format"], since=since, until=until,
                            since_text=options["since"], until_text=options["until"])
        out = self.stdout._out if hasattr(self.stdout, "_out") else sys.stdout
        if options["format"] == "jsonl":
            for row in rows:
                out.write(json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n")
        else:
            # For spreadsheets: cells that could run as formulas are neutralised (jsonl is the exact record).
            writer = reports.SpreadsheetSafeWriter(out, lineterminator="\r\n")
            writer.writeheader(EXPORT_FIELDS)
            for row in rows:
                row = {**row, "details": json.dumps(row["details"], sort_keys=True, separators=(",", ":"))}
                writer.writerow([row.get(name, "") for name in EXPORT_FIELDS])

    def _verify_export(self, options):
        from pathlib import Path

        try:
            data = Path(options["file"]).read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {options['file']}: {exc.strerror}") from None
        try:
            check = reports.verify_export(data)
        except reports.ExportNotVerified as exc:
            raise CommandError(f"export NOT verified: {exc}") from None
        self._verify(options)  # the event only proves something if the chain holding it is intact
        self.stdout.write(str(check))

    def _checkpoint(self, options):
        cp = audit.checkpoint(actor=self.actor(options))
        self.stdout.write(f"signed checkpoint at #{cp.sequence} (hash {cp.event_hash}) with key {cp.public_key}")
